"""The paper's continuous closed forms (Kunin et al., ICLR 2021: conservation under gradient flow,
section 4; modified gradient flow with weight decay and momentum, section 5; the exact learning
dynamics it gives, section 6), predicted from the recorded statistics.

``paper``
    The continuous solutions, with time ``t = Σ h`` over the steps (``h = lr`` without momentum,
    ``h = lr·(1 - dampening)`` with momentum; ``t = lr·k`` for a constant lr):

    * no momentum, the modified gradient flow ``θ̇ = -g - λθ`` with its finite-lr correction:
      translation ``q(t) = e^{-rt} q0`` with ``r = λ(1 + ηλ/2)``; scale
      ``Q(t) = e^{-rt} Q0 + η ∫ e^{-r(t-τ)} |g_A|² dτ`` with ``r = 2λ + ηλ²``; rescale the same
      with ``|g_A1|² - |g_A2|²``. The O(ηλ²) corrections of the rates go with the O(η) forcing:
      both are the β → 0 limit of the oscillator below (`first_order_rate`).
    * momentum β, dampening δ, ``h = η(1-δ)``: the modified flow
      ``(h(1+β)/2) θ̈ + (1-β) θ̇ = -g - λθ`` gives the driven damped harmonic oscillators
      ``q̈ + 2γq̇ + ω_T² q = 0`` and ``Q̈ + 2γQ̇ + ω_S² Q = 2|θ̇_A|²``, with
      ``γ = (1-β)/(h(1+β))``, ``ω_T² = 2λ/(h(1+β))``, ``ω_S² = 4λ/(h(1+β))`` and the kinetic term
      ``|θ̇_A|² = |v'|²/(1-δ)²`` measured from each step's post-step momentum buffer ``v'``
      (the finite-learning-rate term). Under-, critically and over-damped regimes are all
      covered by one closed-form propagator. The initial velocity is consistent with the
      staggered grid of the momentum method, ``θ̇(0) = -(v0 + v0')/(2(1-δ))`` (see `paper`'s
      `start`; ``start="rest"`` gives the paper's figures as printed), and is re-anchored at every
      segment boundary.

    Every segment is checked against the forms' assumptions (h·γ, h·ω, η·λ small:
    `Segment.valid`, `VALIDITY_LIMIT`). A step with lr = 0 is a step of length zero (t does not
    advance; nothing divides by h), after which the velocity is re-anchored from the recorded
    buffer, which moved while θ did not. Momentum >= 1 or dampening >= 1 (torch accepts both) are
    outside the forms: the curve stops there, with the reason.

    The convolution integrals are not evaluated as ``e^{-αt}∫e^{ατ}F dτ`` (the growing
    exponential overflowed float32 in the original research code after a few hundred steps):
    the state ``(Q, Q̇)`` is propagated step by step with the exact closed-form propagator over
    one step, ``x ← Φ(h) x + Ψ(h) F_k`` (the forcing held constant over the step), which is the
    closed form for constant hyper-parameters and only ever multiplies by decaying factors.
    Where the hyper-parameters change (an lr schedule, weight decay switched on...) the same
    propagation is the piecewise closed form: each segment starts from the state at the end of
    the previous one (``Prediction.segments`` lists them).

    * nesterov momentum, u = d + βv': the same expansion of θ_{k+1} − (1+β)θ_k + βθ_{k−1} =
      −η((1+β(1−δ))d_k − βd_{k−1}) gives the modified flow
      ``(h(1+β)/2) θ̈ + (1-β) θ̇ = -c (g + λθ) - e h (ġ + λθ̇)`` with ``c = (1-βδ)/(1-δ)``,
      ``e = β/(1-δ)`` (torch allows nesterov only with δ = 0: c = 1, e = β): the same
      oscillators with ``γ = (1-β+eλh)/(h(1+β))``, ``ω² = 2cλ/(h(1+β))`` (translation) and
      ``4cλ/(h(1+β))`` (scale, rescale), and for scale and rescale the forcing
      ``2|θ̇|² + 4e⟨θ̇, g⟩/(1+β)`` (from ⟨θ, ġ⟩ = −⟨θ̇, g⟩), with θ̇ = −u/(1−δ) the step's
      update. docs/theory.md derives it and compares it with the heavy-ball form.

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
from nm_optim.theory.laws import (
    Schedule,
    check_kind,
    combine,
    finite_sums,
    measured,
    start_steps,
    update_sums_after_step,
)


def oscillator_parameters(lr: float, momentum: float, dampening: float, weight_decay: float,
                          kind: str = "scale", nesterov: bool = False) -> tuple[float, float, float]:
    """(h, γ, ω²) of the paper's modified flow with momentum (section 5): h = lr(1-δ),
    γ = (1-β)/(h(1+β)), ω² = 2λ/(h(1+β)) for translation and 4λ/(h(1+β)) for scale and
    rescale. With `nesterov` the flow of nesterov momentum (module docstring, docs/theory.md):
    γ = (1-β+eλh)/(h(1+β)) and ω² times c, with c = (1-βδ)/(1-δ), e = β/(1-δ)."""
    check_kind(kind)
    if not 0 < momentum < 1:
        raise ValueError(f"momentum must be in (0, 1) for the oscillator, got {momentum!r}")
    if not 0 <= dampening < 1:
        raise ValueError(f"dampening must be in [0, 1) for the oscillator, got {dampening!r}")
    h = lr * (1 - dampening)
    if h <= 0:
        raise ValueError(f"lr * (1 - dampening) must be positive, got lr={lr!r}, dampening={dampening!r}")
    c, e = _nesterov_coefficients(momentum, dampening) if nesterov else (1.0, 0.0)
    gamma = (1 - momentum + e * weight_decay * h) / (h * (1 + momentum))
    omega2 = (2 if kind == "translation" else 4) * c * weight_decay / (h * (1 + momentum))
    return h, gamma, omega2


def _nesterov_coefficients(momentum: float, dampening: float) -> tuple[float, float]:
    """(c, e) of nesterov's modified flow: the update's −c·d − e·h·ḋ (module docstring)."""
    return (1 - momentum * dampening) / (1 - dampening), momentum / (1 - dampening)


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


# The continuous forms assume every rate is small against the step: h·γ, h·ω and η·λ above this
# and the segment is flagged (`Segment.valid`). At lr 0.5, momentum 0.5 (h·γ = 1/3) the paper's
# curve is off by 2.5-14% on a real network.
VALIDITY_LIMIT = 0.1
STARTS = ("consistent", "rest")


@dataclass
class Segment:
    """A run of steps [start, stop) with constant hyper-parameters, and its closed form.

    ``h_gamma``, ``h_omega``, ``lr_wd``: the dimensionless rates h·γ, h·ω (oscillator) and η·λ;
    ``valid`` is False (and ``caveat`` says which) where one exceeds `VALIDITY_LIMIT`: the
    continuous form is then a poor model of the discrete steps."""

    start: int
    stop: int
    lr: float
    momentum: float
    dampening: float
    weight_decay: float
    nesterov: bool
    model: str  # "gradient flow", "modified flow", "oscillator", "zero-length step", "outside the forms"
    gamma: float | None = None
    omega2: float | None = None
    regime: str | None = None
    rate: float | None = None  # without momentum: the decay rate of the modified flow
    h_gamma: float | None = None
    h_omega: float | None = None
    lr_wd: float = 0.0
    valid: bool = True
    caveat: str | None = None
    part: str | None = None  # the members (param group) whose hyper-parameters these are, when they differ

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def check_validity(self) -> None:
        """Set ``valid`` / ``caveat`` from the dimensionless rates."""
        bad = [f"{name} = {x:.3g}" for name, x in (("h·γ", self.h_gamma), ("h·ω", self.h_omega), ("η·λ", self.lr_wd))
               if x is not None and x > VALIDITY_LIMIT]
        self.valid = not bad
        self.caveat = (f"steps {self.start}-{self.stop - 1}: {', '.join(bad)} > {VALIDITY_LIMIT:g}: the continuous "
                       "form assumes small rates per step") if bad else None


def first_order_rate(kind: str, lr: float, weight_decay: float) -> float:
    """The decay rate of the modified flow without momentum, consistent with the β → 0 limit of
    the oscillator (and with the discrete map to O(η²λ³)): translation λ(1 + ηλ/2) (the map
    multiplies Σθ by 1 - ηλ), scale and rescale 2λ + ηλ² (|θ|² by (1 - ηλ)², next to the
    forcing η|g|²)."""
    lam = weight_decay
    return lam * (1 + lr * lam / 2) if kind == "translation" else 2 * lam + lr * lam * lam


def _velocity_coefficients(momentum: float, dampening: float, nesterov: bool) -> tuple[float, float]:
    """(A, B) of θ̇ = -(A·u + B·d)/2 at a step time, u = v/(1-δ) the pre-step buffer: the mean of
    the updates before and after it. Heavy ball (update v'): (v + v')/(2(1-δ)), A = 1+β, B = 1.
    Nesterov (update d + βv', the previous one ≈ d + βv): A = β(1+β), B = (2+β(1-δ))/(1-δ)."""
    if nesterov:
        return momentum * (1 + momentum), (2 + momentum * (1 - dampening)) / (1 - dampening)
    return 1 + momentum, 1.0


def _velocity(c: float, momentum: float, rate_wd: float, U: np.ndarray, x: np.ndarray,
              coefficients: tuple[float, float] | None = None) -> np.ndarray:
    """θ̇ at a step time on the staggered grid (`_velocity_coefficients`; default heavy ball);
    for the quantity, ẋ = -c(A·U + B·λx) with (c, U) = (1/2, Σu) for translation and
    (1, Σθ·u) for scale and rescale (⟨θ, d⟩ = λ|θ|² and Σd = λΣθ with the vanishing term
    dropped)."""
    A, B = coefficients if coefficients is not None else (1 + momentum, 1.0)
    return -c * (A * U + B * rate_wd * x)


def paper(kind: str, stats: Mapping[str, np.ndarray] | np.ndarray, schedule: Schedule, *, start: str = "consistent",
          ) -> tuple[np.ndarray, np.ndarray, list[Segment], str | None]:
    """The paper's continuous prediction (section 6): (values [S+1, G], time [S+1], segments, reason).

    `reason` is None where the closed forms apply, else why they do not (momentum or
    dampening outside [0, 1)). Nesterov segments use nesterov's modified flow. Time
    t advances by h = lr (no momentum) or lr(1-δ) (momentum) per stepped step. Each group starts
    at its first stepped step with finite statistics (`laws.start_steps`; NaN before it).

    `start` sets the initial velocity with momentum: "consistent" (default) puts the buffer on
    the staggered grid of the momentum method, where the pre-step buffer is the velocity at
    t - h/2 and the post-step one at t + h/2: θ̇(t) = -(v + v')/(2(1-δ)), with v' from the
    record's v and the step's d (for a buffer created by the step, v' = d, the effective
    previous buffer is δd/β). The same rule re-anchors the velocity at every segment boundary
    (the buffer carries over, the relation to θ̇ changes with β, λ, δ), and where momentum comes
    back after momentum-0 steps (from the recorded, stale, buffer). "rest" is the literal
    form of the paper's figures: θ̇ = -v/(1-δ) from the pre-step buffer, so a run that starts
    at step 0 (or a fresh buffer) starts at rest."""
    if start not in STARTS:
        raise ValueError(f"start must be one of {STARTS}, got {start!r}")
    s = combine(kind, stats)
    S, G, _ = s.shape
    if len(schedule) != S:
        raise ValueError(f"schedule has {len(schedule)} steps, statistics {S}")
    c = lambda name: s[:, :, STAT_INDEX[name]]
    out, time = np.full((S + 1, G), np.nan), np.zeros(S + 1)
    reason = None
    if S == 0:
        return out, time, [], reason
    ok = finite_sums(s, kind) & ~schedule.skipped[:, None]  # the sums the law reads (a track may hold no others)
    begin = start_steps(s, schedule, kind)
    linear = kind == "translation"
    cq = 0.5 if linear else 1.0
    meas = c("p") if linear else c("pp")
    buf = c("v") if linear else c("pv")  # Σv, Σθ·v before the step
    x, xdot = np.full(G, np.nan), np.zeros(G)
    started = np.zeros(G, bool)
    # the update's Σu² and Σu·g (the forcing of scale and rescale)
    kinetic, work = (None, None) if linear else update_sums_after_step(s, schedule)
    segments: list[Segment] = []
    # (λ, 1-δ, (A, B) of `_velocity_coefficients`) of the last momentum segment run
    prev: tuple[float, float, tuple[float, float]] | None = None
    prev_momentum = False  # the previous segment had momentum (the velocity is a live state)

    def from_record(k: int, mask: np.ndarray, m: float, damp: float, wd: float, vc: tuple[float, float]) -> None:
        """Anchor the velocity of the groups in `mask` at step k from the recorded buffer."""
        fresh = bool(schedule.first[k])
        if start == "rest":
            v = np.zeros(G) if fresh else -(2 * cq) * buf[k] / (1 - damp)
        else:
            if fresh:  # v' = d: the effective previous buffer is δd/β (in u units δd/((1-δ)β))
                U = damp * wd * x / ((1 - damp) * m)
            else:
                U = buf[k] / (1 - damp)
            v = _velocity(cq, m, wd, U, x, vc)
        xdot[:] = np.where(mask, v, xdot)

    for seg_start, stop in schedule.segments():
        lr, m = float(schedule.lr[seg_start]), float(schedule.momentum[seg_start])
        damp, wd = float(schedule.dampening[seg_start]), float(schedule.weight_decay[seg_start])
        seg = Segment(seg_start, stop, lr, m, damp, wd, bool(schedule.nesterov[seg_start]),
                      "gradient flow" if wd == 0 and m == 0 else "modified flow", lr_wd=lr * wd)
        # One step of the closed form: (x, ẋ) ← [[A, B], [C, D]] (x, ẋ) + (fx_k, fv_k).
        h = lr * (1 - damp) if m != 0 else lr
        outside = m != 0 and not (0 < m < 1 and 0 <= damp < 1)
        if outside or h == 0:
            # lr = 0 is a legal step (θ stays, the buffer still moves): a step of length zero,
            # t does not advance and the state is held; the next segment re-anchors the velocity
            # from the recorded buffer. Momentum >= 1 or dampening >= 1 (torch accepts both) are
            # outside the oscillator's domain: no continuous form from there on.
            seg.model = "outside the forms" if outside else "zero-length step"
            if outside and reason is None:
                reason = (f"steps {seg_start}-{stop - 1}: momentum {m:g}, dampening {damp:g}: the paper's modified "
                          "flow needs 0 < momentum < 1 and dampening < 1")
            seg.check_validity()
            segments.append(seg)
            prev_momentum = False  # the buffer moved while θ did not: anchor from the record
            for k in range(seg_start, stop):
                new = (begin == k) & ~np.asarray(schedule.skipped[k])
                if new.any():
                    x = np.where(new, meas[k], x)
                    out[k, new] = x[new]
                    started |= new
                if outside:
                    x = np.full(G, np.nan)
                out[k + 1], time[k + 1] = x, time[k]
            continue
        if m == 0:  # first order: ẋ = -rate·x (+ η|g|²); the velocity is not a state
            rate = first_order_rate(kind, lr, wd)
            seg.rate = rate
            A, B, C, D = math.exp(-rate * h), 0.0, 0.0, 0.0
            fx = np.zeros((stop - seg_start, G))
            if not linear:  # η ∫ e^{-rate(t-τ)} |g|² dτ over one step, |g|² held constant over it
                w = h if rate == 0 else -math.expm1(-rate * h) / rate
                fx = lr * w * c("gg")[seg_start:stop]
            fv = np.zeros_like(fx)
        else:
            nesterov = bool(schedule.nesterov[seg_start])
            vc = _velocity_coefficients(m, damp, nesterov)
            h, gamma, omega2 = oscillator_parameters(lr, m, damp, wd, kind, nesterov)
            seg.model, seg.gamma, seg.omega2, seg.regime = "oscillator", gamma, omega2, regime(gamma, omega2)
            seg.h_gamma, seg.h_omega = h * gamma, h * math.sqrt(omega2)
            # Re-anchor the velocity of the running groups at the boundary.
            if prev_momentum and prev is not None:
                w0, c0, (A0, B0) = prev
                if start == "rest":  # the buffer is continuous and θ̇ = -v/(1-δ)
                    xdot = xdot * c0 / (1 - damp)
                else:  # recover the buffer from the old relation, the velocity from the new one
                    U = (-xdot / cq - B0 * w0 * x) / A0 * c0 / (1 - damp)
                    xdot = np.where(started, _velocity(cq, m, wd, U, x, vc), xdot)
            elif started.any():  # momentum (re)starts: the record holds the (fresh or stale) buffer
                k0 = next((k for k in range(seg_start, stop) if not schedule.skipped[k]), None)
                if k0 is not None:
                    from_record(k0, started & ok[k0], m, damp, wd, vc)
            prev = (wd, 1 - damp, vc)
            phi, psi = oscillator_step(gamma, omega2, h)
            (A, B), (C, D) = phi.tolist()
            if linear:
                force = np.zeros((stop - seg_start, G))
            else:  # 2|θ̇|² (+ nesterov's 4e⟨θ̇, g⟩/(1+β)) with θ̇ = -u/(1-δ)
                force = 2 * kinetic[seg_start:stop] / (1 - damp) ** 2
                if nesterov:
                    e = _nesterov_coefficients(m, damp)[1]
                    force = force - 4 * e * work[seg_start:stop] / ((1 + m) * (1 - damp))
            fx, fv = psi[0] * force, psi[1] * force
        seg.check_validity()
        segments.append(seg)
        prev_momentum = m != 0
        for k in range(seg_start, stop):
            if schedule.skipped[k]:
                out[k + 1], time[k + 1] = x, time[k]
                continue
            new = begin == k
            if new.any():  # a group's first step: its recorded value (and buffer)
                x = np.where(new, meas[k], x)
                out[k, new] = x[new]
                started |= new
                if m != 0:
                    from_record(k, new, m, damp, wd, vc)
            if m != 0 and schedule.first[k]:  # a buffer created by this step
                if start == "rest":
                    xdot = np.zeros(G)  # the flow starts at rest
                else:
                    from_record(k, started & ok[k] & ~new, m, damp, wd, vc)
            x1 = A * x + B * xdot + fx[k - seg_start]
            xdot1 = C * x + D * xdot + fv[k - seg_start]
            x, xdot = np.where(ok[k], x1, x), np.where(ok[k], xdot1, xdot)
            out[k + 1], time[k + 1] = x, time[k] + h
    return out, time, segments, reason


def gradient_flow(kind: str, stats: Mapping[str, np.ndarray] | np.ndarray) -> np.ndarray:
    """[S+1, G]: conservation under gradient flow (the paper, section 4): with lr → 0 and without
    weight decay every symmetry's quantity is conserved, so the prediction is the initial value,
    constant."""
    m = measured(kind, stats)
    return np.broadcast_to(m[:1], (m.shape[0] + 1, m.shape[1])).copy()
