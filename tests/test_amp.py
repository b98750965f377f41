"""torch.amp.GradScaler end to end on the CPU: the scale is undone inside the kernel, an overflow
skips the step without writing anything or creating state, also on the very first step."""

from __future__ import annotations

import pytest
import torch

import nm_optim
from helpers import assert_rel_close, device_backends
from helpers import batch, tiny_model

FIRST_SCALE = 2.0**16


def overflow(model) -> None:
    """What a too-large scale does to a gradient: one element becomes inf."""
    model[0].weight.grad[0, 0] = float("inf")


def scaled_training(model, opt, scaler, steps, clip=False):
    loss_fn = torch.nn.CrossEntropyLoss()
    scales = []
    for step in range(steps):
        x, y = batch(step)
        opt.zero_grad()
        scaler.scale(loss_fn(model(x), y)).backward()
        if step in (0, 5):
            overflow(model)
        if clip:  # the unscale_-then-clip recipe: the optimizer then sees grad_scale = None
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
    return scales


@pytest.mark.parametrize("device,backend", [p for p in device_backends() if p.values[0] == "cpu"])
@pytest.mark.parametrize("clip", [False, True], ids=["fused_unscale", "unscale_then_clip"])
def test_grad_scaler_training_matches_torch_sgd(device, backend, clip):
    a, b = tiny_model(), tiny_model()
    opt = nm_optim.SGD(a.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3, backend=backend)
    ref = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3, foreach=False)
    # Steps 0 and 5 overflow: both optimizers skip them (step 0 before any state exists).
    sa = torch.amp.GradScaler("cpu", init_scale=FIRST_SCALE, growth_interval=3)
    sb = torch.amp.GradScaler("cpu", init_scale=FIRST_SCALE, growth_interval=3)
    scales_a = scaled_training(a, opt, sa, 12, clip)
    scales_b = scaled_training(b, ref, sb, 12, clip)
    assert scales_a == scales_b and scales_a[0] < FIRST_SCALE, "the first step overflowed in both"
    assert scales_a[5] < scales_a[4], "and step 5 too"
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert_rel_close(p, q, 1e-6, name, floor=1.0)
        assert_rel_close(opt.state[p]["momentum_buffer"], ref.state[q]["momentum_buffer"], 1e-6,
                         f"{name} momentum_buffer", floor=1.0)


@pytest.mark.parametrize("device,backend", [p for p in device_backends() if p.values[0] == "cpu"])
def test_overflow_on_the_first_step_writes_nothing_and_creates_no_state(device, backend):
    model = tiny_model()
    opt = nm_optim.SGD(model.parameters(), lr=0.1, momentum=0.9, backend=backend)
    before = [p.detach().clone() for p in model.parameters()]
    scaler = torch.amp.GradScaler("cpu", init_scale=FIRST_SCALE)
    x, y = batch(0)
    scaler.scale(torch.nn.functional.cross_entropy(model(x), y)).backward()
    overflow(model)
    scaler.step(opt)
    scaler.update()
    assert len(opt.state) == 0, "no momentum buffer may exist after a skipped first step"
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)


@pytest.mark.parametrize("device,backend", [p for p in device_backends() if p.values[0] == "cpu"])
def test_found_inf_later_leaves_params_and_buffers_untouched(device, backend):
    p = torch.nn.Parameter(torch.randn(1000))
    opt = nm_optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=0.1, backend=backend)
    p.grad = torch.randn(1000)
    opt.step()
    p0, v0 = p.detach().clone(), opt.state[p]["momentum_buffer"].clone()
    opt.grad_scale = torch.tensor(4.0)
    opt.found_inf = torch.tensor(1.0)
    p.grad = torch.full((1000,), float("inf"))
    opt.step()
    assert torch.equal(p.detach(), p0) and torch.equal(opt.state[p]["momentum_buffer"], v0)
    # and with found_inf = 0 the scale is divided out inside the kernel
    opt.found_inf = torch.tensor(0.0)
    g = torch.randn(1000)
    p.grad = 4.0 * g
    opt.step()
    ref_p = p0.clone().requires_grad_()
    ref = torch.optim.SGD([ref_p], lr=0.1, momentum=0.9, weight_decay=0.1)
    ref.state[ref_p]["momentum_buffer"] = v0.clone()
    ref_p.grad = g
    ref.step()
    assert_rel_close(p, ref_p, 1e-6, "param after an unscaled step")
