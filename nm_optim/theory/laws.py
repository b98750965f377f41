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
    GradScaler-skipped steps and ungraded params (nothing changes) and any per-step schedule of
    every hyper-parameter. Its error against ``measured`` is float rounding plus genuine symmetry
    breaking (BatchNorm's eps, for one).

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
def exact(kind: str, stats: Mapping[str, np.ndarray] | np.ndarray, schedule: Schedule,
          vanishing: bool = True) -> np.ndarray:
    """The exact discrete prediction of the measured quantity, [S+1, G]: entry k is the value
    before step k (entry 0 is the record's; entry S the prediction after the last step).

    `vanishing=False` keeps the recorded symmetry-breaking term (Σg or Σpg) as well: the
    recursion then reproduces the record to rounding, and the difference between the two
    settings is the effect of the symmetry breaking alone (a diagnostic)."""
    s = combine(kind, stats)
    if len(schedule) != s.shape[0]:
        raise ValueError(f"schedule has {len(schedule)} steps, statistics {s.shape[0]}")
    S, G, _ = s.shape
    out = np.empty((S + 1, G))
    if S == 0:
        return out
    c = lambda name: s[:, :, STAT_INDEX[name]]
    ok = np.isfinite(s).all(axis=2)  # a group without a grad this step (NaN stats) did not move
    all_ok = ok.all(axis=1)
    co = _coefficients(schedule)
    coef = [tuple(float(co[n][k]) for n in ("lr", "wd", "a", "b", "e", "f")) for k in range(S)]
    if kind == "translation":
        p, v = c("p")[0].copy(), c("v")[0].copy()
        g = c("g") if not vanishing else np.zeros((S, G))
        out[0] = p
        for k in range(S):
            if not schedule.skipped[k]:
                lr, wd, a, b, e, f = coef[k]
                d = g[k] + wd * p
                v1 = a * v + b * d
                u = e * d + f * v1
                p1 = p - lr * u
                if co["nobuf"][k]:
                    v1 = np.zeros_like(v1)
                if all_ok[k]:
                    p, v = p1, v1
                else:
                    p, v = np.where(ok[k], p1, p), np.where(ok[k], v1, v)
            out[k + 1] = p
        return out
    pp, pv, vv = c("pp")[0].copy(), c("pv")[0].copy(), c("vv")[0].copy()
    gg, gv = c("gg"), c("gv")
    pg = c("pg") if not vanishing else np.zeros((S, G))
    out[0] = pp
    for k in range(S):
        if not schedule.skipped[k]:
            lr, wd, a, b, e, f = coef[k]
            pd = pg[k] + wd * pp
            dd = gg[k] + 2 * wd * pg[k] + wd * wd * pp
            vd = gv[k] + wd * pv
            pv1 = a * pv + b * pd  # Σ p v'
            vv1 = a * a * vv + 2 * a * b * vd + b * b * dd  # Σ v'²
            dv1 = a * vd + b * dd  # Σ d v'
            pu = e * pd + f * pv1
            uu = e * e * dd + 2 * e * f * dv1 + f * f * vv1
            uv1 = e * dv1 + f * vv1
            pp_next = pp - 2 * lr * pu + lr * lr * uu
            pv_next = pv1 - lr * uv1  # Σ p' v'
            if co["nobuf"][k]:
                pv_next, vv1 = np.zeros_like(pv_next), np.zeros_like(vv1)
            if all_ok[k]:
                pp, pv, vv = pp_next, pv_next, vv1
            else:
                live = ok[k]
                pp, pv, vv = np.where(live, pp_next, pp), np.where(live, pv_next, pv), np.where(live, vv1, vv)
        out[k + 1] = pp
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
