"""The conservation laws as exact discrete dynamics: the quantity each symmetry conserves, the term
that breaks it, and the one-step recursion of torch's SGD on the recorded sums.

For every group of a symmetry:

``measured``
    The conserved-or-not quantity itself, read from the record: translation ``Σp``; scale ``Σp²``;
    rescale ``Σp²(A1) - Σp²(A2)`` (incoming minus outgoing weights of a hidden unit).

``exact``
    The discrete one-step recursion (docs/architecture.md, "The theory") with the symmetry's
    vanishing term set to zero (translation ``Σg = 0``; scale ``Σpg = 0``; rescale
    ``pg(A1) - pg(A2) = 0``). The state (``Σp, Σv`` or ``Σp², Σpv, Σv²``) is carried by the
    recursion from the first recorded step; only the data-driven terms ``Σg², Σg·v`` come from the
    record. It follows torch's SGD exactly: coupled weight decay, momentum, dampening, nesterov,
    the first-step buffer rule (``v' = d``, no dampening), ``momentum == 0`` (no buffer),
    GradScaler-skipped steps and ungraded params (nothing changes; a group starts at its first
    step with finite statistics, `start_steps`), the stale buffer torch resumes after
    momentum-0 steps, any per-step schedule of every hyper-parameter (lr = 0 included), and
    members in param groups with their own hyper-parameters (`exact_parts`). Its error against
    ``measured`` is float rounding plus genuine symmetry breaking (BatchNorm's eps, for one).

Numpy only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from nm_optim.names import HYPER_NAMES, KINDS, LAW_SUMS, ROLES, STAT_INDEX, STAT_NAMES, sum_set

# The term each symmetry makes vanish, in the combined (rescale: A1 - A2) statistics.
VANISHING = {"translation": "g", "scale": "pg", "rescale": "pg"}


# ------------------------------------------------------------------------------------------------
# Inputs: per-step hyper-parameters and the combined statistics of a symmetry's groups
# ------------------------------------------------------------------------------------------------
@dataclass
class Schedule:
    """The hyper-parameters of every recorded step ([S] arrays) and its step flags.

    ``first[k]``: the members created their momentum buffer at step k (``v' = d``, no dampening).
    ``skipped[k]``: GradScaler found an inf/nan; nothing was stepped.
    """

    lr: np.ndarray
    momentum: np.ndarray
    dampening: np.ndarray
    weight_decay: np.ndarray
    nesterov: np.ndarray
    first: np.ndarray
    skipped: np.ndarray

    def __post_init__(self) -> None:
        n = None
        for name in (*HYPER_NAMES, "first", "skipped"):
            kind = bool if name in ("nesterov", "first", "skipped") else np.float64
            a = np.asarray(getattr(self, name))
            if a.ndim != 1:
                raise ValueError(f"Schedule.{name} must be a 1-D array over steps, got shape {a.shape}")
            if n is None:
                n = len(a)
            elif len(a) != n:
                raise ValueError(f"Schedule.{name} has {len(a)} steps, expected {n} (as Schedule.lr)")
            setattr(self, name, a.astype(kind))
        if np.any(~np.isfinite(self.lr)):
            raise ValueError("Schedule.lr must be finite at every step")

    def __len__(self) -> int:
        return len(self.lr)

    @classmethod
    def constant(cls, steps: int, lr: float, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, first_step: bool = True) -> Schedule:
        """Constant hyper-parameters for `steps` steps, training starting at step 0 (its first
        momentum step) when `first_step`."""
        first = np.zeros(steps, bool)
        if first_step and momentum != 0 and steps:
            first[0] = True
        full = lambda x: np.full(steps, x, dtype=np.float64)
        return cls(full(lr), full(momentum), full(dampening), full(weight_decay), full(float(nesterov)),
                   first, np.zeros(steps, bool))

    def segments(self) -> list[tuple[int, int]]:
        """[start, stop) step ranges of constant hyper-parameters (skipped steps ignored)."""
        keys = np.stack([getattr(self, n).astype(np.float64) for n in HYPER_NAMES], 1)
        out, start = [], 0
        for k in range(1, len(self)):
            if not np.array_equal(keys[k], keys[k - 1]):
                out.append((start, k))
                start = k
        if len(self):
            out.append((start, len(self)))
        return out


def combine(kind: str, stats: Mapping[str, np.ndarray] | np.ndarray) -> np.ndarray:
    """The statistics the theory of `kind` runs on, [S, G, 9]: the role "A" for translation and
    scale; ``A1 - A2`` for rescale (every identity used is linear in the 9 sums, so the difference
    of the two roles obeys the same recursion as one group, with ``pg(A1) - pg(A2)`` vanishing).
    A bare array is taken as already combined."""
    check_kind(kind)
    if isinstance(stats, np.ndarray):
        out = stats
    else:
        missing = [r for r in ROLES[kind] if r not in stats]
        if missing:
            raise ValueError(f"{kind} statistics need roles {ROLES[kind]}, missing {missing}")
        out = stats["A"] if kind != "rescale" else np.asarray(stats["A1"], np.float64) - np.asarray(stats["A2"], np.float64)
        if kind == "rescale" and np.shape(stats["A1"]) != np.shape(stats["A2"]):
            raise ValueError(f"rescale roles differ in shape: A1 {np.shape(stats['A1'])}, A2 {np.shape(stats['A2'])}")
    out = np.asarray(out, dtype=np.float64)
    if out.ndim != 3 or out.shape[2] != len(STAT_NAMES):
        raise ValueError(f"{kind} statistics must be [steps, groups, {len(STAT_NAMES)}], got {out.shape}")
    return out


def measured(kind: str, stats: Mapping[str, np.ndarray] | np.ndarray) -> np.ndarray:
    """[S, G]: translation Σp; scale Σp²; rescale Σp²(A1) - Σp²(A2) (pre-step values)."""
    s = combine(kind, stats)
    return s[..., STAT_INDEX["p"]] if kind == "translation" else s[..., STAT_INDEX["pp"]]


def breaking(kind: str, stats: Mapping[str, np.ndarray] | np.ndarray) -> np.ndarray:
    """[S, G]: the term the symmetry says vanishes, as recorded (translation Σg, scale Σp·g,
    rescale pg(A1) - pg(A2)). Nonzero values are real symmetry breaking (BatchNorm's eps, float
    rounding of the gradient)."""
    return combine(kind, stats)[..., STAT_INDEX[VANISHING[kind]]]


def breaking_bound(kind: str, stats: Mapping[str, np.ndarray] | np.ndarray,
                   group_size: int | None = None) -> np.ndarray:
    """[S, G]: the Cauchy-Schwarz bound |g| |generator| of the breaking term (translation
    sqrt(group_size)·|g|, with group_size the classifier's number of outputs, 1 when not given;
    scale |θ||g|; rescale |θ_A1||g_A1| + |θ_A2||g_A2|). breaking / bound is the cosine between
    the gradient and the symmetry's generator: 0 for an exact symmetry."""
    check_kind(kind)
    norm = lambda s: np.sqrt(np.abs(s[..., STAT_INDEX["pp"]] * s[..., STAT_INDEX["gg"]]))
    if kind == "translation":
        s = combine(kind, stats)
        return np.sqrt((1.0 if group_size is None else float(group_size)) * np.abs(s[..., STAT_INDEX["gg"]]))
    if kind == "scale":
        return norm(combine(kind, stats))
    if not isinstance(stats, Mapping) or "A1" not in stats:  # combined already: the roles are gone
        return np.full(combine(kind, stats).shape[:2], np.nan)
    return norm(np.asarray(stats["A1"])) + norm(np.asarray(stats["A2"]))


def breaking_ratio(breaking_term: np.ndarray, bound: np.ndarray) -> np.ndarray:
    """[G]: max over steps |breaking| / max over steps of its bound (the same normalisation as
    `relative_error`: per-step cosines blow up on rounding once a gradient is tiny)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        num = np.nanmax(np.abs(breaking_term), axis=0) if len(bound) else np.zeros(bound.shape[1:])
        den = np.nanmax(bound, axis=0) if len(bound) else np.zeros(bound.shape[1:])
        return np.where(den > 0, num / np.where(den > 0, den, 1), num)


def check_kind(kind: str) -> None:
    """ValueError unless `kind` is one of the symmetry KINDS."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def _coefficients(s: Schedule) -> dict[str, np.ndarray]:
    """Per step [S]: lr, wd and (a, b, e, f) with v' = a v + b d and u = e d + f v' (d = g + wd p),
    which is torch's SGD: no buffer when momentum is 0 (u = d); the first momentum step copies
    d into the buffer (no dampening); nesterov adds d to momentum times the new buffer."""
    m, damp = s.momentum, s.dampening
    nobuf = m == 0
    fresh = nobuf | s.first
    nest = s.nesterov & ~nobuf
    return {
        "lr": s.lr, "wd": s.weight_decay, "nobuf": nobuf,
        "a": np.where(fresh, 0.0, m), "b": np.where(fresh, 1.0, 1.0 - damp),
        "e": np.where(nest, 1.0, 0.0), "f": np.where(nest, m, 1.0),
    }


# ------------------------------------------------------------------------------------------------
# exact: the discrete recursion
# ------------------------------------------------------------------------------------------------
def finite_sums(stats: np.ndarray, kind: str | None = None) -> np.ndarray:
    """[S, G]: whether each group's sums are finite at each step: those the law of `kind` reads
    (names.LAW_SUMS), or all 9 (kind None). A track that reduced only the sums its law needs
    holds NaN in the others (nm_optim.tracks): those say nothing of the step."""
    cols = slice(None) if kind is None else [STAT_INDEX[n] for n in LAW_SUMS[kind]]
    return np.isfinite(stats[..., cols]).all(axis=2)


def start_steps(stats: np.ndarray, schedule: Schedule, kind: str | None = None) -> np.ndarray:
    """[G] the first step at which each group was stepped with finite statistics (those the law
    of `kind` reads, all 9 if None: `finite_sums`); its prediction starts there, from the
    recorded value; S where it never was. A GradScaler skip or a param without a grad (NaN
    statistics) before it are simply not part of the group's trajectory."""
    S, G = stats.shape[:2]
    ok = finite_sums(stats, kind) & ~np.asarray(schedule.skipped, bool)[:, None]
    return np.where(ok.any(axis=0), np.argmax(ok, axis=0), S) if S else np.zeros(G, int)


@dataclass
class Part:
    """Members of a symmetry that share their hyper-parameters at every step (one optimizer param
    group, or several with equal values): their statistics (role -> [S, G, 9], or an array
    already combined; 0 in the groups where the part has no member) and their Schedule. A
    symmetry whose members all share one set is one part."""

    stats: Mapping[str, np.ndarray] | np.ndarray
    schedule: Schedule
    name: str = ""


def reference_parts(kind: str, parts: list[Part]) -> tuple[np.ndarray, np.ndarray]:
    """([G] int, [J, G] bool): for every group the part whose hyper-parameters drive the carried
    state (the one holding most of the group's |θ|², max over steps), and which parts have a
    member in the group (nonzero statistics at some step: among the set of sums the law's tracks
    reduce, names.sum_set(LAW_SUMS[kind]); the others may be NaN)."""
    cols = [STAT_INDEX[n] for n in sum_set(LAW_SUMS[kind])]
    sizes, present = [], []
    for part in parts:
        roles = part.stats if isinstance(part.stats, Mapping) else {"A": part.stats}
        arrays = [np.asarray(a, dtype=np.float64) for a in roles.values()]
        with np.errstate(invalid="ignore"):
            pp = sum(np.abs(a[..., STAT_INDEX["pp"]]) for a in arrays)
            sizes.append(np.nanmax(pp, axis=0) if len(pp) and np.isfinite(pp).any() else np.zeros(pp.shape[1]))
        present.append(np.any([np.any(a[..., cols] != 0, axis=(0, 2)) for a in arrays], axis=0))
    return np.argmax(np.nan_to_num(np.stack(sizes), nan=-1.0), axis=0), np.stack(present)


def _step(translation: bool, state: list[np.ndarray], drive: list[np.ndarray], coef: tuple[np.ndarray, ...],
          nobuf: np.ndarray) -> list[np.ndarray]:
    """One torch SGD step of the sums (docs/architecture.md, "The statistics"): state (Σp, Σv) or
    (Σp², Σpv, Σv²), drive (Σg,) or (Σpg, Σg², Σgv), coef (lr, wd, a, b, e, f) with v' = a v + b d
    and u = e d + f v'; a group without momentum keeps no buffer (its sums are 0 after the step)."""
    lr, wd, a, b, e, f = coef
    if translation:
        p, v = state
        (g,) = drive
        d = g + wd * p
        v1 = a * v + b * d
        u = e * d + f * v1
        nxt = [p - lr * u, v1]
    else:
        pp, pv, vv = state
        pg, gg, gv = drive
        pd = pg + wd * pp
        dd = gg + 2 * wd * pg + wd * wd * pp
        vd = gv + wd * pv
        pv1 = a * pv + b * pd  # Σ p v'
        vv1 = a * a * vv + 2 * a * b * vd + b * b * dd  # Σ v'²
        dv1 = a * vd + b * dd  # Σ d v'
        pu = e * pd + f * pv1
        uu = e * e * dd + 2 * e * f * dv1 + f * f * vv1
        uv1 = e * dv1 + f * vv1
        nxt = [pp - 2 * lr * pu + lr * lr * uu, pv1 - lr * uv1, vv1]  # Σp'², Σp'v', Σv'²
    nxt[1:] = [np.where(nobuf, 0.0, x) for x in nxt[1:]]
    return nxt


def exact(kind: str, stats: Mapping[str, np.ndarray] | np.ndarray, schedule: Schedule,
          vanishing: bool = True) -> np.ndarray:
    """The exact discrete prediction of the measured quantity, [S+1, G]: entry k is the value
    before step k (entry S the prediction after the last step), for members that share one
    `schedule` (`exact_parts` for members with their own). Each group starts at its first
    stepped step with finite statistics (`start_steps`; NaN before it) from the record's values
    there.

    While momentum is 0 torch keeps the (stale) buffer and resumes with it when momentum returns
    (without creating a new one): at that step the buffer state (Σv, or Σpv and Σv²) is re-seeded
    from the record, which holds the stale buffer's sums (without momentum the kernels see v = 0).

    `vanishing=False` keeps the recorded symmetry-breaking term (Σg or Σpg) as well: the
    recursion then reproduces the record to rounding, and the difference between the two
    settings is the effect of the symmetry breaking alone (a diagnostic)."""
    return exact_parts(kind, [Part(stats, schedule)], vanishing=vanishing)


def exact_parts(kind: str, parts: list[Part], vanishing: bool = True, mismatch: bool = True) -> np.ndarray:
    """`exact` for members in param groups with different hyper-parameters: torch's step per
    part, each with its own lr, momentum, dampening, weight decay and nesterov, [S+1, G].

    The state is carried for the whole group (the sums over all parts) and stepped with the
    hyper-parameters of the group's reference part (`reference_parts`); each other part adds
    what its own step does differently, ``step_j(x_j) - step_ref(x_j)`` (the step is linear in
    the sums), from the record's sums of that part: its decay ``(λ_j - λ) Σp²_j``, its own lr
    and momentum on its ``Σpv_j``, ``Σg²_j``... The symmetry makes only the sum over all members
    of ⟨θ, g⟩ (Σg for translation) vanish; where lr or momentum differ between members the
    weighted sum Σ η_m ⟨θ_m, g_m⟩ does not, and its part ``(c_j - c) ⟨θ_j, g_j⟩`` is kept,
    measured, as real breaking of the conservation law by the optimizer (`mismatch=False` drops
    it: the law as if the members shared one set, to show its effect). With one part this is
    `exact`, bit for bit.

    `vanishing=False` keeps the recorded Σg / Σpg of the whole group as well (rounding only)."""
    if not parts:
        raise ValueError("exact_parts needs at least one Part")
    check_kind(kind)
    combined = [combine(kind, p.stats) for p in parts]
    s = combined[0] if len(parts) == 1 else sum(combined[1:], combined[0])
    for p, c_j in zip(parts, combined):
        if c_j.shape != s.shape:
            raise ValueError(f"part {p.name!r} has statistics of shape {c_j.shape}, the first part {s.shape}")
        if len(p.schedule) != s.shape[0]:
            raise ValueError(f"schedule has {len(p.schedule)} steps, statistics {s.shape[0]}")
        if not np.array_equal(p.schedule.skipped, parts[0].schedule.skipped):
            raise ValueError(f"part {p.name!r}: its skipped steps differ from the first part's (GradScaler skips "
                             "a step for every param group)")
    S, G, _ = s.shape
    out = np.full((S + 1, G), np.nan)
    if S == 0:
        return out
    skipped = parts[0].schedule.skipped
    translation = kind == "translation"
    names = ("p", "v") if translation else ("pp", "pv", "vv")
    drives = ("g",) if translation else ("pg", "gg", "gv")
    vanishing_term = VANISHING[kind]
    col = lambda a, name: a[:, :, STAT_INDEX[name]]
    co = [_coefficients(p.schedule) for p in parts]
    firsts = [p.schedule.first for p in parts]
    ref = reference_parts(kind, parts)[0] if len(parts) > 1 else np.zeros(G, int)
    # [S, G] coefficients of each group's reference part
    co_ref = {n: np.stack([c[n] for c in co])[ref].T for n in co[0]}
    first_ref = np.stack(firsts)[ref].T

    def coef_at(c: dict[str, np.ndarray], first: np.ndarray, k: int, new: np.ndarray, vv: np.ndarray):
        """(lr, wd, a, b, e, f), nobuf of step k; b = 1 for a group whose param first got a grad
        here and created its buffer now (recorded v = 0)."""
        b = c["b"][k]
        fresh = new & ~c["nobuf"][k] & ~first[k] & (vv == 0)
        if fresh.any():
            b = np.where(fresh, 1.0, b)
        return (c["lr"][k], c["wd"][k], c["a"][k], b, c["e"][k], c["f"][k]), c["nobuf"][k]

    ok = finite_sums(s, kind) & ~skipped[:, None]  # groups stepped with finite sums (those the law reads)
    start = start_steps(s, parts[0].schedule, kind)
    state = [np.full(G, np.nan) for _ in names]
    prev_nobuf = np.zeros(G, bool)  # the group's last step ran without momentum (stale buffer kept)
    for k in range(S):
        if not skipped[k]:
            new = start == k
            nobuf = co_ref["nobuf"][k]
            # Seed from the record: a group's first step, and the buffer torch resumes after
            # momentum-0 steps (the record holds its sums; the recursion carried v = 0 there).
            seed = new | (prev_nobuf & ok[k] & ~nobuf & ~first_ref[k])
            if seed.any():
                for i, n in enumerate(names):
                    state[i] = np.where(seed, col(s, n)[k], state[i])
                out[k, new] = state[0][new]
            coef, _ = coef_at(co_ref, first_ref, k, new, col(s, "vv")[k])
            drive = [np.zeros(G) if n == vanishing_term and vanishing else col(s, n)[k] for n in drives]
            nxt = _step(translation, state, drive, coef, nobuf)
            if len(parts) > 1:  # what each part's own hyper-parameters do differently
                for c_j, s_j, first_j in zip(co, combined, firsts):
                    x_j = [col(s_j, n)[k] for n in names]
                    d_j = [np.zeros(G) if n == vanishing_term and not mismatch else col(s_j, n)[k] for n in drives]
                    coef_j, nobuf_j = coef_at(c_j, np.broadcast_to(first_j[:, None], (S, G)), k, new,
                                              col(s_j, "vv")[k])
                    own = _step(translation, x_j, d_j, coef_j, nobuf_j)
                    as_ref = _step(translation, x_j, d_j, coef, nobuf)
                    nxt = [n + (o - r) for n, o, r in zip(nxt, own, as_ref)]
            live = ok[k]
            state = [np.where(live, n1, n0) for n1, n0 in zip(nxt, state)]
            prev_nobuf = np.where(live, nobuf, prev_nobuf)
        out[k + 1] = state[0]
    return out


def buffer_norm_after_step(stats: np.ndarray, schedule: Schedule) -> np.ndarray:
    """[S, G]: Σ v'² of each step's post-step momentum buffer (or of the update d without
    momentum), from that step's recorded sums (every term, nothing set to zero)."""
    co = {n: v[:, None] for n, v in _coefficients(schedule).items()}
    c = lambda name: stats[:, :, STAT_INDEX[name]]
    a, b, wd = co["a"], co["b"], co["wd"]
    vd = c("gv") + wd * c("pv")
    dd = c("gg") + 2 * wd * c("pg") + wd * wd * c("pp")
    return a * a * c("vv") + 2 * a * b * vd + b * b * dd


def update_sums_after_step(stats: np.ndarray, schedule: Schedule) -> tuple[np.ndarray, np.ndarray]:
    """([S, G] Σu², [S, G] Σu·g): the squared norm of each step's update u (θ' = θ − ηu) and its
    product with the gradient, from that step's recorded sums (every term kept). For heavy-ball
    momentum u = v' (Σu² is `buffer_norm_after_step`); for nesterov u = d + βv'."""
    co = {n: v[:, None] for n, v in _coefficients(schedule).items()}
    c = lambda name: stats[:, :, STAT_INDEX[name]]
    a, b, e, f, wd = co["a"], co["b"], co["e"], co["f"], co["wd"]
    vd = c("gv") + wd * c("pv")
    dd = c("gg") + 2 * wd * c("pg") + wd * wd * c("pp")
    dg = c("gg") + wd * c("pg")
    vv1 = a * a * c("vv") + 2 * a * b * vd + b * b * dd  # Σ v'²
    dv1 = a * vd + b * dd  # Σ d v'
    gv1 = a * c("gv") + b * dg  # Σ g v'
    return e * e * dd + 2 * e * f * dv1 + f * f * vv1, e * dg + f * gv1

