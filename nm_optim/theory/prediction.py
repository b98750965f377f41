"""Predictions of a symmetry's groups in a record: every trajectory (`predict`, `predict_arrays`,
`Prediction`) and its error against the measured one (`relative_error`, `error_floor`).

Errors: max over steps |pred - meas| / max over steps |meas|, per group; for translation the
normaliser is at least the group's norm |θ_A| (`error_floor`: a sum that cancels to ~0, like a
zero-initialised bias, holds nothing but float rounding).

Records must hold consecutive steps (``record_every == 1``): the recursion needs every step.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from nm_optim.names import HYPER_NAMES, STAT_INDEX
from nm_optim.theory.continuous import Segment, gradient_flow, paper
from nm_optim.theory.laws import (
    Schedule,
    breaking,
    breaking_bound,
    breaking_ratio,
    check_kind,
    combine,
    exact,
    measured,
)


class RecordLike(Protocol):
    """What the theory reads of a record (nm_optim's Record, or a loaded one); symmetries read
    its tracks, stats, hyper and first (nm_optim.symmetry.Symmetry.group_stats)."""

    meta: dict[str, Any]
    steps: np.ndarray
    skipped: np.ndarray


def relative_error(pred: np.ndarray, meas: np.ndarray, floor: np.ndarray | float = 0.0) -> np.ndarray:
    """[G]: max over steps |pred - meas| / max over steps |meas| (steps where meas is NaN, i.e. not
    stepped, are ignored). Normalising by the largest value, not pointwise, keeps rescale
    differences that cross zero meaningful.

    `floor` ([G] or scalar) bounds the normaliser from below by the size of the terms that formed
    the value: a translation sum Σp that cancels to 1% of the group's norm |θ_A| still carries
    the float32 rounding of its elements (~ε|θ_A| per step), which no recursion of the sums can
    predict; pass ``floor = max_k |θ_A|`` to measure the error against that scale."""
    pred = np.asarray(pred)[: len(meas)]
    with np.errstate(invalid="ignore"):
        diff = np.where(np.isfinite(meas), np.abs(pred - meas), np.nan)
        scale = np.nanmax(np.abs(meas), axis=0) if len(meas) else np.zeros(meas.shape[1:])
        scale = np.maximum(scale, floor)
        num = np.nanmax(diff, axis=0) if len(meas) else np.zeros(meas.shape[1:])
    return np.where(scale > 0, num / np.where(scale > 0, scale, 1), num)


@dataclass
class Prediction:
    """The three trajectories (and the gradient-flow constant) of one symmetry's groups.

    ``measured`` is [S, G] (value before each recorded step); ``exact``, ``paper`` and
    ``gradient_flow`` are [S+1, G] (their last row predicts the value after the last step);
    ``time`` [S+1] is the continuous time of the paper curve."""

    name: str
    kind: str
    steps: np.ndarray
    time: np.ndarray
    measured: np.ndarray
    exact: np.ndarray
    paper: np.ndarray
    gradient_flow: np.ndarray
    breaking: np.ndarray  # [S, G] the recorded vanishing term (Σg, Σpg, pg1 - pg2)
    breaking_bound: np.ndarray  # [S, G] its Cauchy-Schwarz bound |g||generator|
    segments: list[Segment]
    paper_reason: str | None = None
    schedule: Schedule | None = field(default=None, repr=False)
    floor: np.ndarray | float = 0.0  # [G] lower bound of the error's normaliser (see `error_floor`)

    @property
    def num_groups(self) -> int:
        return self.measured.shape[1]

    @property
    def paper_applies(self) -> bool:
        return self.paper_reason is None

    @property
    def exact_error(self) -> np.ndarray:
        """[G] max_k |exact - measured| / max(max_k |measured|, floor)."""
        return relative_error(self.exact, self.measured, self.floor)

    @property
    def breaking_ratio(self) -> np.ndarray:
        """[G] how badly the symmetry is broken: max_k |⟨g, generator⟩| / max_k |g||generator|
        (BatchNorm's eps shows here for scale; float rounding of the gradient for the others)."""
        return breaking_ratio(self.breaking, self.breaking_bound)

    @property
    def paper_error(self) -> np.ndarray:
        return relative_error(self.paper, self.measured, self.floor)

    @property
    def gradient_flow_error(self) -> np.ndarray:
        """[G] how far the run is from conservation under gradient flow (the paper's
        section 4) in the same measure."""
        return relative_error(self.gradient_flow, self.measured, self.floor)


def error_floor(kind: str, stats: Mapping[str, np.ndarray] | np.ndarray) -> np.ndarray:
    """[G]: the floor of the error's normaliser. Translation: max_k |θ_A| (the norm of the terms
    that form Σθ_A). A column or bias whose sum is ~0 (a zero-initialised bias stays at 0: the
    law holds exactly) carries only the float rounding of its elements, ~ε|θ_A| per step, and
    max_k |Σθ_A| would turn that into an error of order 1; measured against |θ_A| it reads as
    what it is. Where |Σθ_A| ≥ |θ_A| the floor changes nothing. Scale: none needed
    (|θ_A|² is the quantity). Rescale: none (the difference crossing zero is handled by the
    max over steps)."""
    s = combine(kind, stats)
    if kind != "translation":
        return np.zeros(s.shape[1])
    with np.errstate(invalid="ignore"):
        pp = s[..., STAT_INDEX["pp"]]
        return np.sqrt(np.nanmax(pp, axis=0)) if len(pp) else np.zeros(s.shape[1])


def predict_arrays(kind: str, stats: Mapping[str, np.ndarray] | np.ndarray, schedule: Schedule,
                   *, name: str = "", steps: np.ndarray | None = None, group_size: int | None = None) -> Prediction:
    """All trajectories of one symmetry from its role statistics (role -> [S, G, 9]; a bare array
    means role "A") and its schedule: the array-level entry point, needing no Symmetry object."""
    check_kind(kind)
    s = combine(kind, stats)
    roles = stats if isinstance(stats, Mapping) else s
    values, time, segments, reason = paper(kind, s, schedule)
    return Prediction(
        name=name or kind, kind=kind,
        steps=np.arange(s.shape[0]) if steps is None else np.asarray(steps),
        time=time, measured=measured(kind, s), exact=exact(kind, s, schedule), paper=values,
        gradient_flow=gradient_flow(kind, s), breaking=breaking(kind, s),
        breaking_bound=breaking_bound(kind, roles, group_size),
        segments=segments, paper_reason=reason, schedule=schedule, floor=error_floor(kind, s),
    )


def check_consecutive(record: RecordLike) -> None:
    """The recursion needs every step: raise ValueError unless the record's steps are consecutive."""
    every = record.meta.get("record_every", 1)
    if every != 1:
        raise ValueError(
            f"the theory needs every step recorded, but this record kept every {every}th step "
            f"(record_every={every}); record with record_every=1"
        )
    steps = np.asarray(record.steps)
    if len(steps) > 1 and not np.all(np.diff(steps) == 1):
        gap = int(np.argmax(np.diff(steps) != 1))
        raise ValueError(
            f"the theory needs consecutive steps, but the record jumps from step {steps[gap]} to "
            f"{steps[gap + 1]}; record with record_every=1"
        )


def schedule_of(symmetry: Any, record: RecordLike) -> Schedule:
    """The Schedule of a symmetry's members in a record (via Symmetry.hyper / Symmetry.first)."""
    hyper = symmetry.hyper(record)
    return Schedule(*(np.asarray(hyper[n]) for n in HYPER_NAMES),
                    first=np.asarray(symmetry.first(record), bool),
                    skipped=np.asarray(record.skipped, bool))


def _group_size(symmetry: Any) -> int | None:
    """Elements per translation group: the classifier's number of outputs (weight rows)."""
    if getattr(symmetry, "kind", None) != "translation":
        return None
    for m in getattr(symmetry, "members", ()):
        shape = getattr(m, "shape", None) or (tuple(m.param.shape) if getattr(m, "param", None) is not None else None)
        if shape:
            return int(shape[0])
    return None


def predict(record: RecordLike, symmetry: Any) -> Prediction:
    """measured, exact, paper and gradient-flow trajectories of every group of `symmetry` (an
    nm_optim.symmetry.Symmetry, or anything with kind, name, group_stats, hyper, first)."""
    check_consecutive(record)
    return predict_arrays(symmetry.kind, symmetry.group_stats(record), schedule_of(symmetry, record),
                          name=symmetry.name, steps=record.steps, group_size=_group_size(symmetry))


def symmetries_of(record: RecordLike) -> list[Any]:
    """The symmetries described in record.meta["symmetries"], rebuilt without the model."""
    from nm_optim.symmetry import symmetries_from_record

    return symmetries_from_record(record)
