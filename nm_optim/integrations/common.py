"""The scalars the integrations log: what one recorded step says, computed from its sums.

For a recorded step (a row of a Record; the values are those before the step, as recorded):

    norm/theta/<param>      |θ| = sqrt(Σp²) of the whole parameter tensor
    norm/grad/<param>       |g| = sqrt(Σg²) (the gradient after AMP unscaling, before weight decay)
    norm/buffer/<param>     |v| = sqrt(Σv²), the momentum buffer (0 before its first step)
    conserved/<kind>/<sym>  the symmetry's measured quantity summed over its groups
                            (docs/architecture.md, "The theory"): translation Σθ, scale |θ_A|²,
                            rescale |θ_A1|² - |θ_A2|²; each group's obeys the exact law, and so
                            does their sum (the laws are linear in the sums)
    exact/<kind>/<sym>      the exact law's prediction of that quantity from the previous step's
                            sums (the one-step recursion with the symmetry's vanishing term set to
                            zero), when the previous step was recorded too
    residual/<kind>/<sym>   measured - exact: rounding plus real symmetry breaking
    breaking/<kind>/<sym>   what the recorded breaking term (Σg or Σp·g) adds to the prediction:
                            the part of the residual the symmetry breaking explains
    hyper/<name>            lr, momentum, dampening, weight_decay, nesterov of the param group
                            (hyper/<name>/group<i> when there are several groups)

A parameter's norms come from its "all" track, else from the sum of the groups of its "rows" or
"cols" track (each partitions the tensor). Only tracked parameters appear: a run tracking only its
symmetries shows the parameters in them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from nm_optim.names import HYPER_NAMES, STAT_INDEX
from nm_optim.symmetry import Symmetry
from nm_optim.theory import exact_parts, parts_of

_PREFER = ("all", "rows", "cols")


def _unwrap(optimizer: Any) -> Any:
    """The nm_optim.SGD under a framework's wrappers (Lightning's LightningOptimizer, accelerate's
    AcceleratedOptimizer), or None."""
    seen = 0
    while optimizer is not None and not hasattr(optimizer, "recorder") and seen < 8:
        optimizer = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
        seen += 1
    return optimizer if optimizer is not None and hasattr(optimizer, "recorder") else None


def step_scalars(record: Any, index: int = -1, symmetries: list[Symmetry] | None = None) -> dict[str, float]:
    """The scalars of record row `index` (see the module docstring), tag -> float.

    symmetries: those to report (default: the record's own, meta["symmetries"])."""
    out: dict[str, float] = {}
    tracks = record.tracks
    by_param: dict[str, tuple[int, int]] = {}  # param -> (preference, track index)
    for i, t in enumerate(tracks):
        param, _, axis = t["name"].rpartition(":")
        rank = _PREFER.index(axis) if axis in _PREFER else len(_PREFER)
        if param not in by_param or rank < by_param[param][0]:
            by_param[param] = (rank, i)
    for param, (_, i) in by_param.items():
        row = np.asarray(record.stats[i][index], dtype=np.float64)  # [groups, 9]
        for tag, col in (("theta", "pp"), ("grad", "gg"), ("buffer", "vv")):
            out[f"norm/{tag}/{param}"] = float(np.sqrt(max(row[:, STAT_INDEX[col]].sum(), 0.0)))
    if symmetries is None:
        symmetries = [Symmetry.from_description(d) for d in record.meta.get("symmetries") or []]
    for sym in symmetries:
        measured = float(measured_total(sym, record, index))
        out[f"conserved/{sym.kind}/{sym.name}"] = measured
        law = one_step_law(sym, record, index)
        if law is not None:  # the laws are linear in the sums: the groups' predictions add up
            predicted = float(np.nansum(law["exact"]))
            out[f"exact/{sym.kind}/{sym.name}"] = predicted
            out[f"residual/{sym.kind}/{sym.name}"] = measured - predicted
            out[f"breaking/{sym.kind}/{sym.name}"] = float(np.nansum(law["breaking"]))
    for name in HYPER_NAMES:
        values = np.asarray(record.hyper[name])[index] if name in record.hyper else np.zeros(0)
        if len(values) == 1:
            out[f"hyper/{name}"] = float(values[0])
        else:
            for g, v in enumerate(values):
                out[f"hyper/{name}/group{g}"] = float(v)
    return out


def measured_total(sym: Symmetry, record: Any, index: int = -1) -> float:
    """The symmetry's measured quantity at record row `index`, summed over its groups:
    translation Σp, scale Σp², rescale Σp²(A1) - Σp²(A2)."""
    return float(measured_groups(sym, record, index).sum())


def one_step_law(sym: Symmetry, record: Any, index: int = -1) -> dict[str, np.ndarray] | None:
    """The exact law over one step, per group of the symmetry: "measured" (the quantity at record
    row `index`), "exact" (its prediction from row `index - 1`: theory.exact on those two rows, the
    symmetry's vanishing term set to zero), "residual" (measured - exact) and "breaking" (what the
    recorded breaking term adds to the prediction). None when the previous row is not the
    previous optimizer step, or either step was skipped (its sums are NaN). O(1): two rows."""
    n = len(record.steps)
    i = index % n if n else 0
    if i == 0 or int(record.steps[i]) != int(record.steps[i - 1]) + 1:
        return None
    if bool(np.asarray(record.skipped)[i - 1]) or bool(np.asarray(record.skipped)[i]):
        return None
    pair = _Row(record, i - 1, i + 1)
    # Each member with its own param group's hyper-parameters (no-decay groups, per-group lr).
    parts, _ = parts_of(sym, pair)
    predicted = exact_parts(sym.kind, parts)
    with_breaking = exact_parts(sym.kind, parts, vanishing=False)[1]
    measured = measured_groups(sym, pair, 1)
    return {"measured": measured, "exact": predicted[1], "residual": measured - predicted[1],
            "breaking": with_breaking - predicted[1]}


def measured_groups(sym: Symmetry, record: Any, index: int = -1) -> np.ndarray:
    """The symmetry's measured quantity per group at record row `index`."""
    stats = sym.group_stats(_one_row(record, index))
    if sym.kind == "translation":
        return stats["A"][0, :, STAT_INDEX["p"]]
    if sym.kind == "scale":
        return stats["A"][0, :, STAT_INDEX["pp"]]
    return stats["A1"][0, :, STAT_INDEX["pp"]] - stats["A2"][0, :, STAT_INDEX["pp"]]


def group_values(record: Any, index: int = -1, symmetries: list[Symmetry] | None = None) -> dict[str, np.ndarray]:
    """Per symmetry and group, at record row `index`: "<what>/<kind>/<name>" -> [groups] for what in
    measured, exact, residual, breaking (the last three when the previous step is recorded)."""
    if symmetries is None:
        symmetries = [Symmetry.from_description(d) for d in record.meta.get("symmetries") or []]
    out: dict[str, np.ndarray] = {}
    for sym in symmetries:
        law = one_step_law(sym, record, index)
        if law is None:
            out[f"measured/{sym.kind}/{sym.name}"] = measured_groups(sym, record, index)
            continue
        for what, values in law.items():
            out[f"{what}/{sym.kind}/{sym.name}"] = values
    return out


class _Row:
    """Rows of a record (`index`, or [index, stop)), with the attributes Symmetry.group_stats,
    Symmetry.hyper and Symmetry.first read."""

    def __init__(self, record: Any, index: int, stop: int | None = None) -> None:
        if stop is not None:
            sl = slice(index, stop)
        else:
            sl = slice(index, index + 1) if index != -1 else slice(-1, None)
        self.tracks = record.tracks
        self.meta = record.meta
        self.steps = np.asarray(record.steps)[sl]
        self.stats = [s[sl] for s in record.stats]
        self.hyper = {k: np.asarray(v)[sl] for k, v in record.hyper.items()}
        self.first = np.asarray(record.first)[sl]
        self.skipped = np.asarray(record.skipped)[sl]


def _one_row(record: Any, index: int) -> Any:
    return record if len(record.steps) == 1 else _Row(record, index)


class ScalarSource:
    """Reads the scalars of an nm_optim.SGD every `every` optimizer steps, from the latest record
    (Recorder.latest(1): O(1) whatever the history). `read()` after each step returns
    (step, scalars) once a record at or past the next multiple of `every` exists, else None; the
    step is the record's optimizer step (0-based, the values before that step)."""

    def __init__(self, optimizer: Any, every: int = 10) -> None:
        opt = _unwrap(optimizer)
        if opt is None:
            raise TypeError(f"expected an nm_optim.SGD (with tracks or symmetries), got {type(optimizer).__name__}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        self.optimizer = opt
        self.every = every
        self.next_step = 0
        self._symmetries: list[Symmetry] | None = None

    def start_at(self, step: int) -> None:
        """Log next at the first multiple of `every` at or after `step` (a resumed run)."""
        self.next_step = -(-int(step) // self.every) * self.every

    def read(self) -> tuple[int, dict[str, float]] | None:
        recorder = self.optimizer.recorder
        # cheap test first: no device sync until a record at next_step can exist
        if recorder.steps_done <= self.next_step or not len(recorder):
            return None
        record = recorder.latest(2)  # the previous step too: the exact law over the last step
        step = int(record.steps[-1])
        if step < self.next_step:
            return None
        self.next_step = (step // self.every + 1) * self.every
        if bool(record.skipped[-1]):
            return None  # GradScaler skipped it: its sums are NaN
        if self._symmetries is None:
            self._symmetries = [Symmetry.from_description(d) for d in record.meta.get("symmetries") or []]
        self.last_record = record  # for group_values(source.last_record, -1, source.symmetries)
        return step, step_scalars(record, -1, self._symmetries)

    @property
    def symmetries(self) -> list[Symmetry]:
        return self._symmetries or []
