"""Predictions of a symmetry's groups in a record: every trajectory (`predict`, `predict_arrays`,
`Prediction`) and its error against the measured one.

Errors (`errors`): per group, max over steps |pred - meas| divided by the quantity's natural
scale at that step (translation √n·|θ_A|, scale |θ_A|², rescale |θ_A1|² + |θ_A2|²), over the
whole run and over its last tenth (``*_late_error``). `relative_error` and `late_error` (the
normaliser max over steps |meas|, floored by `error_floor`) are the measure of earlier versions,
kept for callers. Steps where a group's statistics are non-finite although the step was not skipped (a diverged
run, a param that lost its grad) are counted (`nonfinite_steps`), never silently dropped.

Records must hold consecutive steps (``record_every == 1``): the recursion needs every step.
"""

from __future__ import annotations

import math

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from nm_optim.names import HYPER_NAMES, STAT_INDEX
from nm_optim.theory.continuous import Segment, paper
from nm_optim.theory.errors import LATE_FRACTION, natural_scale, scaled_error, step_error
from nm_optim.theory.laws import (
    Part,
    Schedule,
    breaking,
    breaking_bound,
    breaking_ratio,
    check_kind,
    combine,
    exact_parts,
    measured,
    reference_parts,
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
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a group without a prediction (NaN) stays NaN
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
    stepped step with finite statistics (``start``; the predictions are NaN before it).

    Members in param groups with different hyper-parameters (`laws.exact_parts`): ``mixed`` [G]
    marks the groups whose members differ, ``mixed_note`` says how; the exact laws step every
    member with its own, and ``exact_mismatch_dropped`` is the exact law without the measured
    term that the difference leaves (Σ η_m⟨θ_m, g_m⟩ ≠ 0), for its size (`mismatch_effect`).
    The paper's forms assume one (η, β, λ) per group: NaN for mixed groups (``paper_mixed``
    counts them; no group left: ``paper_reason`` says why), each other group drawn with its own
    members' hyper-parameters; ``time`` is then that of the part holding most groups."""

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
    mixed: np.ndarray | None = None  # [G] the group's members have different hyper-parameters
    mixed_note: str | None = None  # which differ, between which members, and what the laws do
    exact_mismatch_dropped: np.ndarray | None = None  # [S+1, G] exact without the hyper-mismatch term
    scale: np.ndarray | None = None  # [S, G] the quantity's natural scale at each step (`errors.natural_scale`)

    def __post_init__(self) -> None:
        if self.mixed is None:
            self.mixed = np.zeros(self.measured.shape[1], bool)
        if self.scale is None:  # built by hand without one: the largest |measured| (and the floor)
            with np.errstate(invalid="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                top = np.nanmax(np.abs(self.measured), axis=0) if len(self.measured) else np.zeros(self.num_groups)
            self.scale = np.broadcast_to(np.maximum(top, self.floor), self.measured.shape).copy()

    def residual(self, theory: str = "exact") -> np.ndarray:
        """[S, G]: (prediction − measured) / natural scale at every step, for `theory` "exact",
        "exact_breaking", "paper" or "gradient_flow": the curve whose maximum is the error."""
        if theory not in ("exact", "exact_breaking", "paper", "gradient_flow"):
            raise ValueError(f"theory must be 'exact', 'exact_breaking', 'paper' or 'gradient_flow', got {theory!r}")
        curve = getattr(self, theory)
        if curve is None:
            return np.full(self.measured.shape, np.nan)
        return step_error(curve, self.measured, self.scale)

    def _error(self, curve: np.ndarray | None, late: bool = False) -> np.ndarray:
        if curve is None:
            return np.full(self.num_groups, np.nan)
        return scaled_error(curve, self.measured, self.scale, last=LATE_FRACTION if late else None)

    @property
    def num_groups(self) -> int:
        return self.measured.shape[1]

    @property
    def paper_applies(self) -> bool:
        return self.paper_reason is None

    @property
    def exact_error(self) -> np.ndarray:
        """[G] max_k |exact - measured| / natural scale at step k (`errors.scaled_error`)."""
        return self._error(self.exact)

    @property
    def breaking_ratio(self) -> np.ndarray:
        """[G] how badly the symmetry is broken: max_k |⟨g, generator⟩| / max_k |g||generator|
        (BatchNorm's eps shows here for scale; float rounding of the gradient for the others)."""
        return breaking_ratio(self.breaking, self.breaking_bound)

    @property
    def exact_breaking_error(self) -> np.ndarray:
        """[G] the error of the recursion with the measured symmetry-breaking term kept: float
        rounding only (the rest of `exact_error` is the breaking, e.g. BatchNorm's eps)."""
        return self._error(self.exact_breaking)

    @property
    def paper_error(self) -> np.ndarray:
        """[G] max_k |paper - measured| / natural scale at step k."""
        return self._error(self.paper)

    @property
    def paper_late_error(self) -> np.ndarray:
        """[G] the paper's error over the last tenth of the run (`errors.LATE_FRACTION`): where a
        slow drift of the continuous form from the discrete steps has grown largest."""
        return self._error(self.paper, late=True)

    @property
    def exact_late_error(self) -> np.ndarray:
        """[G] the exact recursion's error over the last tenth of the run."""
        return self._error(self.exact, late=True)

    @property
    def paper_valid(self) -> bool:
        """Whether the paper's continuous forms' assumptions hold on every segment (h·γ, h·ω, η·λ
        small: `Segment.valid`) and every group's members share one set of hyper-parameters."""
        return all(s.valid for s in self.segments) and not self.mixed.any()

    @property
    def paper_mixed(self) -> int:
        """How many groups have no paper curve because their members' hyper-parameters differ."""
        return int(self.mixed.sum())

    @property
    def paper_caveats(self) -> list[str]:
        out = [s.caveat for s in self.segments if s.caveat]
        if self.mixed.any():
            out.append(f"{self.paper_mixed} of {self.num_groups} groups have members with different "
                       "hyper-parameters: the single-(η, β, λ) continuous form is not their dynamics (not drawn)")
        return out

    @property
    def mismatch_effect(self) -> np.ndarray:
        """[G] max_k |exact without the hyper-mismatch term - exact| / natural scale at step k:
        what dropping the measured Σ η_m⟨θ_m, g_m⟩ (and the other per-member terms of ⟨θ, g⟩)
        would cost; 0 where the members share their hyper-parameters."""
        if self.exact_mismatch_dropped is None:
            return np.zeros(self.num_groups)
        S = len(self.measured)
        diff = np.asarray(self.exact_mismatch_dropped)[:S] - np.asarray(self.exact)[:S]
        return scaled_error(self.measured + diff, self.measured, self.scale)

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
        return self._error(self.gradient_flow)


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
    bias; see `error_floor`); `start`: the paper curve's initial velocity (`continuous.paper`).
    Members with different hyper-parameters: `predict_parts`."""
    return predict_parts(kind, [Part(stats, schedule, name)], name=name, steps=steps, group_size=group_size,
                         floor_groups=floor_groups, start=start)


def predict_parts(kind: str, parts: list[Part], *, name: str = "", steps: np.ndarray | None = None,
                  group_size: int | None = None, floor_groups: Any = (), start: str = "consistent",
                  note: str | None = None) -> Prediction:
    """`predict_arrays` for a symmetry whose members sit in param groups with different
    hyper-parameters: one `laws.Part` per set (`parts_of` builds them from a record). `note`
    says how the parts differ (``Prediction.mixed_note``)."""
    check_kind(kind)
    if not parts:
        raise ValueError("predict_parts needs at least one Part")
    roles = [p.stats if isinstance(p.stats, Mapping) else {"A": combine(kind, p.stats)} for p in parts]
    if len(parts) == 1:
        total = roles[0]
    else:
        total = {r: sum(np.asarray(x[r], np.float64) for x in roles) for r in roles[0]}
    s = combine(kind, total)
    schedule = parts[0].schedule
    G = s.shape[1]
    if len(parts) > 1:
        ref, present = reference_parts(kind, parts)
        mixed = present.sum(axis=0) > 1
    else:
        ref, mixed = np.zeros(G, int), np.zeros(G, bool)
    # the paper's forms per set of groups sharing one set of hyper-parameters; mixed groups: none
    values = np.full((s.shape[0] + 1, G), np.nan)
    counts = np.bincount(ref[~mixed], minlength=len(parts))
    main = int(np.argmax(counts)) if counts.any() else int(np.bincount(ref, minlength=len(parts)).argmax())
    time, segments, reasons = None, [], []
    for j in sorted(set(ref[~mixed].tolist()) | {main}, key=lambda j: j != main):
        cols = np.flatnonzero((ref == j) & ~mixed)
        v, t, segs, why = paper(kind, s[:, cols], parts[j].schedule, start=start)
        values[:, cols] = v
        if j == main:
            time = t
        for seg in segs:
            seg.part = parts[j].name if len(parts) > 1 else None
        segments += segs
        if why and why not in reasons:
            reasons.append(why)
    if mixed.all():
        reasons.append("every group has members with different hyper-parameters (see mixed): the paper's forms "
                       "assume one (η, β, λ)")
    return Prediction(
        name=name or kind, kind=kind,
        steps=np.arange(s.shape[0]) if steps is None else np.asarray(steps),
        time=time, measured=measured(kind, s), exact=exact_parts(kind, parts), paper=values,
        gradient_flow=_conserved(kind, s, schedule), breaking=breaking(kind, s),
        breaking_bound=breaking_bound(kind, total, group_size),
        segments=segments, paper_reason="; ".join(reasons) or None, schedule=schedule,
        floor=error_floor(kind, s, floor_groups),
        exact_breaking=exact_parts(kind, parts, vanishing=False), start=start_steps(s, schedule, kind),
        mixed=mixed, mixed_note=note if mixed.any() else None,
        exact_mismatch_dropped=exact_parts(kind, parts, mismatch=False) if len(parts) > 1 else None,
        scale=natural_scale(kind, total, group_size),
    )


def _conserved(kind: str, s: np.ndarray, schedule: Schedule) -> np.ndarray:
    """`continuous.gradient_flow` (the initial value, constant), each group from its first valid
    step (NaN before it)."""
    m = measured(kind, s)
    start = start_steps(s, schedule, kind)
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
    """The Schedule of a symmetry's members in a record (via Symmetry.hyper / Symmetry.first),
    when they share one set of hyper-parameters (ValueError otherwise: `parts_of`)."""
    hyper = symmetry.hyper(record)
    return Schedule(*(np.asarray(hyper[n]) for n in HYPER_NAMES),
                    first=np.asarray(symmetry.first(record), bool),
                    skipped=np.asarray(record.skipped, bool))


def parts_of(symmetry: Any, record: RecordLike) -> tuple[list[Part], str | None]:
    """The symmetry's members split by their hyper-parameters, one `laws.Part` per set (param
    groups with equal values at every step share one), and a note on how the sets differ (None
    for one set). A symmetry without `param_groups` (a duck type) is one part."""
    skipped = np.asarray(record.skipped, bool)
    groups = symmetry.param_groups(record) if hasattr(symmetry, "param_groups") else [None]
    hyper = {g: symmetry.hyper(record, g) if g is not None else symmetry.hyper(record) for g in groups}
    sets: list[list[Any]] = []
    for g in groups:
        same = next((s for s in sets if all(np.array_equal(hyper[s[0]][n], hyper[g][n], equal_nan=True)
                                            for n in HYPER_NAMES)), None)
        if same is None:
            sets.append([g])
        else:
            same.append(g)
    if len(sets) == 1:  # one set of hyper-parameters: the whole symmetry, summed as before
        return [Part(symmetry.group_stats(record), schedule_of(symmetry, record), symmetry.name)], None
    names = {g: [m.name for m in symmetry.members if record.tracks[_track_of(record, m)].get("param_group", 0) == g]
             for g in groups}
    parts = []
    for gs in sets:
        stats = [symmetry.group_stats(record, g) for g in gs]
        first = np.any([symmetry.first(record, g) for g in gs], axis=0)
        h = hyper[gs[0]]
        label = "param group" + ("s " if len(gs) > 1 else " ") + ", ".join(map(str, gs))
        parts.append(Part({r: sum(x[r] for x in stats) for r in stats[0]},
                          Schedule(*(np.asarray(h[n]) for n in HYPER_NAMES), first=first, skipped=skipped),
                          f"{label} ({', '.join(n for g in gs for n in names[g])})"))
    differ = [n for n in HYPER_NAMES
              if not all(np.array_equal(hyper[s[0]][n], hyper[sets[0][0]][n], equal_nan=True) for s in sets)]
    weighted = [n for n in differ if n != "weight_decay"]
    note = (f"members in param groups with different {', '.join(differ)}: "
            + "; ".join(p.name for p in parts) + ". The exact laws step each member with its own")
    if weighted:
        note += (f"; with different {' or '.join(weighted)} the symmetry does not make Σ η_m⟨θ_m, g_m⟩ vanish: "
                 "kept, measured (real breaking by the optimizer, see mismatch_effect)")
    else:
        note += " (each member's decay λ_m|θ_m|² from its recorded |θ_m|²)"
    return parts, note


def _track_of(record: RecordLike, member: Any) -> int:
    return next(i for i, t in enumerate(record.tracks) if t["name"] == member.track)


def _group_size(symmetry: Any) -> int | None:
    """Elements per translation group: the classifier's number of outputs (weight rows)."""
    if getattr(symmetry, "kind", None) != "translation":
        return None
    for m in getattr(symmetry, "members", ()):
        shape = getattr(m, "shape", None) or (tuple(m.param.shape) if getattr(m, "param", None) is not None else None)
        if shape and getattr(m, "axis", None) == "rows":  # every row its own group (a key bias)
            return int(math.prod(shape[1:])) if len(shape) > 1 else 1
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
    parts, note = parts_of(symmetry, record)
    return predict_parts(symmetry.kind, parts, name=symmetry.name, steps=record.steps,
                         group_size=_group_size(symmetry), floor_groups=bias_groups(symmetry), start=start, note=note)


def symmetries_of(record: RecordLike) -> list[Any]:
    """The symmetries described in record.meta["symmetries"], rebuilt without the model."""
    from nm_optim.symmetry import symmetries_from_record

    return symmetries_from_record(record)
