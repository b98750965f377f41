"""How far a prediction is from the measured quantity: per group and per step, against the
quantity's natural scale at that step (`natural_scale`, `step_error`, `scaled_error`).

The natural scale is the size of what the quantity is made of, not of the quantity itself:

* translation ``√n·|θ_A|``: the Cauchy-Schwarz bound of ``|Σθ_A|`` over the group's n elements.
  A column sum that cancels to ~0 still carries the float rounding of its n terms, ~ε|θ_A|;
  against its own (tiny) size that reads as an error of order 1.
* scale ``|θ_A|²``: the quantity itself, at that step. A norm that decays under weight decay is
  measured against its current size, so an error late in the run is not hidden by the size the
  norm had at the start.
* rescale ``|θ_A1|² + |θ_A2|²``: the bound of ``|θ_A1|² − |θ_A2|²``, which crosses zero whenever
  one side overtakes the other.

Dividing by max over the run of |measured| (`prediction.relative_error`, the measure of earlier
versions) does both things wrong at once: it inflates the error of sums that cancel and deflates
the late error of quantities that decay. docs/theory.md, "The error measure".

Numpy only.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import numpy as np

from nm_optim.names import STAT_INDEX
from nm_optim.theory.laws import check_kind, combine, measured

# The "late" error: the last tenth of the recorded steps.
LATE_FRACTION = 0.1


def natural_scale(kind: str, stats: Mapping[str, np.ndarray] | np.ndarray, group_size: int | None = None) -> np.ndarray:
    """[S, G]: the natural scale of each group's quantity at each step (see the module
    docstring): translation √n·|θ_A| with n = `group_size` (1 when not known: the bound is then
    |θ_A|, smaller than √n·|θ_A|, so errors read larger, never smaller); scale |θ_A|²; rescale
    |θ_A1|² + |θ_A2|². Rescale statistics given already combined (A1 − A2, a bare array) have
    lost |θ_A1|² + |θ_A2|²: the scale is then max over steps |measured|, broadcast over the
    steps (the only size left)."""
    check_kind(kind)
    pp = STAT_INDEX["pp"]
    if kind == "rescale":
        if isinstance(stats, Mapping) and "A1" in stats and "A2" in stats:
            a1, a2 = (np.asarray(stats[r], np.float64)[..., pp] for r in ("A1", "A2"))
            return np.abs(a1) + np.abs(a2)
        m = measured(kind, stats)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN group keeps NaN
            top = np.nanmax(np.abs(m), axis=0) if len(m) else np.zeros(m.shape[1:])
        return np.broadcast_to(top, m.shape).copy()
    s = combine(kind, stats)
    if kind == "scale":
        return np.abs(s[..., pp])
    n = 1.0 if group_size is None else float(group_size)
    return np.sqrt(n * np.abs(s[..., pp]))


def step_error(pred: np.ndarray, meas: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """[S, G]: (prediction − measured) / natural scale at every step (signed; NaN where the step
    was not measured). `pred` may hold one more row (the value after the last step): it is
    cut to the measured steps. A scale of 0 (a group of zeros) divides by 1: the difference
    itself."""
    meas = np.asarray(meas, np.float64)
    pred = np.asarray(pred, np.float64)[: len(meas)]
    scale = np.asarray(scale, np.float64)
    with np.errstate(invalid="ignore"):
        diff = np.where(np.isfinite(meas), pred - meas, np.nan)
        return diff / np.where(scale > 0, scale, 1.0)


def scaled_error(pred: np.ndarray, meas: np.ndarray, scale: np.ndarray, *, last: float | None = None) -> np.ndarray:
    """[G]: max over steps |prediction − measured| / natural scale at that step (`step_error`),
    over the whole run, or over its last `last` fraction of steps (at least one step: the
    late error, `LATE_FRACTION`). NaN for a group without a finite value."""
    err = np.abs(step_error(pred, meas, scale))
    S = len(err)
    if last is not None:
        if not 0 < last <= 1:
            raise ValueError(f"last must be in (0, 1], got {last!r}")
        err = err[min(int(round(S * (1 - last))), max(S - 1, 0)):]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a group without a prediction stays NaN
        return np.nanmax(err, axis=0) if len(err) else np.zeros(err.shape[1:])
