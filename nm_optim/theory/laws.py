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
    momentum-0 steps, and any per-step schedule of every hyper-parameter. Its error against
    ``measured`` is float rounding plus genuine symmetry breaking (BatchNorm's eps, for one).

Numpy only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from nm_optim.names import HYPER_NAMES, KINDS, ROLES, STAT_INDEX, STAT_NAMES

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
def start_steps(stats: np.ndarray, schedule: Schedule) -> np.ndarray:
    """[G] the first step at which each group was stepped with finite statistics (its prediction
    starts there, from the recorded value); S where it never was. A GradScaler skip or a param
    without a grad (NaN statistics) before it are simply not part of the group's trajectory."""
    S, G = stats.shape[:2]
    ok = np.isfinite(stats).all(axis=2) & ~np.asarray(schedule.skipped, bool)[:, None]
    return np.where(ok.any(axis=0), np.argmax(ok, axis=0), S) if S else np.zeros(G, int)


def exact(kind: str, stats: Mapping[str, np.ndarray] | np.ndarray, schedule: Schedule,
          vanishing: bool = True) -> np.ndarray:
    """The exact discrete prediction of the measured quantity, [S+1, G]: entry k is the value
    before step k (entry S the prediction after the last step). Each group starts at its first
    stepped step with finite statistics (`start_steps`; NaN before it) from the record's values
    there.

    While momentum is 0 torch keeps the (stale) buffer and resumes with it when momentum returns
    (without creating a new one): at that step the buffer state (Σv, or Σpv and Σv²) is re-seeded
    from the record, which holds the stale buffer's sums (without momentum the kernels see v = 0).

    `vanishing=False` keeps the recorded symmetry-breaking term (Σg or Σpg) as well: the
    recursion then reproduces the record to rounding, and the difference between the two
    settings is the effect of the symmetry breaking alone (a diagnostic)."""
    s = combine(kind, stats)
    if len(schedule) != s.shape[0]:
        raise ValueError(f"schedule has {len(schedule)} steps, statistics {s.shape[0]}")
    S, G, _ = s.shape
    out = np.full((S + 1, G), np.nan)
    if S == 0:
        return out
    c = lambda name: s[:, :, STAT_INDEX[name]]
    ok = np.isfinite(s).all(axis=2) & ~schedule.skipped[:, None]  # groups stepped with finite sums
    start = start_steps(s, schedule)
    co = _coefficients(schedule)
    coef = [tuple(float(co[n][k]) for n in ("lr", "wd", "a", "b", "e", "f")) for k in range(S)]
    translation = kind == "translation"
    names = ("p", "v") if translation else ("pp", "pv", "vv")
    state = [np.full(G, np.nan) for _ in names]
    prev_nobuf = np.zeros(G, bool)  # the group's last step ran without momentum (stale buffer kept)
    g = c("g") if not vanishing else np.zeros((S, G))
    pg = c("pg") if not vanishing else np.zeros((S, G))
    gg, gv = c("gg"), c("gv")
    for k in range(S):
        if not schedule.skipped[k]:
            lr, wd, a, b, e, f = coef[k]
            new = start == k
            # Seed from the record: a group's first step, and the buffer torch resumes after
            # momentum-0 steps (the record holds its sums; the recursion carried v = 0 there).
            seed = new | (prev_nobuf & ok[k] & (not co["nobuf"][k]) & (not schedule.first[k]))
            if seed.any():
                for i, n in enumerate(names):
                    state[i] = np.where(seed, c(n)[k], state[i])
                out[k, new] = state[0][new]
            b_k = b
            if new.any() and not co["nobuf"][k] and not schedule.first[k]:
                # A group whose param first got a grad here created its buffer now (recorded v = 0).
                fresh = new & (c("vv")[k] == 0)
                if fresh.any():
                    b_k = np.where(fresh, 1.0, b)
            if translation:
                p, v = state
                d = g[k] + wd * p
                v1 = a * v + b_k * d
                u = e * d + f * v1
                nxt = [p - lr * u, v1]
            else:
                pp, pv, vv = state
                pd = pg[k] + wd * pp
                dd = gg[k] + 2 * wd * pg[k] + wd * wd * pp
                vd = gv[k] + wd * pv
                pv1 = a * pv + b_k * pd  # Σ p v'
                vv1 = a * a * vv + 2 * a * b_k * vd + b_k * b_k * dd  # Σ v'²
                dv1 = a * vd + b_k * dd  # Σ d v'
                pu = e * pd + f * pv1
                uu = e * e * dd + 2 * e * f * dv1 + f * f * vv1
                uv1 = e * dv1 + f * vv1
                nxt = [pp - 2 * lr * pu + lr * lr * uu, pv1 - lr * uv1, vv1]  # Σp'², Σp'v', Σv'²
            if co["nobuf"][k]:
                nxt[1:] = [np.zeros(G) for _ in nxt[1:]]
            live = ok[k]
            state = [np.where(live, n1, n0) for n1, n0 in zip(nxt, state)]
            prev_nobuf = np.where(live, bool(co["nobuf"][k]), prev_nobuf)
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
