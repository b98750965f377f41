"""The Neural Mechanics theory, predicted from the recorded statistics (the seed's Parts 2-4).

For every group of every symmetry the module builds three trajectories over the recorded steps:

``measured``
    The conserved-or-not quantity itself, read from the record: translation ``Σp``; scale ``Σp²``;
    rescale ``Σp²(A1) - Σp²(A2)`` (incoming minus outgoing weights of a hidden unit).

``exact``
    The discrete one-step recursion of ARCHITECTURE.md with the symmetry's vanishing term set to
    zero (translation ``Σg = 0``; scale ``Σpg = 0``; rescale ``pg(A1) - pg(A2) = 0``). The state
    (``Σp, Σv`` or ``Σp², Σpv, Σv²``) is carried by the recursion from the first recorded step;
    only the data-driven terms ``Σg², Σg·v`` come from the record. It follows torch's SGD exactly:
    coupled weight decay, momentum, dampening, nesterov, the first-step buffer rule (``v' = d``,
    no dampening), ``momentum == 0`` (no buffer), GradScaler-skipped steps and ungraded params
    (nothing changes) and any per-step schedule of every hyper-parameter. Its error against
    ``measured`` is float rounding plus genuine symmetry breaking (BatchNorm's eps, for one).

``paper``
    The seed's continuous solutions, with time ``t = Σ h`` over the steps (``h = lr`` without
    momentum, ``h = lr·(1 - dampening)`` with momentum; ``t = lr·k`` for a constant lr):

    * no momentum, the modified gradient flow ``θ̇ = -g - λθ`` with its finite-lr correction:
      translation ``q(t) = e^{-λt} q0``; scale ``Q(t) = e^{-2λt} Q0 + η ∫ e^{-2λ(t-τ)} |g_A|² dτ``;
      rescale the same with ``|g_A1|² - |g_A2|²``. Assumes ``η λ² Q ≪ |g_A|²`` (the paper drops it).
    * momentum β, dampening δ, ``h = η(1-δ)``: the modified flow
      ``(h(1+β)/2) θ̈ + (1-β) θ̇ = -g - λθ`` gives the driven damped harmonic oscillators
      ``q̈ + 2γq̇ + ω_T² q = 0`` and ``Q̈ + 2γQ̇ + ω_S² Q = 2|θ̇_A|²``, with
      ``γ = (1-β)/(h(1+β))``, ``ω_T² = 2λ/(h(1+β))``, ``ω_S² = 4λ/(h(1+β))`` and the kinetic term
      ``|θ̇_A|² = |v'|²/(1-δ)²`` measured from each step's post-step momentum buffer ``v'``
      (the finite-learning-rate term). Under-, critically and over-damped regimes are all
      covered by one closed-form propagator. The initial velocity is ``θ̇(0) = -v0/(1-δ)`` from
      the buffer at the first recorded step (zero when training starts there).

    The convolution integrals are not evaluated as ``e^{-αt}∫e^{ατ}F dτ`` (the growing
    exponential overflowed float32 in the original research code after a few hundred steps):
    the state ``(Q, Q̇)`` is propagated step by step with the exact closed-form propagator over
    one step, ``x ← Φ(h) x + Ψ(h) F_k`` (the forcing held constant over the step), which is the
    closed form for constant hyper-parameters and only ever multiplies by decaying factors.
    Where the hyper-parameters change (an lr schedule, weight decay switched on...) the same
    propagation is the piecewise closed form: each segment starts from the state at the end of
    the previous one (``Prediction.segments`` lists them). The closed form does not apply to
    nesterov momentum (a different modified flow, at first order in h): ``paper_applies`` is
    then False with the reason, and the heavy-ball curve is still returned for reference.

The Part 2 statement: with ``lr → 0`` and no weight decay every quantity is conserved; the
``gradient_flow`` trajectory is that prediction (the initial value, constant).

Errors (`compare`): max over steps |pred - meas| / max over steps |meas|, per group; for
translation the normaliser is at least the group's norm |θ_A| (`error_floor`: a sum that cancels
to ~0, like a zero-initialised bias, holds nothing but float rounding).

    from nm_optim import theory
    result = theory.compare(record)          # symmetries from record.meta["symmetries"]
    print(result)                            # the summary table
    pred = theory.predict(record, symmetry)  # .measured, .exact, .paper, .gradient_flow, .time
    # without a Symmetry object: theory.predict_arrays(kind, {"A": stats}, theory.Schedule(...))

Records must hold consecutive steps (``record_every == 1``): the recursion needs every step.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from nm_optim.tracks import STAT_NAMES

if TYPE_CHECKING:
    from nm_optim.recorder import Record

KINDS = ("translation", "scale", "rescale")
HYPER_FIELDS = ("lr", "momentum", "dampening", "weight_decay", "nesterov")
_COL = {name: i for i, name in enumerate(STAT_NAMES)}
# The term each symmetry makes vanish, in the combined (rescale: A1 - A2) statistics.
VANISHING = {"translation": "g", "scale": "pg", "rescale": "pg"}
ROLES = {"translation": ("A",), "scale": ("A",), "rescale": ("A1", "A2")}


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
        for name in (*HYPER_FIELDS, "first", "skipped"):
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
        keys = np.stack([getattr(self, n).astype(np.float64) for n in HYPER_FIELDS], 1)
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
    _check_kind(kind)
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
    return s[..., _COL["p"]] if kind == "translation" else s[..., _COL["pp"]]


def breaking(kind: str, stats: Mapping[str, np.ndarray] | np.ndarray) -> np.ndarray:
    """[S, G]: the term the symmetry says vanishes, as recorded (translation Σg, scale Σp·g,
    rescale pg(A1) - pg(A2)). Nonzero values are real symmetry breaking (BatchNorm's eps, float
    rounding of the gradient)."""
    return combine(kind, stats)[..., _COL[VANISHING[kind]]]


def breaking_bound(kind: str, stats: Mapping[str, np.ndarray] | np.ndarray,
                   group_size: int | None = None) -> np.ndarray:
    """[S, G]: the Cauchy-Schwarz bound |g| |generator| of the breaking term (translation
    sqrt(group_size)·|g|, with group_size the classifier's number of outputs, 1 when not given;
    scale |θ||g|; rescale |θ_A1||g_A1| + |θ_A2||g_A2|). breaking / bound is the cosine between
    the gradient and the symmetry's generator: 0 for an exact symmetry."""
    _check_kind(kind)
    norm = lambda s: np.sqrt(np.abs(s[..., _COL["pp"]] * s[..., _COL["gg"]]))
    if kind == "translation":
        s = combine(kind, stats)
        return np.sqrt((1.0 if group_size is None else float(group_size)) * np.abs(s[..., _COL["gg"]]))
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


def _check_kind(kind: str) -> None:
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
    c = lambda name: s[:, :, _COL[name]]
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
    c = lambda name: stats[:, :, _COL[name]]
    a, b, wd = co["a"], co["b"], co["wd"]
    vd = c("gv") + wd * c("pv")
    dd = c("gg") + 2 * wd * c("pg") + wd * wd * c("pp")
    return a * a * c("vv") + 2 * a * b * vd + b * b * dd


# ------------------------------------------------------------------------------------------------
# paper: the continuous closed forms
# ------------------------------------------------------------------------------------------------
def oscillator_parameters(lr: float, momentum: float, dampening: float, weight_decay: float,
                          kind: str = "scale") -> tuple[float, float, float]:
    """(h, γ, ω²) of the seed's modified flow with momentum: h = lr(1-δ), γ = (1-β)/(h(1+β)),
    ω² = 2λ/(h(1+β)) for translation and 4λ/(h(1+β)) for scale and rescale."""
    _check_kind(kind)
    if not 0 < momentum < 1:
        raise ValueError(f"momentum must be in (0, 1) for the oscillator, got {momentum!r}")
    if not 0 <= dampening < 1:
        raise ValueError(f"dampening must be in [0, 1) for the oscillator, got {dampening!r}")
    h = lr * (1 - dampening)
    if h <= 0:
        raise ValueError(f"lr * (1 - dampening) must be positive, got lr={lr!r}, dampening={dampening!r}")
    gamma = (1 - momentum) / (h * (1 + momentum))
    omega2 = (2 if kind == "translation" else 4) * weight_decay / (h * (1 + momentum))
    return h, gamma, omega2


def regime(gamma: float, omega2: float) -> str:
    """"underdamped" (γ < ω), "critical" (γ = ω to 1e-12 relative) or "overdamped" (γ > ω)."""
    disc = gamma * gamma - omega2
    if abs(disc) <= 1e-12 * max(gamma * gamma, abs(omega2)):
        return "critical"
    return "underdamped" if disc < 0 else "overdamped"


def _cs(gamma: float, omega2: float, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """C(t), S(t) of the damped oscillator x = e^{-γt}(C x0 + S(...)): cos/sin (underdamped),
    cosh/sinh (overdamped) or 1/t (critical), with S = sin(Ωt)/Ω etc."""
    t = np.asarray(t, dtype=np.float64)
    r = regime(gamma, omega2)
    if r == "critical":
        return np.ones_like(t), t.copy()
    if r == "underdamped":
        w = math.sqrt(omega2 - gamma * gamma)
        return np.cos(w * t), np.sin(w * t) / w
    k = math.sqrt(gamma * gamma - omega2)
    return np.cosh(k * t), np.sinh(k * t) / k


def damped_oscillator(gamma: float, omega2: float, t: np.ndarray | float, x0: float, v0: float = 0.0) -> np.ndarray:
    """The closed-form solution of x'' + 2γx' + ω²x = 0, x(0) = x0, x'(0) = v0:

    * underdamped (γ < ω), Ω = sqrt(ω² - γ²):  e^{-γt} (x0 cos Ωt + (v0 + γx0) sin(Ωt)/Ω)
    * critical    (γ = ω):                     e^{-γt} (x0 + (v0 + γx0) t)
    * overdamped  (γ > ω), κ = sqrt(γ² - ω²):  e^{-γt} (x0 cosh κt + (v0 + γx0) sinh(κt)/κ)

    Evaluated directly it is fine for moderate t; for long records `paper` propagates the same
    solution step by step instead (see the module docstring). With v0 = 0 it is the paper's
    translation law e^{-γt}(cosh(√(γ²-ω²)t) + γ/√(γ²-ω²) sinh(√(γ²-ω²)t)) q0."""
    C, S = _cs(gamma, omega2, np.asarray(t, dtype=np.float64))
    return np.exp(-gamma * np.asarray(t)) * (x0 * C + (v0 + gamma * x0) * S)


_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(16)


def oscillator_step(gamma: float, omega2: float, h: float) -> tuple[np.ndarray, np.ndarray]:
    """(Φ, ψ) such that over one step of length h, with constant forcing F,
    ``(x, x')(t+h) = Φ (x, x')(t) + ψ F`` for x'' + 2γx' + ω²x = F. All entries are bounded
    (decaying modes only), so repeated application never overflows."""
    C, S = (float(a) for a in _cs(gamma, omega2, np.array(h)))
    e = math.exp(-gamma * h)
    phi = e * np.array([[C + gamma * S, S], [-omega2 * S, C - gamma * S]])
    # ψ = ∫_0^h Φ(s) ds (0, 1)ᵀ = (∫_0^h Φ12, Φ12(h)). From the ODE, ∫Φ12 = (1 - Φ22 - 2γΦ12)/ω²,
    # which cancels when ω²h² is tiny: there, 16-point Gauss-Legendre on the smooth integrand.
    if omega2 * h * h >= 1e-4:
        integral = (1 - phi[1, 1] - 2 * gamma * phi[0, 1]) / omega2
    else:
        s = 0.5 * h * (_GL_NODES + 1)
        _Cs, Ss = _cs(gamma, omega2, s)
        integral = 0.5 * h * float(np.dot(_GL_WEIGHTS, np.exp(-gamma * s) * Ss))
    return phi, np.array([integral, phi[0, 1]])


@dataclass
class Segment:
    """A run of steps [start, stop) with constant hyper-parameters, and its closed form."""

    start: int
    stop: int
    lr: float
    momentum: float
    dampening: float
    weight_decay: float
    nesterov: bool
    model: str  # "gradient flow", "modified flow", "oscillator"
    gamma: float | None = None
    omega2: float | None = None
    regime: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def paper(kind: str, stats: Mapping[str, np.ndarray] | np.ndarray, schedule: Schedule
          ) -> tuple[np.ndarray, np.ndarray, list[Segment], str | None]:
    """The seed's continuous prediction: (values [S+1, G], time [S+1], segments, reason).

    `reason` is None where the closed forms apply, else why they do not (nesterov). Time
    t advances by h = lr (no momentum) or lr(1-δ) (momentum) per stepped step."""
    s = combine(kind, stats)
    S, G, _ = s.shape
    if len(schedule) != S:
        raise ValueError(f"schedule has {len(schedule)} steps, statistics {S}")
    c = lambda name: s[:, :, _COL[name]]
    out, time = np.empty((S + 1, G)), np.zeros(S + 1)
    reason = None
    if S == 0:
        return out, time, [], reason
    if np.any(schedule.nesterov & (schedule.momentum != 0)):
        reason = ("nesterov momentum: the seed's modified flow is for heavy-ball momentum; nesterov "
                  "changes it at first order in h (the heavy-ball curve is shown for reference)")
    ok = np.isfinite(s).all(axis=2)
    all_ok = ok.all(axis=1)
    linear = kind == "translation"
    x = (c("p") if linear else c("pp"))[0].copy()
    # Initial velocity from the buffer before the first recorded step: θ̇ = -v/(1-δ).
    damp0 = 1 - float(schedule.dampening[0])
    xdot = -(c("v") if linear else 2 * c("pv"))[0] / damp0 if schedule.momentum[0] != 0 else np.zeros(G)
    kinetic = None if linear else buffer_norm_after_step(s, schedule)
    segments: list[Segment] = []
    out[0] = x
    prev_c = damp0
    for start, stop in schedule.segments():
        lr, m = float(schedule.lr[start]), float(schedule.momentum[start])
        damp, wd = float(schedule.dampening[start]), float(schedule.weight_decay[start])
        seg = Segment(start, stop, lr, m, damp, wd, bool(schedule.nesterov[start]),
                      "gradient flow" if wd == 0 and m == 0 else "modified flow")
        # One step of the closed form: (x, ẋ) ← [[A, B], [C, D]] (x, ẋ) + (fx_k, fv_k).
        if m == 0:  # first order: ẋ = -(1|2)λ x (+ η|g|²); the velocity is not a state
            h = lr
            A, B, C, D = math.exp(-(1 if linear else 2) * wd * h), 0.0, 0.0, 0.0
            fx = np.zeros((stop - start, G))
            if not linear:  # η ∫ e^{-2λ(t-τ)} |g|² dτ over one step, |g|² held constant over it
                w = h if wd == 0 else -math.expm1(-2 * wd * h) / (2 * wd)
                fx = lr * w * c("gg")[start:stop]
            fv = np.zeros_like(fx)
        else:
            h, gamma, omega2 = oscillator_parameters(lr, m, damp, wd, kind)
            seg.model, seg.gamma, seg.omega2, seg.regime = "oscillator", gamma, omega2, regime(gamma, omega2)
            xdot = xdot * prev_c / (1 - damp)  # the buffer is continuous and θ̇ = -v/(1-δ)
            prev_c = 1 - damp
            phi, psi = oscillator_step(gamma, omega2, h)
            (A, B), (C, D) = phi.tolist()
            force = np.zeros((stop - start, G)) if linear else 2 * kinetic[start:stop] / (1 - damp) ** 2
            fx, fv = psi[0] * force, psi[1] * force
        segments.append(seg)
        for k in range(start, stop):
            if schedule.skipped[k]:
                out[k + 1], time[k + 1] = x, time[k]
                continue
            if m != 0 and schedule.first[k]:
                xdot = np.zeros(G)  # a fresh buffer: the flow starts at rest
            x1 = A * x + B * xdot + fx[k - start]
            xdot1 = C * x + D * xdot + fv[k - start]
            if all_ok[k]:
                x, xdot = x1, xdot1
            else:  # groups without a gradient this step did not move
                x, xdot = np.where(ok[k], x1, x), np.where(ok[k], xdot1, xdot)
            out[k + 1], time[k + 1] = x, time[k] + h
    return out, time, segments, reason


def gradient_flow(kind: str, stats: Mapping[str, np.ndarray] | np.ndarray) -> np.ndarray:
    """[S+1, G]: the Part 2 statement: under gradient flow (lr → 0) without weight decay every
    symmetry's quantity is conserved, so the prediction is the initial value, constant."""
    m = measured(kind, stats)
    return np.broadcast_to(m[:1], (m.shape[0] + 1, m.shape[1])).copy()


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


# ------------------------------------------------------------------------------------------------
# Predictions of a symmetry in a record
# ------------------------------------------------------------------------------------------------
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
        """[G] how far the run is from conservation (the Part 2 statement) in the same measure."""
        return relative_error(self.gradient_flow, self.measured, self.floor)


def error_floor(kind: str, stats: Mapping[str, np.ndarray] | np.ndarray) -> np.ndarray:
    """[G]: the floor of the error's normaliser. Translation: max_k |θ_A| (the norm of the terms
    that form Σθ_A). A column or bias whose sum is ~0 (a zero-initialised bias stays at 0: the
    law holds exactly) carries only the float rounding of its elements, ~ε|θ_A| per step, and
    max_k |Σθ_A| would turn that into an error of order 1; measured against |θ_A| it reads as
    what it is. Where |Σθ_A| ≥ |θ_A| this is exactly the issue's measure. Scale: none needed
    (|θ_A|² is the quantity). Rescale: none (the difference crossing zero is handled by the
    max over steps)."""
    s = combine(kind, stats)
    if kind != "translation":
        return np.zeros(s.shape[1])
    with np.errstate(invalid="ignore"):
        pp = s[..., _COL["pp"]]
        return np.sqrt(np.nanmax(pp, axis=0)) if len(pp) else np.zeros(s.shape[1])


def predict_arrays(kind: str, stats: Mapping[str, np.ndarray] | np.ndarray, schedule: Schedule,
                   *, name: str = "", steps: np.ndarray | None = None, group_size: int | None = None) -> Prediction:
    """All trajectories of one symmetry from its role statistics (role -> [S, G, 9]; a bare array
    means role "A") and its schedule: the array-level entry point, needing no Symmetry object."""
    _check_kind(kind)
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


def check_consecutive(record: Record) -> None:
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


def schedule_of(symmetry: Any, record: Record) -> Schedule:
    """The Schedule of a symmetry's members in a record (via Symmetry.hyper / Symmetry.first)."""
    hyper = symmetry.hyper(record)
    return Schedule(*(np.asarray(hyper[n]) for n in HYPER_FIELDS),
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


def predict(record: Record, symmetry: Any) -> Prediction:
    """measured, exact, paper and gradient-flow trajectories of every group of `symmetry` (an
    nm_optim.symmetry.Symmetry, or anything with kind, name, group_stats, hyper, first)."""
    check_consecutive(record)
    return predict_arrays(symmetry.kind, symmetry.group_stats(record), schedule_of(symmetry, record),
                          name=symmetry.name, steps=record.steps, group_size=_group_size(symmetry))


def symmetries_of(record: Record) -> list[Any]:
    """The symmetries described in record.meta["symmetries"], rebuilt without the model."""
    from nm_optim.symmetry import symmetries_from_record

    return symmetries_from_record(record)


# ------------------------------------------------------------------------------------------------
# compare: errors per symmetry and group, and a summary table
# ------------------------------------------------------------------------------------------------
@dataclass
class Comparison:
    """Per symmetry: its Prediction and errors per group (see `relative_error`)."""

    predictions: list[Prediction]

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for p in self.predictions:
            finite = lambda a: float(np.nanmax(a)) if a.size and np.isfinite(a).any() else float("nan")
            out.append({
                "symmetry": p.name, "kind": p.kind, "groups": p.num_groups, "steps": len(p.steps),
                "max_exact_error": finite(p.exact_error), "max_paper_error": finite(p.paper_error),
                "max_gradient_flow_error": finite(p.gradient_flow_error),
                "max_breaking": finite(np.abs(p.breaking)), "max_breaking_ratio": finite(p.breaking_ratio),
                "paper_applies": p.paper_applies, "paper_reason": p.paper_reason,
                "segments": [s.to_dict() for s in p.segments],
            })
        return out

    def table(self) -> str:
        """The summary table: symmetry, kind, groups, max exact err, max paper err, max gradient
        flow err (drift from conservation), and "breaking": max_k |⟨g, generator⟩| / max_k
        |g||generator| (see `breaking_ratio`)."""
        head = ("symmetry", "kind", "groups", "exact err", "paper err", "flow err", "breaking")
        lines = []
        for r in self.rows():
            paper_err = f"{r['max_paper_error']:.2e}" + ("" if r["paper_applies"] else " (n/a)")
            lines.append((r["symmetry"], r["kind"], str(r["groups"]), f"{r['max_exact_error']:.2e}",
                          paper_err, f"{r['max_gradient_flow_error']:.2e}", f"{r['max_breaking_ratio']:.1e}"))
        widths = [max(len(h), *(len(row[i]) for row in lines)) if lines else len(h) for i, h in enumerate(head)]
        fmt = lambda row: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        out = [fmt(head), "  ".join("-" * w for w in widths), *map(fmt, lines)]
        notes = {r["paper_reason"] for r in self.rows() if r["paper_reason"]}
        out += [f"(n/a) paper closed form does not apply: {n}" for n in sorted(notes)]
        return "\n".join(out)

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: the summary rows with per-group errors."""
        rows = self.rows()
        for r, p in zip(rows, self.predictions):
            r["exact_error"] = [_json_float(x) for x in p.exact_error]
            r["paper_error"] = [_json_float(x) for x in p.paper_error]
            for k in ("max_exact_error", "max_paper_error", "max_gradient_flow_error", "max_breaking",
                      "max_breaking_ratio"):
                r[k] = _json_float(r[k])
            for seg in r["segments"]:
                for k, v in seg.items():
                    if isinstance(v, float):
                        seg[k] = _json_float(v)
        out = {"symmetries": rows}
        json.dumps(out)  # fail here, not in the caller's json.dump, if something is not JSON-able
        return out

    @property
    def max_exact_error(self) -> dict[str, float]:
        return {r["symmetry"]: r["max_exact_error"] for r in self.rows()}

    @property
    def max_paper_error(self) -> dict[str, float]:
        return {r["symmetry"]: r["max_paper_error"] for r in self.rows()}


def _json_float(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def compare(record: Record, symmetries: Sequence[Any] | None = None) -> Comparison:
    """Errors of the `exact` and `paper` predictions against the measured trajectories, per
    symmetry and group (max over steps |pred - meas| / max over steps |meas|; for translation
    the normaliser is at least the group's norm |θ_A|, see `error_floor`), for every symmetry (default: those described in the record's meta, so a
    loaded file needs no model). ``print(compare(record))`` prints the summary table."""
    check_consecutive(record)
    if symmetries is None:
        symmetries = symmetries_of(record)
    return Comparison([predict(record, s) for s in symmetries])
