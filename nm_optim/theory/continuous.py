"""The paper's continuous closed forms (Kunin et al., ICLR 2021: conservation under gradient flow,
section 4; modified gradient flow with weight decay and momentum, section 5; the exact learning
dynamics it gives, section 6), predicted from the recorded statistics.

``paper``
    The continuous solutions, with time ``t = Σ h`` over the steps (``h = lr`` without momentum,
    ``h = lr·(1 - dampening)`` with momentum; ``t = lr·k`` for a constant lr):

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

``gradient_flow``
    Conservation under gradient flow (section 4): with ``lr → 0`` and no weight decay every
    quantity is conserved; the trajectory is that prediction (the initial value, constant).

Numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from nm_optim.names import STAT_INDEX
from nm_optim.theory.laws import Schedule, buffer_norm_after_step, check_kind, combine, measured


def oscillator_parameters(lr: float, momentum: float, dampening: float, weight_decay: float,
                          kind: str = "scale") -> tuple[float, float, float]:
    """(h, γ, ω²) of the paper's modified flow with momentum (section 5): h = lr(1-δ),
    γ = (1-β)/(h(1+β)), ω² = 2λ/(h(1+β)) for translation and 4λ/(h(1+β)) for scale and
    rescale."""
    check_kind(kind)
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
    """The paper's continuous prediction (section 6): (values [S+1, G], time [S+1], segments, reason).

    `reason` is None where the closed forms apply, else why they do not (nesterov). Time
    t advances by h = lr (no momentum) or lr(1-δ) (momentum) per stepped step."""
    s = combine(kind, stats)
    S, G, _ = s.shape
    if len(schedule) != S:
        raise ValueError(f"schedule has {len(schedule)} steps, statistics {S}")
    c = lambda name: s[:, :, STAT_INDEX[name]]
    out, time = np.empty((S + 1, G)), np.zeros(S + 1)
    reason = None
    if S == 0:
        return out, time, [], reason
    if np.any(schedule.nesterov & (schedule.momentum != 0)):
        reason = ("nesterov momentum: the paper's modified flow is for heavy-ball momentum; nesterov "
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
    """[S+1, G]: conservation under gradient flow (the paper, section 4): with lr → 0 and without
    weight decay every symmetry's quantity is conserved, so the prediction is the initial value,
    constant."""
    m = measured(kind, stats)
    return np.broadcast_to(m[:1], (m.shape[0] + 1, m.shape[1])).copy()
