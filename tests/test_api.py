"""nm_optim.SGD behaves as a torch.optim.Optimizer in every way user code touches: param groups,
named params, closures, hooks, schedulers, zero_grad, printing, deepcopy, skipped params, state."""

from __future__ import annotations

import copy

import pytest
import torch

import nm_optim
from torch.optim.optimizer import register_optimizer_step_post_hook
from helpers import assert_rel_close, device_backends
from helpers import batch, tiny_model


def train(model, opt, steps, scheduler=None, start=0):
    loss_fn = torch.nn.CrossEntropyLoss()
    device = next(model.parameters()).device
    for step in range(start, start + steps):
        x, y = batch(step)
        x, y = x.to(device), y.to(device)
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


def assert_models_close(a, b, tol=1e-6):
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert_rel_close(p, q, tol, name, floor=1.0)


def test_is_an_optimizer_and_handles_amp_scaling_as_torch_sgd_does():
    """GradScaler hands its scale to the step only with fused=True, as for torch.optim.SGD;
    otherwise it unscales the grads itself (so Lightning's mixed precision can clip them)."""
    opt = nm_optim.SGD(tiny_model().parameters(), lr=0.1)
    assert isinstance(opt, torch.optim.Optimizer)
    for fused in (None, False, True):
        ours = nm_optim.SGD(tiny_model().parameters(), lr=0.1, fused=fused)
        theirs = torch.optim.SGD(tiny_model().parameters(), lr=0.1, fused=fused)
        assert getattr(ours, "_step_supports_amp_scaling", False) == getattr(theirs, "_step_supports_amp_scaling", False)


def test_param_groups_and_add_param_group_take_defaults():
    model = tiny_model()
    opt = nm_optim.SGD(model[0].parameters(), lr=0.1, momentum=0.9, backend="reference")
    opt.add_param_group({"params": model[2].parameters(), "lr": 0.01})
    g0, g1 = opt.param_groups
    assert g1["lr"] == 0.01 and g1["momentum"] == 0.9 and g1["backend"] == "reference"
    assert set(g0) == set(g1) == {
        "params", "lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize", "foreach",
        "differentiable", "fused", "backend"
    }


@pytest.mark.parametrize("device,backend", device_backends())
def test_training_a_model_matches_torch_including_a_scheduler(device, backend):
    a, b = tiny_model(), tiny_model()
    a.to(device), b.to(device)
    opt = nm_optim.SGD(a.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3, backend=backend)
    ref = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3, foreach=False)
    sa = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    sb = torch.optim.lr_scheduler.StepLR(ref, step_size=5, gamma=0.5)
    train(a, opt, 20, sa)
    train(b, ref, 20, sb)
    assert opt.param_groups[0]["lr"] == ref.param_groups[0]["lr"] == 0.1 * 0.5**4
    assert_models_close(a, b)


@pytest.mark.parametrize("device,backend", device_backends())
def test_tensor_lr_with_a_scheduler_matches_torch(device, backend):
    a, b = tiny_model(), tiny_model()
    a.to(device), b.to(device)
    opt = nm_optim.SGD(a.parameters(), lr=torch.tensor(0.1), momentum=0.9, backend=backend)
    ref = torch.optim.SGD(b.parameters(), lr=torch.tensor(0.1), momentum=0.9, foreach=False)
    sa = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=15)
    sb = torch.optim.lr_scheduler.CosineAnnealingLR(ref, T_max=15)
    train(a, opt, 15, sa)
    train(b, ref, 15, sb)
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)
    assert_models_close(a, b)


def test_named_parameters_appear_in_the_state_dict_and_load_by_name():
    model = tiny_model()
    opt = nm_optim.SGD(model.named_parameters(), lr=0.1, momentum=0.9)
    train(model, opt, 2)
    sd = opt.state_dict()
    assert sd["param_groups"][0]["param_names"] == [n for n, _ in model.named_parameters()]
    opt2 = nm_optim.SGD(model.named_parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(sd)
    assert torch.equal(opt2.state[model[0].weight]["momentum_buffer"], opt.state[model[0].weight]["momentum_buffer"])


def test_step_with_closure_returns_the_loss_and_computes_with_grad():
    model = tiny_model()
    opt = nm_optim.SGD(model.parameters(), lr=0.1)
    x, y = batch(0)
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    w0 = model[0].weight.detach().clone()
    with torch.no_grad():
        loss = opt.step(closure)
    assert calls == [True] and isinstance(loss, torch.Tensor) and loss.ndim == 0
    assert not torch.equal(model[0].weight, w0)


def test_step_and_state_dict_hooks_run():
    model = tiny_model()
    opt = nm_optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    seen = []
    h1 = opt.register_step_pre_hook(lambda o, args, kwargs: seen.append("pre"))
    h2 = opt.register_step_post_hook(lambda o, args, kwargs: seen.append("post"))
    h3 = register_optimizer_step_post_hook(lambda o, a, k: seen.append("global"))
    opt.register_state_dict_pre_hook(lambda o: seen.append("sd_pre"))
    opt.register_state_dict_post_hook(lambda o, sd: (seen.append("sd_post"), sd)[1])
    opt.register_load_state_dict_pre_hook(lambda o, sd: (seen.append("load_pre"), sd)[1])
    opt.register_load_state_dict_post_hook(lambda o: seen.append("load_post"))
    try:
        train(model, opt, 1)
        opt.load_state_dict(opt.state_dict())
    finally:
        for h in (h1, h2, h3):
            h.remove()
    assert seen == ["pre", "post", "global", "sd_pre", "sd_post", "load_pre", "load_post"]


def test_zero_grad_sets_grads_to_none_by_default():
    model = tiny_model()
    opt = nm_optim.SGD(model.parameters(), lr=0.1)
    train(model, opt, 1)
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    train(model, opt, 1)
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


def test_repr_lists_every_hyperparameter():
    text = repr(nm_optim.SGD(tiny_model().parameters(), lr=0.25, momentum=0.5, backend="reference"))
    for needle in ("SGD (", "lr: 0.25", "momentum: 0.5", "dampening: 0", "weight_decay: 0",
                   "nesterov: False", "maximize: False", "backend: reference"):
        assert needle in text


def test_deepcopy_continues_identically():
    model = tiny_model()
    opt = nm_optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train(model, opt, 3)
    model2, opt2 = copy.deepcopy((model, opt))
    assert opt2.param_groups[0]["params"][0] is model2[0].weight
    train(model, opt, 4, start=3)
    train(model2, opt2, 4, start=3)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def test_params_without_grad_are_skipped_and_get_no_state():
    a = torch.nn.Parameter(torch.randn(4))
    b = torch.nn.Parameter(torch.randn(4))
    opt = nm_optim.SGD([a, b], lr=0.1, momentum=0.9)
    b0 = b.detach().clone()
    a.grad = torch.ones(4)
    opt.step()
    assert torch.equal(b, b0) and b not in opt.state
    assert "momentum_buffer" in opt.state[a]
    b.grad = torch.ones(4)  # b joins later: its buffer is created on its own first step
    opt.step()
    assert torch.equal(opt.state[b]["momentum_buffer"], torch.ones(4))


def test_momentum_zero_creates_no_state():
    model = tiny_model()
    opt = nm_optim.SGD(model.parameters(), lr=0.1, weight_decay=1e-2)
    train(model, opt, 3)
    assert len(opt.state) == 0
    assert opt.state_dict()["state"] == {}


def test_tensor_weight_decay_is_accepted_like_torch():
    a, b = tiny_model(), tiny_model()
    opt = nm_optim.SGD(a.parameters(), lr=0.1, weight_decay=torch.tensor(0.01))
    ref = torch.optim.SGD(b.parameters(), lr=0.1, weight_decay=torch.tensor(0.01), foreach=False)
    train(a, opt, 5)
    train(b, ref, 5)
    assert_models_close(a, b)


def test_a_torch_state_dict_keeps_the_backend_chosen_here():
    model = tiny_model()
    ref = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train(model, ref, 2)
    opt = nm_optim.SGD(model.parameters(), lr=0.1, momentum=0.9, backend="reference")
    opt.load_state_dict(ref.state_dict())
    assert opt.param_groups[0]["backend"] == "reference"
    back = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    back.load_state_dict(opt.state_dict())  # torch.optim.SGD's keys: no "backend" to carry along
    assert back.param_groups[0]["foreach"] is None


def test_changing_params_after_construction_is_followed():
    """p.data replaced by a tensor of another size (e.g. model surgery): the next step uses it."""
    p = torch.nn.Parameter(torch.zeros(4))
    opt = nm_optim.SGD([p], lr=1.0)
    p.grad = torch.ones(4)
    opt.step()
    p.data = torch.zeros(7)
    p.grad = torch.ones(7)
    opt.step()
    assert torch.equal(p.detach(), -torch.ones(7))
