"""Statistics are right whatever the memory layout of a parameter: channels_last convs,
transposed and permuted tensors are stepped natively (through the row-major view of their memory,
nm_optim/ops/layout.py StorageView) with every track axis, on every backend; non-dense views go
through the reference. The update does not depend on the layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nm_optim
from nm_optim.ops import op as op_module
from helpers import assert_stats_close, device_backends, expected_stats

LAYOUTS = {
    "channels_last": lambda: torch.randn(8, 6, 3, 3).to(memory_format=torch.channels_last),
    "channels_last_3d": lambda: torch.randn(4, 3, 2, 3, 2).to(memory_format=torch.channels_last_3d),
    "transposed": lambda: torch.randn(5, 7).t(),
    "permuted_3d": lambda: torch.randn(4, 5, 6).permute(2, 0, 1),
    "permuted_inner": lambda: torch.randn(4, 5, 6).permute(1, 2, 0),
    "swapped_middle": lambda: torch.randn(3, 4, 5, 6).permute(0, 2, 1, 3),
    "long_rows_t": lambda: torch.randn(300, 41).t(),  # more than one 128 x 128 GPU tile
    "sliced": lambda: torch.randn(6, 10)[:, ::2],  # not dense: the reference
}


def like(p: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A tensor with p's strides, as autograd's AccumulateGrad makes a param's grad."""
    return torch.empty_like(p, memory_format=torch.preserve_format).copy_(torch.randn(p.shape, generator=gen))


def run(layout: str, device: str, backend: str, steps: int = 2):
    torch.manual_seed(0)
    p = torch.nn.Parameter(LAYOUTS[layout]().to(device))
    tracks = [(p, "rows"), (p, "cols"), (p, "all")]
    opt = nm_optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=0.01, backend=backend, track=tracks)
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        pre_p = p.detach().double().cpu().clone()
        pre_v = opt.state[p]["momentum_buffer"].double().cpu().clone() if p in opt.state else torch.zeros(p.shape).double()
        p.grad = like(p.detach(), gen).to(device)
        g = p.grad.double().cpu()
        opt.step()
        for (_, axis), got in zip(tracks, opt.last_stats()):
            want, scale = expected_stats(pre_p, g, pre_v, axis)
            assert_stats_close(got, want, scale, f"{layout} step {step} {axis}")
    return p.detach().clone()


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_statistics_are_right_in_every_layout(layout, device, backend):
    run(layout, device, backend)


@pytest.mark.parametrize("layout", [name for name in LAYOUTS if name != "sliced"])
def test_dense_layouts_run_on_the_kernel_not_the_reference(layout, monkeypatch):
    if "cpu" not in nm_optim.available_backends("cpu"):
        pytest.skip("nm_optim._C not built")
    used = []
    real = op_module.backend_step
    monkeypatch.setattr(op_module, "backend_step", lambda name: used.append(name) or real(name))
    run(layout, "cpu", "cpu", steps=1)
    assert "reference" not in used


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_the_update_does_not_depend_on_the_layout(layout):
    """Element-wise, the same operations: a permuted param ends bitwise where its contiguous
    copy does (a non-dense one goes through the reference, which is torch's bits as the kernel is)."""
    if "cpu" not in nm_optim.available_backends("cpu"):
        pytest.skip("nm_optim._C not built")
    torch.manual_seed(0)
    a = torch.nn.Parameter(LAYOUTS[layout]())
    b = torch.nn.Parameter(a.detach().contiguous().clone())
    opts = [nm_optim.SGD([q], lr=0.1, momentum=0.9, weight_decay=0.01, backend="cpu", track=[(q, "cols")])
            for q in (a, b)]
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        a.grad = like(a.detach(), gen)
        b.grad = a.grad.contiguous().clone()
        for opt in opts:
            opt.step()
    assert torch.equal(a.detach(), b.detach())


def test_a_channels_last_model_records_what_the_contiguous_model_records():
    """The symmetries' statistics of a channels_last convnet equal those of the same net in the
    default layout, given the same gradients (to the float32 rounding of the kernels' partial
    sums, which group the elements differently)."""
    from nm_optim import models

    torch.manual_seed(0)
    nets = [models.get_model("small_vgg_bn", in_channels=1, image_size=8) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    nets[1] = nets[1].to(memory_format=torch.channels_last)
    assert any(not p.is_contiguous() for p in nets[1].parameters()), "the test needs channels_last weights"
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    opts = [nm_optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3,
                         symmetries=nm_optim.find_symmetries(net, x[:2])) for net in nets]
    for _ in range(3):
        for opt in opts:
            opt.zero_grad()
        torch.nn.functional.cross_entropy(nets[0](x), y).backward()
        for a, b in zip(nets[0].parameters(), nets[1].parameters()):
            b.grad = torch.empty_like(b, memory_format=torch.preserve_format).copy_(a.grad)
        for opt in opts:
            opt.step()
    records = [opt.recorder.snapshot() for opt in opts]
    for t, s0, s1 in zip(records[0].tracks, records[0].stats, records[1].stats):
        # The scale and rescale tracks reduce the products only: the other columns NaN in both.
        assert np.array_equal(np.isnan(s0), np.isnan(s1)), t["name"]
        assert np.nanmax(abs(s0 - s1)) <= 1e-6 * np.nanmax(abs(s0)), t["name"]


# -- a property test over layouts: update bitwise torch's, statistics exact ---------------


def _layout(draw_perm, base_shape, kind, dtype):
    """A tensor of `base_shape` and `dtype` in the memory layout `kind`."""
    t = torch.randn(base_shape, dtype=dtype)
    if kind == "permuted":
        return t.permute(draw_perm).contiguous().permute(_inverse(draw_perm))  # dense, other order
    if kind == "sliced":  # not dense: the reference steps it
        return torch.randn(*base_shape[:-1], 2 * base_shape[-1], dtype=dtype)[..., ::2]
    return t


def _inverse(perm):
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return tuple(inv)


@st.composite
def layout_cases(draw):
    ndim = draw(st.integers(2, 4))
    shape = tuple(draw(st.lists(st.integers(1, 7), min_size=ndim, max_size=ndim)))
    kind = draw(st.sampled_from(["contiguous", "permuted", "sliced"]))
    perm = tuple(draw(st.permutations(range(ndim))))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    axes = draw(st.lists(st.sampled_from(["rows", "cols", "all"]), min_size=1, max_size=3, unique=True))
    # the "cols" track's column block: any divisor of size(1) (1: one group per column)
    block = draw(st.sampled_from([b for b in range(1, shape[1] + 1) if shape[1] % b == 0]))
    hyper = draw(st.sampled_from([dict(), dict(momentum=0.9, weight_decay=1e-2),
                                  dict(momentum=0.9, dampening=0.3), dict(momentum=0.8, nesterov=True)]))
    return shape, kind, perm, dtype, axes, block, hyper


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=layout_cases())
def test_every_layout_is_torch_bitwise_with_exact_statistics(backend, case):
    """Random shapes, layouts (contiguous, a dense permutation, a strided slice), dtypes, axes,
    column blocks and hyper-parameters: params and buffers bitwise torch.optim.SGD's, statistics
    within 1e-6 of the summed magnitudes of a float64 computation, for every track axis."""
    if backend not in nm_optim.available_backends("cpu"):
        pytest.skip(f"backend {backend!r} not available")
    shape, kind, perm, dtype, axes, block, hyper = case
    torch.manual_seed(0)
    base = _layout(perm, shape, kind, dtype)
    ours = torch.nn.Parameter(base)  # keeps base's strides (a dense permutation, or a strided slice)
    theirs = torch.nn.Parameter(ours.detach().clone(memory_format=torch.preserve_format))
    tracks = [(ours, a, None, block) if a == "cols" else (ours, a) for a in axes]
    opt = nm_optim.SGD([ours], lr=0.1, backend=backend, track=tracks, **hyper)
    ref = torch.optim.SGD([theirs], lr=0.1, **hyper)
    gen = torch.Generator().manual_seed(1)
    for step in range(3):
        pre_p = ours.detach().double().clone()
        pre_v = opt.state[ours]["momentum_buffer"].double().clone() if ours in opt.state else torch.zeros(shape).double()
        g = like(ours.detach(), gen).to(dtype)
        ours.grad, theirs.grad = g, g.clone(memory_format=torch.preserve_format)
        opt.step()
        ref.step()
        assert torch.equal(ours.detach().contiguous().view(-1), theirs.detach().contiguous().view(-1)), \
            f"step {step}: the update is not torch's bits"
        for (_, axis, *_), got in zip(tracks, opt.last_stats()):
            b = block if axis == "cols" else 1
            want, scale = expected_stats(pre_p, g.double(), pre_v, axis, b)
            assert_stats_close(got, want, scale, f"{kind} {shape} step {step} {axis} block {b}")
