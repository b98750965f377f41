"""Predictions of a symmetry's groups in a record: every trajectory (`predict`, `predict_arrays`,
`Prediction`) and its error against the measured one (`relative_error`, `error_floor`).

Errors: max over steps |pred - meas| / max over steps |meas|, per group; for the zero-sum bias
group of a translation symmetry the normaliser is at least the group's norm |θ_A| (`error_floor`:
a sum that cancels to ~0 holds nothing but float rounding). The same measure over the last half
of the run (`late_error`) shows late-time errors the headline hides once a quantity has decayed.
Steps where a group's statistics are non-finite although the step was not skipped (a diverged
run, a param that lost its grad) are counted (`nonfinite_steps`), never silently dropped.

Records must hold consecutive steps (``record_every == 1``): the recursion needs every step.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from nm_optim.names import HYPER_NAMES, STAT_INDEX
from nm_optim.theory.continuous import Segment, paper
from nm_optim.theory.laws import (
    Schedule,
    breaking,
    breaking_bound,
    breaking_ratio,
    check_kind,
    combine,
    exact,
    measured,
    start_steps,
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


def late_error(pred: np.ndarray, meas: np.ndarray, floor: np.ndarray | float = 0.0,
               fraction: float = 0.5) -> np.ndarray:
    """[G]: `relative_error` over the last `fraction` of the steps only, normalised by the largest
    |meas| in that window: once a quantity has decayed (weight decay), an error that is small
    against its initial value can still be large against its current one."""
    meas = np.asarray(meas)
    S = len(meas)
    lo = min(int(S * (1 - fraction)), max(S - 1, 0))
    return relative_error(np.asarray(pred)[lo:S], meas[lo:], floor)


def nonfinite_steps(meas: np.ndarray, start: np.ndarray, skipped: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """([G] count, [G] first step of a non-finite tail or -1): steps at or after a group's start
    whose measured value is not finite although the step was not skipped by GradScaler. A tail
    that never returns to finite is a diverged run."""
    S = len(meas)
    k = np.arange(S)[:, None]
    bad = ~np.isfinite(meas) & (k >= start[None, :]) & ~np.asarray(skipped, bool)[:S, None]
    count = bad.sum(axis=0)
    tail = np.full(meas.shape[1], -1)
    for g in np.flatnonzero(count):
        good = np.flatnonzero(np.isfinite(meas[:, g]) & (np.arange(S) >= start[g]))
        last = good[-1] if len(good) else start[g] - 1
        if last < S - 1:
            tail[g] = last + 1
    return count, tail


@dataclass
class Prediction:
    """The three trajectories (and the gradient-flow constant) of one symmetry's groups.

    ``measured`` is [S, G] (value before each recorded step); ``exact``, ``exact_breaking``
    (the recursion with the recorded symmetry-breaking term kept), ``paper`` and
    ``gradient_flow`` are [S+1, G] (their last row predicts the value after the last step);
    ``time`` [S+1] is the continuous time of the paper curve. Every group starts at its first
    stepped step with finite statistics (``start``; the predictions are NaN before it)."""

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
    exact_breaking: np.ndarray | None = None  # [S+1, G] exact with the recorded breaking term kept
    start: np.ndarray | None = None  # [G] first step of each group (`laws.start_steps`)

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
    def exact_breaking_error(self) -> np.ndarray:
        """[G] the error of the recursion with the measured symmetry-breaking term kept: float
        rounding only (the rest of `exact_error` is the breaking, e.g. BatchNorm's eps)."""
        if self.exact_breaking is None:
            return np.full(self.num_groups, np.nan)
        return relative_error(self.exact_breaking, self.measured, self.floor)

    @property
    def paper_error(self) -> np.ndarray:
        return relative_error(self.paper, self.measured, self.floor)

    @property
    def paper_late_error(self) -> np.ndarray:
        """[G] the paper's error over the last half of the run (`late_error`)."""
        return late_error(self.paper, self.measured, self.floor)

    @property
    def exact_late_error(self) -> np.ndarray:
        return late_error(self.exact, self.measured, self.floor)

    @property
    def paper_valid(self) -> bool:
        """Whether the paper's continuous forms' assumptions hold on every segment (h·γ, h·ω, η·λ
        small: `Segment.valid`)."""
        return all(s.valid for s in self.segments)

    @property
    def paper_caveats(self) -> list[str]:
        return [s.caveat for s in self.segments if s.caveat]

    @property
    def nonfinite(self) -> tuple[np.ndarray, np.ndarray]:
        """([G] count, [G] diverged-at step or -1): see `nonfinite_steps`."""
        start = self.start if self.start is not None else np.zeros(self.num_groups, int)
        skipped = self.schedule.skipped if self.schedule is not None else np.zeros(len(self.measured), bool)
        return nonfinite_steps(self.measured, start, skipped)

    @property
    def gradient_flow_error(self) -> np.ndarray:
        """[G] how far the run is from conservation under gradient flow (the paper's
        section 4) in the same measure."""
        return relative_error(self.gradient_flow, self.measured, self.floor)


def error_floor(kind: str, stats: Mapping[str, np.ndarray] | np.ndarray, groups: Any = None) -> np.ndarray:
    """[G]: the floor of the error's normaliser, max_k |θ_A| for the translation groups listed in
    `groups` (indices or a [G] bool mask; None: every group), 0 elsewhere. Only a group whose sum
    cancels to ~0 needs it — the classifier's bias, one `all` group whose softmax gradient sums
    to zero, so Σb stays at its initial value — which carries only the float rounding of its
    elements, ~ε|θ_A| per step: against max_k |Σθ_A| that reads as an error of order 1. A
    weight column's sum is not small, and flooring it would hide its error. Scale and rescale:
    none."""
    s = combine(kind, stats)
    G = s.shape[1]
    if kind != "translation":
        return np.zeros(G)
    mask = np.ones(G, bool) if groups is None else np.zeros(G, bool)
    if groups is not None:
        groups = np.asarray(groups)
        mask[groups if groups.dtype == bool else groups.astype(int)] = True
    with np.errstate(invalid="ignore"):
        pp = s[..., STAT_INDEX["pp"]]
        norm = np.sqrt(np.nanmax(pp, axis=0)) if len(pp) and np.isfinite(pp).any() else np.zeros(G)
    return np.where(mask, np.nan_to_num(norm), 0.0)


def predict_arrays(kind: str, stats: Mapping[str, np.ndarray] | np.ndarray, schedule: Schedule,
                   *, name: str = "", steps: np.ndarray | None = None, group_size: int | None = None,
                   floor_groups: Any = (), start: str = "consistent") -> Prediction:
    """All trajectories of one symmetry from its role statistics (role -> [S, G, 9]; a bare array
    means role "A") and its schedule: the array-level entry point, needing no Symmetry object.
    `floor_groups`: the translation groups whose error is measured against |θ_A| (the zero-sum
    bias; see `error_floor`); `start`: the paper curve's initial velocity (`continuous.paper`)."""
    check_kind(kind)
    s = combine(kind, stats)
    roles = stats if isinstance(stats, Mapping) else s
    values, time, segments, reason = paper(kind, s, schedule, start=start)
    return Prediction(
        name=name or kind, kind=kind,
        steps=np.arange(s.shape[0]) if steps is None else np.asarray(steps),
        time=time, measured=measured(kind, s), exact=exact(kind, s, schedule), paper=values,
        gradient_flow=_conserved(kind, s, schedule), breaking=breaking(kind, s),
        breaking_bound=breaking_bound(kind, roles, group_size),
        segments=segments, paper_reason=reason, schedule=schedule,
        floor=error_floor(kind, s, floor_groups),
        exact_breaking=exact(kind, s, schedule, vanishing=False), start=start_steps(s, schedule),
    )


def _conserved(kind: str, s: np.ndarray, schedule: Schedule) -> np.ndarray:
    """`continuous.gradient_flow` (the initial value, constant), each group from its first valid
    step (NaN before it)."""
    m = measured(kind, s)
    start = start_steps(s, schedule)
    S, G = m.shape
    first = np.array([m[start[g], g] if start[g] < S else np.nan for g in range(G)])
    out = np.broadcast_to(first, (S + 1, G)).copy()
    out[np.arange(S + 1)[:, None] < start[None, :]] = np.nan
    return out


def check_consecutive(record: RecordLike) -> None:
    """The recursion needs every step: raise ValueError unless the record's steps are consecutive."""
    every = record.meta.get("record_every", 1)
    if every != 1:
        raise ValueError(
            f"the theory needs every step recorded, but this record kept one step in {every} "
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


def bias_groups(symmetry: Any) -> list[int]:
    """The groups of a translation symmetry formed by an `all` member (the classifier's bias)."""
    if getattr(symmetry, "kind", None) != "translation":
        return []
    offsets = getattr(symmetry, "_offsets", None) or [0] * len(getattr(symmetry, "members", ()))
    return [int(off) for m, off in zip(getattr(symmetry, "members", ()), offsets) if getattr(m, "axis", None) == "all"]


def predict(record: RecordLike, symmetry: Any, *, start: str = "consistent") -> Prediction:
    """measured, exact, paper and gradient-flow trajectories of every group of `symmetry` (an
    nm_optim.symmetry.Symmetry, or anything with kind, name, group_stats, hyper, first)."""
    check_consecutive(record)
    return predict_arrays(symmetry.kind, symmetry.group_stats(record), schedule_of(symmetry, record),
                          name=symmetry.name, steps=record.steps, group_size=_group_size(symmetry),
                          floor_groups=bias_groups(symmetry), start=start)


def symmetries_of(record: RecordLike) -> list[Any]:
    """The symmetries described in record.meta["symmetries"], rebuilt without the model."""
    from nm_optim.symmetry import symmetries_from_record

    return symmetries_from_record(record)
