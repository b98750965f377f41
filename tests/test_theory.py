"""The theory layer on toys whose answers are known: the paper's toy examples (a rotation field whose
norm grows only through the finite step, gradient descent on a quadratic, a scale-invariant loss
with weight decay), and the exact discrete recursion against real nm_optim.SGD runs in float64,
where it must reproduce the measured quantity to rounding for every optimizer feature:
momentum, dampening, nesterov, the first-step buffer rule, skipped steps and schedules."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import nm_optim
from nm_optim import theory
from theory_helpers import (
    HandSymmetry,
    laplacian_quadratic,
    run_sgd,
    scale_invariant_loss,
    softmax_loss,
    two_layer_loss,
)
from nm_optim.theory import Schedule

# ------------------------------------------------------------------------------------------------
# Toys with known answers
# ------------------------------------------------------------------------------------------------


def test_rotation_field_norm_grows_as_the_modified_flow_says():
    """x_{k+1} = x_k + η f(x), f = (-y, x): the flow of f conserves |x|², the discrete map
    multiplies it by exactly (1 + η²) per step, and the modified flow f + (η/2)x predicts the
    growth e^{ηt} at t = ηk, to O(η⁴k)."""
    eta, steps = 0.05, 400
    x = np.array([1.0, 0.5])
    norms = [x @ x]
    for _ in range(steps):
        x = x + eta * np.array([-x[1], x[0]])
        norms.append(x @ x)
    norms = np.array(norms)
    k = np.arange(steps + 1)
    exact = norms[0] * (1 + eta**2) ** k
    modified = norms[0] * np.exp(eta * (eta * k))
    assert np.max(np.abs(norms / exact - 1)) < 1e-12
    assert np.max(np.abs(modified / norms - 1)) < steps * eta**4  # k η⁴/2 and rounding
    # The gradient-flow (conserved) prediction misses the finite-step growth entirely: e^{ηt} = e.
    assert norms[-1] / norms[0] == pytest.approx(math.e, rel=2e-3)


def test_gradient_descent_on_a_quadratic():
    """L = a θ²/2: GD gives θ_k = (1 - ηa)^k θ0 exactly; gradient flow e^{-at} is off at O(η),
    the modified flow θ̇ = -(a + ηa²/2)θ at O(η²): halving η divides the errors by ~2 and ~4."""
    a, T = 1.0, 2.0

    def errors(eta):
        steps = round(T / eta)
        theta, traj = 1.0, [1.0]
        for _ in range(steps):
            theta -= eta * a * theta
            traj.append(theta)
        traj, t = np.array(traj), eta * np.arange(steps + 1)
        assert np.allclose(traj, (1 - eta * a) ** np.arange(steps + 1), rtol=1e-12)
        flow = np.max(np.abs(np.exp(-a * t) - traj))
        modified = np.max(np.abs(np.exp(-(a + eta * a * a / 2) * t) - traj))
        return flow, modified

    f1, m1 = errors(0.02)
    f2, m2 = errors(0.01)
    assert m1 < f1 / 10
    assert 1.8 < f1 / f2 < 2.2
    assert 3.5 < m1 / m2 < 4.5


def test_gradient_descent_on_a_translation_invariant_quadratic():
    """Σθ of GD on a Laplacian quadratic with weight decay λ: exactly (1 - ηλ)^k Σθ0 (the exact
    recursion), e^{-λ(1+ηλ/2)t} in the paper's modified flow; without weight decay conserved (gradient flow)."""
    for wd in (0.0, 0.05):
        stats, sched = run_sgd(laplacian_quadratic(6), (1, 6), 300, axis="all", lr=0.1, weight_decay=wd)
        pred = theory.predict_arrays("translation", stats, sched)
        q0 = pred.measured[0, 0]
        k = np.arange(300)
        assert np.allclose(pred.exact[:300, 0], q0 * (1 - 0.1 * wd) ** k, rtol=1e-12, atol=0)
        # the modified flow's rate λ(1 + ηλ/2), the β → 0 limit of the oscillator
        assert np.allclose(pred.paper[:300, 0], q0 * np.exp(-wd * (1 + 0.1 * wd / 2) * 0.1 * k), rtol=1e-12, atol=0)
        assert pred.exact_error[0] < 1e-12
        assert pred.paper_error[0] < (0.02 if wd else 1e-12)
        if wd == 0:
            assert pred.gradient_flow_error[0] < 1e-12


# ------------------------------------------------------------------------------------------------
# Real nm_optim.SGD runs on losses with a symmetry, in float64
# ------------------------------------------------------------------------------------------------
FEATURES = {
    "plain": {"lr": 0.05},
    "weight_decay": {"lr": 0.05, "weight_decay": 0.1},
    "momentum": {"lr": 0.02, "momentum": 0.9, "weight_decay": 0.05},
    "dampening": {"lr": 0.02, "momentum": 0.9, "dampening": 0.3, "weight_decay": 0.05},
    "nesterov": {"lr": 0.02, "momentum": 0.9, "nesterov": True, "weight_decay": 0.05},
}


def lr_schedule(opt):
    return torch.optim.lr_scheduler.StepLR(opt, step_size=40, gamma=0.5)


def hyper_changes(opt, k):
    """Weight decay switched on late, momentum changed midway: every hyper-parameter a schedule."""
    for g in opt.param_groups:
        if k == 50:
            g["weight_decay"] = 0.2
        if k == 90:
            g["momentum"] = 0.5
            g["dampening"] = 0.1


@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("kind", ["translation", "scale", "rescale"])
def test_exact_recursion_reproduces_training_in_float64(kind, feature):
    """The exact recursion carries the state from step 0 and takes only Σg², Σg·v from the record:
    in float64 it must match the measured quantity to ~1e-12, with an lr schedule, a weight-decay
    and momentum schedule, and two GradScaler-skipped steps thrown in."""
    hyper = FEATURES[feature]
    kw = dict(scheduler=lr_schedule, skip=(7, 63), **hyper)
    if "momentum" in hyper and not hyper.get("nesterov"):
        kw["on_step"] = hyper_changes
    if kind == "translation":
        stats, sched = run_sgd(softmax_loss(4, 7), (4, 7), 120, **kw)
        roles = {"A": stats}
    elif kind == "scale":
        stats, sched = run_sgd(scale_invariant_loss(4, 7), (4, 7), 120, **kw)
        roles = {"A": stats}
    else:
        gen = torch.Generator().manual_seed(0)
        w1, b1, w2 = (torch.nn.Parameter(torch.randn(*s, generator=gen, dtype=torch.float64))
                      for s in [(6, 5), (6,), (3, 6)])
        stats, sched = run_sgd(two_layer_loss(), None, 120, params=[w1, b1, w2],
                               tracks=[(w1, "rows"), (b1, "rows"), (w2, "cols")], **kw)
        roles = {"A1": stats[0] + stats[1], "A2": stats[2]}
    assert sched.skipped.sum() == 2 and len(sched.segments()) > 2
    pred = theory.predict_arrays(kind, roles, sched)
    assert np.all(np.isfinite(pred.exact))
    err = pred.exact_error.max()
    assert err < 1e-11, f"{kind}/{feature}: exact recursion off by {err:.2e}"
    if kind == "translation" and not sched.weight_decay.any():
        assert pred.gradient_flow_error.max() < 1e-12  # conserved without weight decay
    else:  # the quantity really moved (the test would be vacuous otherwise)
        assert pred.gradient_flow_error.max() > 1e-4
    # ...and skipped steps change nothing.
    for k in np.flatnonzero(sched.skipped):
        assert np.array_equal(pred.exact[k + 1], pred.exact[k])


@pytest.mark.parametrize("feature", FEATURES)
def test_recursion_with_breaking_term_reproduces_any_loss(feature):
    """With vanishing=False the recursion keeps the recorded Σpg: it then holds for any loss, with
    no symmetry at all, so it checks the one-step identities independently of the physics."""
    gen = torch.Generator().manual_seed(5)
    target = torch.randn(4, 7, generator=gen, dtype=torch.float64)
    stats, sched = run_sgd(lambda th, k: ((th - target) ** 2).sum() * (1 + k % 3), (4, 7), 80,
                           scheduler=lr_schedule, **FEATURES[feature])
    meas = theory.measured("scale", stats)
    assert theory.relative_error(theory.exact("scale", stats, sched, vanishing=False), meas).max() < 1e-12
    assert theory.relative_error(theory.exact("scale", stats, sched), meas).max() > 1e-3


def test_scale_invariant_norm_follows_the_exponential_law():
    """Scale-invariant toy, plain SGD with weight decay: |θ_A|² relaxes as
    e^{-2λt}|θ0|² + η∫e^{-2λ(t-τ)}|g_A|²dτ; the paper's closed form within 2% (its assumption
    ηλ²|θ|² ≪ |g|² holds: ηλ = 5e-3), the exact recursion to rounding."""
    lr, wd, steps = 0.05, 0.1, 800
    stats, sched = run_sgd(scale_invariant_loss(4, 7), (4, 7), steps, lr=lr, weight_decay=wd)
    pred = theory.predict_arrays("scale", stats, sched)
    assert pred.exact_error.max() < 1e-12
    assert pred.paper_error.max() < 0.02
    assert pred.gradient_flow_error.max() > 0.05  # the norm really moved
    assert pred.segments[0].model == "modified flow"
    # Without gradient noise the law is a pure exponential e^{-2λt}: check the decay factor.
    decay = np.exp(-2 * wd * pred.time[:steps])
    assert np.all(pred.paper[:steps] >= decay[:, None] * pred.measured[0] - 1e-12)


def test_paper_oscillator_on_scale_invariant_toy_with_momentum():
    """Momentum 0.9 with weight decay: the damped oscillator (with the kinetic driving term
    2|v'|²/(1-δ)²) within 2% of the measured |θ|², with and without dampening."""
    for damp in (0.0, 0.5):
        stats, sched = run_sgd(scale_invariant_loss(4, 7), (4, 7), 800, lr=0.02, momentum=0.9,
                               dampening=damp, weight_decay=0.05)
        pred = theory.predict_arrays("scale", stats, sched)
        assert pred.segments[0].model == "oscillator"
        assert pred.exact_error.max() < 1e-12
        assert pred.paper_error.max() < 0.02, f"dampening {damp}: {pred.paper_error.max():.3e}"


def test_exact_and_paper_converge_as_lr_goes_to_zero():
    """Over the same continuous time, the gap between the discrete recursion and the continuous
    solution shrinks with the learning rate (momentum 0.9, weight decay, scale-invariant toy)."""
    gaps = []
    for lr in (0.04, 0.02, 0.01):
        steps = round(8.0 / lr)
        stats, sched = run_sgd(scale_invariant_loss(3, 5), (3, 5), steps, lr=lr, momentum=0.9, weight_decay=0.1)
        pred = theory.predict_arrays("scale", stats, sched)
        gaps.append(theory.relative_error(pred.paper, pred.exact[:-1]).max())
    assert gaps[0] > gaps[1] > gaps[2]
    assert gaps[2] < gaps[0] / 3


def test_conservation_is_the_lr_to_zero_limit():
    """The paper's section 4: without weight decay, gradient flow conserves |θ_A|² (the
    `gradient_flow` prediction, a constant). SGD breaks it only through the finite step, η∫|g|²dt: over the same
    time the drift from the constant shrinks in proportion to lr, while the exact recursion
    follows every step."""
    drifts = []
    for lr in (0.04, 0.01):
        stats, sched = run_sgd(scale_invariant_loss(3, 5), (3, 5), round(4 / lr), lr=lr)
        pred = theory.predict_arrays("scale", stats, sched)
        assert pred.segments[0].model == "gradient flow"
        assert np.all(pred.gradient_flow == pred.measured[0])
        assert pred.exact_error.max() < 1e-12
        drifts.append(pred.gradient_flow_error.max())
    assert 3 < drifts[0] / drifts[1] < 5


# ------------------------------------------------------------------------------------------------
# The continuous closed forms
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gamma, omega2", [(0.5, 1.0), (1.0, 1.0), (2.0, 1.0), (0.3, 0.0)],
                         ids=["underdamped", "critical", "overdamped", "free"])
def test_step_propagation_is_the_closed_form(gamma, omega2):
    """Propagating (x, x') step by step is the closed-form solution (homogeneous part), and the
    forcing vector ψ gives the closed-form response to a constant force."""
    h, n = 0.01, 700
    phi, psi = theory.oscillator_step(gamma, omega2, h)
    state, force = np.array([1.0, -0.3]), 0.7
    xs = [state[0]]
    for _ in range(n):
        state = phi @ state + psi * force
        xs.append(state[0])
    t = h * np.arange(n + 1)
    # Constant force: particular solution by quadrature of the Green's function.
    fine = np.linspace(0, t[-1], 200001)
    green = theory.damped_oscillator(gamma, omega2, fine, 0.0, 1.0)
    response = force * np.concatenate([[0.0], np.cumsum((green[1:] + green[:-1]) / 2 * np.diff(fine))])
    expect = theory.damped_oscillator(gamma, omega2, t, 1.0, -0.3) + np.interp(t, fine, response)
    assert np.max(np.abs(np.array(xs) - expect)) < 1e-8
    assert theory.regime(gamma, omega2) == {0.5: "underdamped", 1.0: "critical", 2.0: "overdamped", 0.3: "overdamped"}[gamma]


def test_oscillator_parameters_and_the_paper_translation_law():
    """γ, ω of the paper's modified flow (dampening enters through h = η(1-δ)); the translation law with momentum
    is e^{-γt}(cosh κt + γ/κ sinh κt) q0 for a buffer starting at zero."""
    h, gamma, omega2 = theory.oscillator_parameters(0.1, 0.9, 0.5, 0.01, "translation")
    assert h == pytest.approx(0.05)
    assert gamma == pytest.approx(0.1 / (0.05 * 1.9))
    assert omega2 == pytest.approx(2 * 0.01 / (0.05 * 1.9))
    _, _, omega2_scale = theory.oscillator_parameters(0.1, 0.9, 0.5, 0.01, "scale")
    assert omega2_scale == pytest.approx(2 * omega2)
    k = math.sqrt(gamma**2 - omega2)
    t = np.linspace(0, 30, 7)
    paper_form = np.exp(-gamma * t) * (np.cosh(k * t) + gamma / k * np.sinh(k * t)) * 2.0
    assert np.allclose(theory.damped_oscillator(gamma, omega2, t, 2.0), paper_form, rtol=1e-12)
    with pytest.raises(ValueError, match="momentum"):
        theory.oscillator_parameters(0.1, 0.0, 0.0, 0.01)


def test_long_runs_do_not_overflow():
    """2·10^4 steps of an underdamped oscillator with a driving term: the original research code's
    e^{γτ} overflowed float32 after a few hundred steps; the step propagation stays finite and
    settles at the driven equilibrium Q = F/ω²."""
    S = 20_000
    stats = np.zeros((S, 1, 9))
    stats[0, 0, 3] = 1.0  # pp
    stats[:, 0, 4] = 1.0  # gg: the kinetic term comes from the gradients
    sched = Schedule.constant(S, lr=0.01, momentum=0.99, weight_decay=0.05)
    values, _time, segments, reason = theory.paper("scale", stats, sched)
    assert reason is None and segments[0].regime == "underdamped"
    assert np.all(np.isfinite(values))
    _h, _gamma, omega2 = theory.oscillator_parameters(0.01, 0.99, 0.0, 0.05)
    # Driving 2|v'|²/(1-δ)² with |v'|² from the (zero) record: v' = d = g, so |v'|² = gg = 1.
    assert values[-1, 0] == pytest.approx(2.0 / omega2, rel=1e-3)


# ------------------------------------------------------------------------------------------------
# API and errors
# ------------------------------------------------------------------------------------------------
def test_relative_error_normalises_by_the_largest_value():
    meas = np.array([[1.0], [-0.5], [0.0], [np.nan]])
    pred = np.array([[1.1], [-0.5], [0.0], [5.0], [9.0]])
    assert theory.relative_error(pred, meas)[0] == pytest.approx(0.1)


def test_schedule_and_kind_errors_name_the_argument():
    with pytest.raises(ValueError, match="Schedule.momentum has 3 steps"):
        Schedule(np.ones(4), np.ones(3), np.ones(4), np.ones(4), np.zeros(4), np.zeros(4), np.zeros(4))
    with pytest.raises(ValueError, match="kind must be one of"):
        theory.measured("rotation", np.zeros((2, 1, 9)))
    with pytest.raises(ValueError, match="missing \\['A2'\\]"):
        theory.measured("rescale", {"A1": np.zeros((2, 1, 9))})
    with pytest.raises(ValueError, match="schedule has 3 steps"):
        theory.exact("scale", np.zeros((2, 1, 9)), Schedule.constant(3, lr=0.1))


def test_records_must_hold_every_step():
    p = torch.nn.Parameter(torch.randn(3, 4))
    opt = nm_optim.SGD([p], lr=0.1, track=[(p, "rows")], record_every=2)
    for _ in range(4):
        p.grad = torch.randn_like(p)
        opt.step()
    with pytest.raises(ValueError, match="record_every=1"):
        theory.check_consecutive(opt.recorder.snapshot())


@pytest.mark.parametrize("kind", ["translation", "scale"])
def test_nesterov_follows_its_own_modified_flow(kind):
    """Nesterov momentum (docs/theory.md, "Nesterov momentum"): its modified flow is the
    heavy-ball oscillator with γ = (1-β+βηλ)/(η(1+β)) and, for scale, the extra forcing
    4β⟨θ̇, g⟩/(1+β). On a nesterov run it fits several times better than the heavy-ball form
    that earlier versions drew for reference; the exact recursion is exact."""
    import dataclasses

    loss = softmax_loss(4, 7) if kind == "translation" else scale_invariant_loss(4, 7)
    stats, sched = run_sgd(loss, (4, 7), 300, lr=0.01, momentum=0.99, weight_decay=0.05, nesterov=True)
    pred = theory.predict_arrays(kind, stats, sched, group_size=7)
    assert pred.paper_applies and pred.exact_error.max() < 1e-12
    heavy_ball = dataclasses.replace(sched, nesterov=np.zeros(len(sched), bool))
    hb_curve = theory.paper(kind, stats, heavy_ball)[0]
    hb_error = theory.scaled_error(hb_curve, pred.measured, pred.scale).max()
    assert pred.paper_error.max() < hb_error / 4, (pred.paper_error.max(), hb_error)
    assert pred.paper_error.max() < (1e-3 if kind == "translation" else 2e-2)
    h, gamma, _ = theory.oscillator_parameters(0.01, 0.99, 0.0, 0.05, kind, nesterov=True)
    assert gamma == pytest.approx((1 - 0.99 + 0.99 * 0.05 * 0.01) / (0.01 * 1.99))
    assert pred.segments[0].gamma == pytest.approx(gamma)


def test_compare_table_and_json():
    """compare() gives per symmetry and group the errors, a readable table and a JSON dict."""
    gen = torch.Generator().manual_seed(0)
    w1, b1, w2 = (torch.nn.Parameter(torch.randn(*s, generator=gen, dtype=torch.float64))
                  for s in [(6, 5), (6,), (3, 6)])
    loss = two_layer_loss()
    opt = nm_optim.SGD([("w1", w1), ("b1", b1), ("w2", w2)], lr=0.02, momentum=0.9, weight_decay=0.01,
                       track=[(w1, "rows"), (b1, "rows"), (w2, "cols")], backend="cpu")
    for k in range(50):
        opt.zero_grad()
        loss(w1, b1, w2, k).backward()
        opt.step()
    record = opt.recorder.snapshot()
    sym = HandSymmetry("rescale", "hidden", {"A1": ["w1:rows", "b1:rows"], "A2": ["w2:cols"]})
    result = theory.compare(record, [sym])
    row = result.rows()[0]
    assert row["symmetry"] == "hidden" and row["groups"] == 6 and row["max_exact_error"] < 1e-12
    table = result.table()
    assert "hidden" in table and "rescale" in table and "exact err" in table
    d = json.loads(json.dumps(result.to_dict()))
    assert len(d["symmetries"][0]["exact_error"]) == 6
    assert d["symmetries"][0]["segments"][0]["regime"] in ("underdamped", "critical", "overdamped")
    with pytest.raises(ValueError, match="describes no symmetries"):
        theory.compare(record)


def test_plot_figure_has_the_four_panels(tmp_path):
    """The paper-style figure: translation, scale, rescale and momentum-oscillation panels, measured
    in colour and theory dashed black, saved as a PNG without a display."""
    pytest.importorskip("matplotlib")
    from nm_optim import plot

    preds = []
    for kind, loss, shape in [("translation", softmax_loss(4, 7), (4, 7)), ("scale", scale_invariant_loss(4, 7), (4, 7))]:
        stats, sched = run_sgd(loss, shape, 200, lr=0.02, momentum=0.99, weight_decay=0.05)
        preds.append(theory.predict_arrays(kind, stats, sched, name=f"toy {kind}"))
    path = tmp_path / "fig" / "theory.png"
    fig = plot.figure(preds, path=path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    axes = fig.get_axes()
    assert [a.get_title().split(":")[0] for a in axes] == ["translation", "scale", "rescale", "momentum"]
    dashed = [line for line in axes[1].get_lines() if line.get_linestyle() == "--"]
    assert dashed and all(line.get_color() == "black" for line in dashed)
    assert "no rescale symmetry" in [t.get_text() for t in axes[2].texts]
    assert "underdamped" in axes[3].get_title()
    with pytest.raises(ValueError, match="theory must be"):
        plot.plot_prediction(preds[0], axes[0], theory="wrong")


def test_translation_group_size_of_a_key_bias_is_one_element():
    """A key bias is a translation whose every element is its own group (its gradient vanishes:
    softmax ignores a shift of every key): the group holds 1 element, not the bias's length; a
    classifier's column groups hold one element per output row."""
    from types import SimpleNamespace

    from nm_optim.symmetry.base import Member
    from nm_optim.theory.prediction import _group_size

    key_bias = Member(None, "attn.in_proj_bias", "rows", "A", shape=(48,), index=tuple([-1] * 16 + list(range(16)) + [-1] * 16))
    assert _group_size(SimpleNamespace(kind="translation", members=(key_bias,))) == 1
    head = Member(None, "fc.weight", "cols", "A", shape=(10, 32))
    assert _group_size(SimpleNamespace(kind="translation", members=(head,))) == 10
