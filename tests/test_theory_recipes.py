"""The theory on the recipes people train with: a learning rate warmed up linearly from 0 and
decayed by a cosine to 0, no weight decay on biases and norm layers (their own param group),
momentum 0.9 (docs/architecture.md, "The theory").

- A zero-lr step is a legal step: torch's SGD leaves θ unchanged and still updates the buffer.
  The exact recursion takes it; the paper's continuous forms treat it as a step of length zero
  (t = Σ lr(1 - δ) does not advance).
- Members of one symmetry in param groups with different hyper-parameters: the exact law runs
  torch's step per member (each with its own η, β, δ, λ) on the record's per-member sums. The
  symmetry makes only the sum over members of ⟨θ_m, g_m⟩ vanish; where η or β differ between
  members the weighted sum Σ η_m⟨θ_m, g_m⟩ does not, and the law keeps it, measured. The paper's
  forms assume one (η, β, λ) per group: valid where a group's members share them (the
  classifier's bias, alone in its translation group), flagged where they do not.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

import nm_optim
from nm_optim import theory
from nm_optim.names import HYPER_NAMES

sklearn = pytest.importorskip("sklearn.datasets")
symmetry = pytest.importorskip("nm_optim.symmetry")
models = pytest.importorskip("nm_optim.models")

STEPS, WARMUP = 240, 40


def warmup_cosine(warmup: int, total: int):
    """LambdaLR factor: linear from 0 over `warmup` steps, then a cosine that reaches 0 at the
    last of `total` steps (lr exactly 0 at the first and the last step)."""
    def factor(k: int) -> float:
        if k < warmup:
            return k / warmup
        return 0.5 * (1 + math.cos(math.pi * (k - warmup) / (total - 1 - warmup)))
    return factor


def no_decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """The usual recipe: weight decay on weight matrices and kernels, none on biases and norms."""
    decay = [p for p in model.parameters() if p.dim() > 1]
    rest = [p for p in model.parameters() if p.dim() <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


@functools.cache
def digits():
    d = sklearn.load_digits()
    return torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1), torch.tensor(d.target)


@functools.cache
def train_recipe(dtype: torch.dtype = torch.float32, steps: int = STEPS):
    """small_vgg with BatchNorm on 8x8 digits: warmup from 0, cosine to 0, momentum 0.9,
    weight decay 5e-3 on weights only; every symmetry find_symmetries gives it tracked."""
    x, y = digits()
    torch.manual_seed(0)
    model = models.small_vgg(batch_norm=True, width=8, hidden=32).to(dtype)
    syms = symmetry.find_symmetries(model, x[:4].to(dtype), loss=torch.nn.functional.cross_entropy)
    opt = nm_optim.SGD(no_decay_groups(model, 5e-3), lr=0.05, momentum=0.9, backend="cpu", symmetries=syms)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(WARMUP, steps))
    gen = torch.Generator().manual_seed(1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convs: threads only contend
    try:
        for _ in range(steps):
            idx = torch.randint(0, len(x), (64,), generator=gen)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx].to(dtype)), y[idx]).backward()
            opt.step()
            sched.step()
    finally:
        torch.set_num_threads(threads)
    return opt.recorder.snapshot()


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 3e-4), (torch.float64, 1e-9)], ids=["fp32", "fp64"])
def test_warmup_no_decay_groups_and_cosine_to_zero(dtype, tol):
    record = train_recipe(dtype)
    lr = record.hyper["lr"]
    assert lr[0, 0] == 0 and lr[-1, 0] == 0 and lr[WARMUP, 0] == 0.05  # the recipe really ran
    assert set(record.hyper["weight_decay"][0]) == {0.0, 5e-3}
    result = theory.compare(record)  # raised ValueError on lr = 0 and on members in two groups
    print(f"\n{dtype}\n{result.table()}")
    rows = {r["symmetry"]: r for r in result.rows()}
    assert sorted(r["kind"] for r in rows.values()) == ["rescale", "scale", "scale", "scale", "translation"]
    for p in result.predictions:
        # the exact law with the measured breaking kept (BatchNorm's eps for scale)
        err = p.exact_breaking_error.max()
        assert err <= tol, f"{p.name}: exact law with the measured breaking {err:.2e} > {tol:g}"
        if p.kind != "scale":  # exact symmetries: the law with the vanishing term set to 0
            assert p.exact_error.max() <= tol, f"{p.name}: exact law {p.exact_error.max():.2e}"
        assert p.gradient_flow_error.max() > 100 * tol  # the quantities moved: not vacuous
        # zero-lr steps are zero-length steps of the continuous forms
        zero = np.flatnonzero(p.schedule.lr == 0) if p.schedule is not None else np.flatnonzero(lr[:, 0] == 0)
        assert np.array_equal(p.time[zero + 1], p.time[zero])
        assert np.all(np.isfinite(p.exact[1:]))
    # translation: the weight columns decay, the bias (its own group, λ = 0) does not; each group's
    # members share (η, β, λ), so the paper's form holds per group and is drawn, unflagged.
    (tr,) = [p for p in result.predictions if p.kind == "translation"]
    assert not tr.mixed.any() and rows[tr.name]["mixed_hyper"] is None
    assert np.all(np.isfinite(tr.paper[1:])) and tr.paper_applies and tr.paper_valid
    assert tr.paper_error.max() < 0.05, tr.paper_error.max()
    # scale and rescale: a bias without decay shares each group with a decayed weight: the
    # single-λ continuous form is not these groups' dynamics; flagged, not silently drawn.
    for p in result.predictions:
        if p.kind == "translation":
            continue
        # (a dead hidden unit whose bias stayed at its initial 0 has one member's dynamics only)
        assert p.mixed.all() if p.kind == "scale" else p.mixed.sum() >= p.num_groups - 4, p.name
        row = rows[p.name]
        assert "weight_decay" in row["mixed_hyper"] and row["paper_mixed_groups"] == p.mixed.sum()
        assert not row["paper_valid"]
        assert np.all(np.isnan(p.paper[1:, p.mixed])) and np.all(np.isfinite(p.paper[1:, ~p.mixed]))
        assert p.paper_applies == (not p.mixed.all())
    assert "weight_decay" in result.table()


def _two_layer(seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(200, 16, 5, generator=gen, dtype=torch.float64)
    y = torch.randn(200, 16, 3, generator=gen, dtype=torch.float64)
    return lambda w1, b1, w2, k: ((torch.relu(x[k % 200] @ w1.T + b1) @ w2.T - y[k % 200]) ** 2).mean()


def _run_two_layer(groups_of, steps=100, scheduler=None, **hyper):
    """A float64 two-layer ReLU net with the rescale symmetry of its hidden units; `groups_of`
    turns (w1, b1, w2) into param groups. Returns the record and the symmetry."""
    gen = torch.Generator().manual_seed(0)
    w1, b1, w2 = (torch.nn.Parameter(torch.randn(*s, generator=gen, dtype=torch.float64))
                  for s in [(6, 5), (6,), (3, 6)])
    sym = nm_optim.Rescale(w1, w2, b1, name="hidden", incoming_weight_name="w1", incoming_bias_name="b1",
                           outgoing_weight_name="w2")
    opt = nm_optim.SGD(groups_of(w1, b1, w2), backend="reference", symmetries=[sym], **hyper)
    sched = scheduler(opt) if scheduler else None
    loss = _two_layer()
    for k in range(steps):
        opt.zero_grad()
        loss(w1, b1, w2, k).backward()
        opt.step()
        if sched:
            sched.step()
    return opt.recorder.snapshot(), sym


def test_different_lr_per_member_keeps_the_measured_breaking_term():
    """The outgoing weights train at 3x the lr of the incoming ones: Σ_m η_m⟨θ_m, g_m⟩ does not
    vanish although Σ_m ⟨θ_m, g_m⟩ does. The law keeps it, measured (exact to rounding in
    float64); dropping it, as the single-lr law does, is off by percents."""
    record, sym = _run_two_layer(lambda w1, b1, w2: [{"params": [w1, b1]}, {"params": [w2], "lr": 0.06}],
                                 lr=0.02, momentum=0.9, weight_decay=0.01)
    assert sorted({t["param_group"] for t in record.tracks}) == [0, 1]
    with pytest.raises(ValueError, match="param_group"):
        sym.hyper(record)  # one set of hyper-parameters does not exist: it says where to look
    result = theory.compare(record, [sym])
    (p,) = result.predictions
    assert p.exact_error.max() < 1e-11, p.exact_error.max()
    dropped = theory.scaled_error(p.exact_mismatch_dropped, p.measured, p.scale).max()
    assert dropped > 1e-3, dropped  # dropping the term would be visibly wrong
    row = result.rows()[0]
    assert "lr" in row["mixed_hyper"] and "kept" in row["mixed_hyper"]
    assert row["max_mismatch_effect"] == pytest.approx(dropped, rel=0.5)
    assert np.all(np.isnan(p.paper[1:])) and row["paper_mixed_groups"] == 6
    # the per-member law is torch's step: with the same lr in both groups it is the one-set law
    same, sym2 = _run_two_layer(lambda w1, b1, w2: [{"params": [w1, b1]}, {"params": [w2]}],
                                lr=0.02, momentum=0.9, weight_decay=0.01)
    q = theory.predict(same, sym2)
    assert not q.mixed.any() and np.all(np.isfinite(q.paper[1:]))
    assert q.exact_error.max() < 1e-11


@pytest.mark.parametrize("what", ["momentum", "dampening", "nesterov", "weight_decay"])
def test_every_hyper_parameter_may_differ_per_member(what):
    """Each of momentum, dampening, nesterov, weight_decay set differently for the bias's group,
    with an lr schedule: the per-member law follows torch's step to float64 rounding."""
    other = {"momentum": 0.5, "dampening": 0.3, "nesterov": True, "weight_decay": 0.0}[what]
    hyper = {"lr": 0.02, "momentum": 0.9, "weight_decay": 0.01}
    if what == "nesterov":
        hyper["dampening"] = 0.0
    record, sym = _run_two_layer(lambda w1, b1, w2: [{"params": [w1, w2]}, {"params": [b1], what: other}],
                                 scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, 30, 0.5), **hyper)
    p = theory.predict(record, sym)
    assert p.mixed.all() and what in p.mixed_note
    assert p.exact_error.max() < 1e-11, p.exact_error.max()
    assert p.exact_breaking_error.max() < 1e-11


def test_a_zero_lr_step_is_a_zero_length_step():
    """Warmup from lr 0 with momentum: the buffer is created (and updated) at lr 0 while θ stays;
    the exact law follows, and the continuous time does not advance."""
    record, sym = _run_two_layer(lambda w1, b1, w2: [w1, b1, w2], steps=60, lr=0.02, momentum=0.9,
                                 weight_decay=0.01,
                                 scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, warmup_cosine(10, 60)))
    assert record.hyper["lr"][0, 0] == 0 and record.hyper["lr"][-1, 0] == 0
    p = theory.compare(record, [sym]).predictions[0]
    assert p.exact_error.max() < 1e-11
    assert p.time[1] == 0 and p.time[-1] == p.time[-2] and p.time[2] > 0
    zero = [s for s in p.segments if s.lr == 0]
    assert len(zero) == 2 and all(s.model == "zero-length step" and s.valid for s in zero)
    assert np.all(np.isfinite(p.paper)) and p.paper_error.max() < 0.05
    # the quantity is unchanged by a zero-lr step, in the record and in both predictions
    assert p.measured[1, 0] == p.measured[0, 0] and p.paper[1, 0] == p.paper[0, 0]
    assert p.exact[1, 0] == p.exact[0, 0]


def test_hyper_of_members_in_one_group_is_unchanged():
    """Members in several param groups with equal hyper-parameters: one set, as before."""
    record, sym = _run_two_layer(lambda w1, b1, w2: [{"params": [w1]}, {"params": [b1, w2]}], steps=5, lr=0.1)
    hyper = sym.hyper(record)
    for name in HYPER_NAMES:
        assert np.array_equal(hyper[name], record.hyper[name][:, 0])
    assert sym.param_groups(record) == [0, 1]


def test_momentum_outside_the_continuous_forms_keeps_the_exact_law():
    """torch accepts momentum 1 and dampening 1; the paper's flow does not. The comparison keeps
    the exact law and says why the continuous curve stops."""
    def switch(opt):
        class Switch:
            def step(self, k=[0]):
                k[0] += 1
                if k[0] == 20:
                    for g in opt.param_groups:
                        g["dampening"] = 1.0
        return Switch()

    record, sym = _run_two_layer(lambda w1, b1, w2: [w1, b1, w2], steps=40, lr=0.02, momentum=0.9,
                                 weight_decay=0.01, scheduler=switch)
    p = theory.compare(record, [sym]).predictions[0]
    assert p.exact_error.max() < 1e-11
    assert not p.paper_applies and "dampening 1" in p.paper_reason
    assert np.all(np.isfinite(p.paper[1:20])) and np.all(np.isnan(p.paper[21:]))
