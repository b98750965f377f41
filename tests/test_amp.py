"""torch.amp.GradScaler end to end on the CPU, on both of torch's paths, to the bit.

- Default (fused unset or False): as for torch.optim.SGD, the optimizer does not claim to unscale
  (no ``_step_supports_amp_scaling``), so the scaler unscales the grads itself and skips the step
  on an inf: params, momentum buffers and ``p.grad`` are bitwise torch.optim.SGD's default path.
- fused=True: as torch's fused SGD, the scaler hands ``grad_scale`` / ``found_inf`` to step();
  the kernels divide by the scale in the same pass and write the unscaled grads back (before
  the maximize sign), so ``p.grad`` is bitwise torch.optim.SGD(fused=True)'s. The update stays
  torch's for-loop's (docs/architecture.md, "The update"): params and buffers are bitwise
  torch.optim.SGD's default step on those unscaled grads (torch's fused CPU kernel rounds its
  scalar tails differently from its for-loop: a 3-element bias differs by a few ulps). An
  overflow skips the step without writing anything or creating state, also on the first step.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

import nm_optim
from helpers import batch, device_backends, tiny_model

FIRST_SCALE = 2.0**16
ODD_SCALE = 3000.0  # not a power of two: grad / scale and grad * (1 / scale) differ in the last bit
HYPER = dict(lr=0.1, momentum=0.9, weight_decay=1e-3)
CPU = [p for p in device_backends() if p.values[0] == "cpu"]
# The backends whose update is torch's CPU for-loop, bit for bit. Triton (interpreted here)
# computes torch's fused CUDA expression (docs/architecture.md, "The update"): its params differ
# in the last bits, and so do the next steps' grads of a trajectory; its written-back grads are
# checked step by step (test_grads_written_back_as_torch_fused_sgd_writes_them).
FOR_LOOP_BITS = ("reference", "cpu")
CPU_LOOP = [p for p in CPU if p.values[1] in FOR_LOOP_BITS]


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bits (NaN payloads and signs included)."""
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.detach().contiguous().view(ints[t.element_size()])


def assert_bitwise(actual, expected, what):
    assert (actual is None) == (expected is None), f"{what}: {actual is None=} {expected is None=}"
    if actual is None:
        return
    diff = bits(actual) != bits(expected)
    assert not bool(diff.any()), (
        f"{what}: {int(diff.sum())} of {diff.numel()} elements differ in their bits; first at flat index "
        f"{int(diff.reshape(-1).nonzero()[0])}: {actual.reshape(-1)[diff.reshape(-1)][0].item()!r} vs "
        f"{expected.reshape(-1)[diff.reshape(-1)][0].item()!r}")


def overflow(model) -> None:
    """What a too-large scale does to a gradient: one element becomes inf."""
    model[0].weight.grad[0, 0] = float("inf")


def snapshot(model, opt):
    return [(p.detach().clone(), p.grad.clone(), b.clone() if (b := opt.state.get(p, {}).get("momentum_buffer"))
             is not None else None) for p in model.parameters()]


def scaled_training(model, opt, scaler, steps, overflow_at, clip=False):
    """The AMP recipe of torch's docs; the state after every step."""
    loss_fn = torch.nn.CrossEntropyLoss()
    history = []
    for step in range(steps):
        x, y = batch(step)
        opt.zero_grad()
        scaler.scale(loss_fn(model(x), y)).backward()
        if step in overflow_at:
            overflow(model)
        if clip:  # unscale_, then clip: the optimizer then sees unscaled grads
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        history.append((scaler.get_scale(), snapshot(model, opt)))
    return history


class DividingSGD(torch.optim.SGD):
    """torch.optim.SGD's default (for-loop) step on the grads as torch's fused SGD leaves them
    (grad / grad_scale, written back): the bits nm_optim.SGD(fused=True) promises."""

    _step_supports_amp_scaling = True

    def step(self, closure=None):
        scale, found_inf = self.grad_scale, self.found_inf
        self.grad_scale = self.found_inf = None  # torch's for-loop takes neither
        if found_inf.item() != 0:
            return None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.div_(scale.to(p.grad.dtype))
        return super().step(closure)


def assert_same_runs(ours, theirs, what, params=True):
    """Bitwise, after every step: the scale, the grads and (params=True) params and buffers."""
    for step, ((scale_a, snap_a), (scale_b, snap_b)) in enumerate(zip(ours, theirs)):
        assert scale_a == scale_b, f"{what}: step {step}: scale {scale_a} vs {scale_b}"
        for k, ((p, g, v), (q, h, w)) in enumerate(zip(snap_a, snap_b)):
            at = f"{what}: step {step}, param {k}"
            assert_bitwise(g, h, f"{at}.grad")
            if params:
                assert_bitwise(p, q, at)
                assert_bitwise(v, w, f"{at} momentum_buffer")


@pytest.mark.parametrize("device,backend", CPU_LOOP)
@pytest.mark.parametrize("clip", [False, True], ids=["step_unscales", "unscale_then_clip"])
def test_default_path_is_torch_sgd_bitwise(device, backend, clip):
    a, b = tiny_model(), tiny_model()
    opt = nm_optim.SGD(a.parameters(), backend=backend, **HYPER)
    ref = torch.optim.SGD(b.parameters(), foreach=False, **HYPER)
    assert not getattr(opt, "_step_supports_amp_scaling", False), "only fused=True unscales in step()"
    # Steps 0 and 5 overflow: both skip them (step 0 before any state exists).
    ours = scaled_training(a, opt, torch.amp.GradScaler("cpu", init_scale=FIRST_SCALE, growth_interval=3), 12,
                           (0, 5), clip)
    theirs = scaled_training(b, ref, torch.amp.GradScaler("cpu", init_scale=FIRST_SCALE, growth_interval=3), 12,
                             (0, 5), clip)
    assert ours[0][0] < FIRST_SCALE and ours[5][0] < ours[4][0], "steps 0 and 5 overflowed"
    assert_same_runs(ours, theirs, f"{backend}, default path")
    assert abs(a[0].weight.grad).max() < 10, "p.grad was left scaled"


@pytest.mark.parametrize("device,backend", CPU_LOOP)
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("init_scale", [FIRST_SCALE, ODD_SCALE])
def test_fused_path_is_torch_fused_sgd_bitwise(device, backend, maximize, init_scale):
    a, b, c = tiny_model(), tiny_model(), tiny_model()
    opt = nm_optim.SGD(a.parameters(), backend=backend, fused=True, maximize=maximize, **HYPER)
    fused = torch.optim.SGD(b.parameters(), fused=True, maximize=maximize, **HYPER)
    loop = DividingSGD(c.parameters(), foreach=False, maximize=maximize, **HYPER)
    assert opt._step_supports_amp_scaling
    # Step 5 overflows. (Not step 0: torch's fused SGD creates its buffers with torch.empty_like
    # before it reads found_inf and keeps them, uninitialised; see the next test.)
    runs = [scaled_training(m, o, torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=3), 10, (5,))
            for m, o in ((a, opt), (b, fused), (c, loop))]
    assert runs[0][5][0] < runs[0][4][0], "step 5 overflowed"
    assert_same_runs(runs[0], runs[1], f"{backend}, fused=True against torch's fused SGD", params=False)
    assert_same_runs(runs[0], runs[2], f"{backend}, fused=True against torch's for-loop on unscaled grads")


@pytest.mark.parametrize("device,backend", CPU_LOOP)
@pytest.mark.parametrize("fused", [False, True])
def test_overflow_on_the_first_step_writes_nothing_and_creates_no_state(device, backend, fused):
    model = tiny_model()
    opt = nm_optim.SGD(model.parameters(), lr=0.1, momentum=0.9, backend=backend, fused=fused)
    before = [p.detach().clone() for p in model.parameters()]
    scaler = torch.amp.GradScaler("cpu", init_scale=FIRST_SCALE)
    x, y = batch(0)
    scaler.scale(torch.nn.functional.cross_entropy(model(x), y)).backward()
    overflow(model)
    grads = [p.grad.clone() for p in model.parameters()]
    scaler.step(opt)
    scaler.update()
    assert len(opt.state) == 0, "no momentum buffer may exist after a skipped first step"
    for k, (p, b, g) in enumerate(zip(model.parameters(), before, grads)):
        assert_bitwise(p, b, f"param {k}")
        if fused:  # the step wrote nothing, grads included (torch's fused kernels return first)
            assert_bitwise(p.grad, g, f"param {k}.grad")


@pytest.mark.parametrize("device,backend", CPU)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("maximize", [False, True])
def test_grads_written_back_as_torch_fused_sgd_writes_them(device, backend, dtype, maximize):
    """Every kernel path (vector bodies and scalar tails, plain and statistics tiles, rows and
    cols tracks) leaves p.grad = grad / scale rounded to its dtype, before the maximize sign:
    torch.optim.SGD(fused=True)'s bits, with an odd scale. Params and buffers of fp32 / fp64
    too (fp16 / bf16 params are rounded once per step here, after every op in torch)."""
    shapes = [(1,), (7,), (13, 17), (40, 300), (3, 5, 2, 2)]
    gen = torch.Generator().manual_seed(0)
    ps = [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in shapes]
    qs = [p.detach().clone().requires_grad_() for p in ps]
    rs = [p.detach().clone().requires_grad_() for p in ps]
    opt = nm_optim.SGD(ps, backend=backend, fused=True, maximize=maximize,
                       track=[(ps[1], "all"), (ps[2], "rows"), (ps[3], "cols"), (ps[4], "cols")], **HYPER)
    fused = torch.optim.SGD(qs, fused=True, maximize=maximize, **HYPER)
    loop = DividingSGD(rs, foreach=False, maximize=maximize, **HYPER)
    for step in range(3):
        scaled = [(torch.randn(p.shape, generator=gen) * 1e4).to(dtype) for p in ps]
        for ts in (ps, qs, rs):
            for t, g in zip(ts, scaled):
                t.grad = g.clone()
        for o in (opt, fused, loop):  # what GradScaler.step sets on an optimizer that unscales itself
            o.grad_scale = torch.tensor(ODD_SCALE)
            o.found_inf = torch.tensor(0.0)
            o.step()
        for k, (p, q, r, g) in enumerate(zip(ps, qs, rs, scaled)):
            assert_bitwise(p.grad, q.grad, f"step {step}, {dtype} param {k}.grad against torch's fused SGD")
            assert not torch.equal(p.grad, g), "the grad was not written back"
            if dtype in (torch.float32, torch.float64) and backend in FOR_LOOP_BITS:
                assert_bitwise(p, r, f"step {step}, {dtype} param {k}")
                assert_bitwise(opt.state[p]["momentum_buffer"], loop.state[r]["momentum_buffer"],
                               f"step {step}, {dtype} param {k} momentum_buffer")


def test_amp_contract_follows_fused_through_copies_and_state_dicts():
    """As torch.optim.SGD: fused=True alone says step() unscales; a deepcopy or a pickle keeps
    it; loading a state dict (which carries the param groups' ``fused``) does not change it."""
    def fresh(fused):
        return nm_optim.SGD(tiny_model().parameters(), lr=0.1, momentum=0.9, fused=fused)

    for fused in (None, False, True):
        opt = fresh(fused)
        for o in (opt, copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
            assert getattr(o, "_step_supports_amp_scaling", False) == bool(fused)
    plain, fused = fresh(None), fresh(True)
    torch_fused = torch.optim.SGD(tiny_model().parameters(), lr=0.1, momentum=0.9, fused=True)
    plain.load_state_dict(torch_fused.state_dict())
    assert not getattr(plain, "_step_supports_amp_scaling", False)
    fused.load_state_dict(fresh(False).state_dict())
    assert fused._step_supports_amp_scaling


@pytest.mark.parametrize("device,backend", CPU_LOOP)
def test_found_inf_later_leaves_params_buffers_and_grads_untouched(device, backend):
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
    assert torch.isinf(p.grad).all(), "a skipped step writes no grad"
    # and with found_inf = 0 the scale is divided out inside the kernel, and the grad left unscaled
    opt.found_inf = torch.tensor(0.0)
    g = torch.randn(1000)
    p.grad = 4.0 * g
    opt.step()
    ref_p = p0.clone().requires_grad_()
    ref = torch.optim.SGD([ref_p], lr=0.1, momentum=0.9, weight_decay=0.1, foreach=False)
    ref.state[ref_p]["momentum_buffer"] = v0.clone()
    ref_p.grad = g
    ref.step()
    assert_bitwise(p, ref_p, "param after an unscaled step")
    assert_bitwise(p.grad, g, "grad after an unscaled step")
