"""nm_optim.SGD follows torch.optim.SGD step for step: params and momentum buffers, over every SGD
input of PyTorch's optim_db, every backend here, awkward shapes, dtypes, and state dicts that move
between the two optimizers mid-run."""

from __future__ import annotations

import copy
import io

import pytest
import torch
pytest.importorskip("expecttest", reason="torch.testing._internal needs expecttest (not installed here)")
from torch.testing._internal.common_optimizers import optim_db

import nm_optim
from helpers import assert_rel_close, device_backends

SGD_INFO = next(info for info in optim_db if info.optim_cls is torch.optim.SGD)
SGD_INPUTS = SGD_INFO.optim_inputs_func(device="cpu")

SHAPES = {
    "numel1": [(1,)],
    "primes": [(7,), (13, 17), (101,), (3, 5, 7)],
    "pow2pm1": [(1023,), (1024,), (1025,), (32767,), (32769,), (65537,)],
    "apex278011": [(278011,)],
    "conv2d4d": [(64, 3, 3, 3), (32, 16, 5, 5), (10, 20)],
    "empty": [(0,), (3, 0), (5,)],
    "mixed": [((i * 7919) % 3000 + 1,) for i in range(60)] + [(17, 33), (8, 4, 3, 3)],
}

STEPS = 24
FP32_TOL = 1e-6


def tol_for(device: str, backend: str, tol: float) -> float:
    """0 where the update is torch's bit for bit (the CPU kernel and the reference on the CPU, fp32
    and fp64: tests/test_bitwise.py), else `tol`."""
    return 0.0 if device == "cpu" and backend in ("cpu", "reference") else tol


def make_params(shapes, dtype=torch.float32, device="cpu", seed=0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn(s, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype).requires_grad_()
        for s in shapes
    ]


def clone_params(params, dtype=None) -> list[torch.Tensor]:
    return [p.detach().clone().to(dtype or p.dtype).requires_grad_() for p in params]


def set_grads(step: int, *param_lists, scale: float = 1.0) -> None:
    """The same gradient (drawn in float64, then cast) for every list, different per step."""
    gen = torch.Generator().manual_seed(1000 + step)
    grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale for p in param_lists[0]]
    for params in param_lists:
        for p, g in zip(params, grads):
            p.grad = g.to(device=p.device, dtype=p.dtype)


def kwargs_of(optim_input) -> dict:
    return copy.deepcopy(optim_input.kwargs)


def buffers(opt, params) -> list[torch.Tensor | None]:
    return [opt.state[p].get("momentum_buffer") if p in opt.state else None for p in params]


def assert_same_trajectory_point(ours, theirs, opt_ours, opt_theirs, tol, where):
    """Params and buffers agree to `tol` relative to max(|expected|, 1): every value in these
    tests is formed from O(1) params and gradients (see conftest.rel_err)."""
    for i, (p, q) in enumerate(zip(ours, theirs)):
        assert_rel_close(p, q, tol, f"{where}: param {i} {tuple(p.shape)}", floor=1.0)
    for i, (u, v) in enumerate(zip(buffers(opt_ours, ours), buffers(opt_theirs, theirs))):
        assert (u is None) == (v is None), f"{where}: momentum_buffer {i} exists in only one optimizer"
        if u is not None:
            assert u.dtype == v.dtype and u.shape == v.shape
            assert_rel_close(u, v, tol, f"{where}: momentum_buffer {i}", floor=1.0)


def roundtrip(state_dict):
    """Through torch.save / torch.load(weights_only=True), as a checkpoint would go."""
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("shapes", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("optim_input", SGD_INPUTS, ids=[i.desc.replace(" ", "_") for i in SGD_INPUTS])
def test_trajectory_matches_torch_sgd(device, backend, shapes, optim_input):
    """24 steps against torch.optim.SGD(foreach=False); at step 8 the state dict goes through
    torch.save / torch.load(weights_only=True) into a fresh nm_optim.SGD; at step 16 the state moves
    into a torch.optim.SGD that takes two steps itself, then back into a fresh nm_optim.SGD."""
    kw = kwargs_of(optim_input)
    ours = make_params(SHAPES[shapes], device=device)
    theirs = clone_params(ours)
    opt = nm_optim.SGD(ours, backend=backend, **kw)
    ref = torch.optim.SGD(theirs, foreach=False, **kwargs_of(optim_input))
    for step in range(STEPS):
        set_grads(step, ours, theirs)
        if step == 8:
            state = roundtrip(opt.state_dict())
            opt = nm_optim.SGD(ours, backend=backend, **kwargs_of(optim_input))
            opt.load_state_dict(state)
        if step in (16, 17):
            if step == 16:
                torch_opt = torch.optim.SGD(ours, foreach=False, **kwargs_of(optim_input))
                torch_opt.load_state_dict(roundtrip(opt.state_dict()))
            torch_opt.step()
        else:
            if step == 18:
                opt = nm_optim.SGD(ours, backend=backend, **kwargs_of(optim_input))
                opt.load_state_dict(roundtrip(torch_opt.state_dict()))
            opt.step()
        ref.step()
        current = torch_opt if step in (16, 17) else opt
        assert_same_trajectory_point(ours, theirs, current, ref, tol_for(device, backend, FP32_TOL), f"step {step}")


@pytest.mark.parametrize("device,backend", device_backends())
def test_two_param_groups_with_different_lr(device, backend):
    params = make_params(SHAPES["mixed"], device=device)
    copies = clone_params(params)
    half = len(params) // 2

    def groups(ps):
        return [
            {"params": ps[:half], "lr": 0.05},
            {"params": ps[half:], "lr": 0.002, "momentum": 0.5, "dampening": 0.1},
        ]

    opt = nm_optim.SGD(groups(params), lr=0.01, momentum=0.9, weight_decay=1e-2, backend=backend)
    ref = torch.optim.SGD(groups(copies), lr=0.01, momentum=0.9, weight_decay=1e-2, foreach=False)
    for step in range(STEPS):
        set_grads(step, params, copies)
        opt.step()
        ref.step()
    assert_same_trajectory_point(params, copies, opt, ref, tol_for(device, backend, FP32_TOL), "end")


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("optim_input", SGD_INPUTS, ids=[i.desc.replace(" ", "_") for i in SGD_INPUTS])
def test_float64_matches_torch_sgd(device, backend, optim_input):
    ours = make_params(SHAPES["mixed"], dtype=torch.float64, device=device)
    theirs = clone_params(ours)
    opt = nm_optim.SGD(ours, backend=backend, **kwargs_of(optim_input))
    ref = torch.optim.SGD(theirs, foreach=False, **kwargs_of(optim_input))
    for step in range(STEPS):
        set_grads(step, ours, theirs)
        opt.step()
        ref.step()
    assert_same_trajectory_point(ours, theirs, opt, ref, tol_for(device, backend, 1e-12), "end")


def l2_rel_err(actual, expected) -> float:
    """||actual - expected|| / ||expected|| over all elements of all tensors: a statistic of
    thousands of roundings, not the luck of one element."""
    a = torch.cat([t.detach().double().cpu().reshape(-1) for t in actual])
    e = torch.cat([t.detach().double().cpu().reshape(-1) for t in expected])
    return ((a - e).norm() / e.norm()).item()


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("optim_input", SGD_INPUTS, ids=[i.desc.replace(" ", "_") for i in SGD_INPUTS])
def test_low_precision_error_at_most_twice_torch(device, backend, dtype, optim_input):
    """Against a float64 run of the same trajectory, nm_optim in fp16 / bf16 (float32 arithmetic,
    one rounding per step) is off by at most twice what torch.optim.SGD in that dtype is off."""
    kw = kwargs_of(optim_input)
    if isinstance(kw.get("lr"), torch.Tensor):
        kw["lr"] = kw["lr"].item()  # one lr tensor cannot serve three dtypes' optimizers
    kw.setdefault("lr", 0.05)  # large enough that updates are not all lost to rounding
    exact = make_params(SHAPES["mixed"], dtype=torch.float64, device=device)
    ours = clone_params(exact, dtype)
    theirs = clone_params(exact, dtype)
    # Every run starts from the same (rounded) point, so only the step's own error is measured.
    for p, q in zip(exact, ours):
        p.data.copy_(q.double())
    opts = [
        nm_optim.SGD(exact, backend="reference", **kw),
        nm_optim.SGD(ours, backend=backend, **kw),
        torch.optim.SGD(theirs, foreach=False, **kw),
    ]
    for step in range(STEPS):
        set_grads(step, exact, ours, theirs)
        for p, q in zip(exact, ours):  # the float64 run sees the same rounded gradients
            p.grad.copy_(q.grad.double())
        for o in opts:
            o.step()
    err_ours, err_torch = l2_rel_err(ours, exact), l2_rel_err(theirs, exact)
    assert err_ours <= 2 * err_torch, f"params: ours {err_ours:.3e} vs torch {err_torch:.3e}"
    bufs_exact = buffers(opts[0], exact)
    if bufs_exact[0] is not None:
        err_ours = l2_rel_err(buffers(opts[1], ours), bufs_exact)
        err_torch = l2_rel_err(buffers(opts[2], theirs), bufs_exact)
        assert err_ours <= 2 * err_torch, f"buffers: ours {err_ours:.3e} vs torch {err_torch:.3e}"
        assert all(b.dtype == dtype for b in buffers(opts[1], ours))


@pytest.mark.parametrize("device,backend", device_backends())
def test_non_contiguous_and_channels_last_layouts(device, backend):
    """A transposed param, a channels_last conv weight and a grad whose strides differ from its
    param's: each is stepped correctly (the flat kernel takes what it can stream)."""
    base = make_params([(6, 4), (8, 3, 3, 3), (5, 7), (100,)], device=device)
    base[0] = base[0].detach().t().requires_grad_()  # non-contiguous param
    base[1] = base[1].detach().to(memory_format=torch.channels_last).requires_grad_()
    theirs = [p.detach().clone(memory_format=torch.preserve_format).requires_grad_() for p in base]
    opt = nm_optim.SGD(base, lr=0.1, momentum=0.9, weight_decay=0.01, backend=backend)
    ref = torch.optim.SGD(theirs, lr=0.1, momentum=0.9, weight_decay=0.01, foreach=False)
    for step in range(STEPS):
        set_grads(step, base, theirs)
        base[2].grad = base[2].grad.t().contiguous().t()  # same values, transposed strides
        opt.step()
        ref.step()
    assert_same_trajectory_point(base, theirs, opt, ref, FP32_TOL, "end")


NATIVE = [p for p in device_backends() if p.values[1] != "reference"]


@pytest.mark.parametrize("device,backend", NATIVE)
@pytest.mark.parametrize("optim_input", SGD_INPUTS, ids=[i.desc.replace(" ", "_") for i in SGD_INPUTS])
def test_kernel_matches_reference_backend(device, backend, optim_input):
    """The compiled kernel against the in-package reference (same formula, same compute type):
    within 1e-6 of max |value| per tensor, params and buffers, after 24 steps."""
    shapes = SHAPES["mixed"] + SHAPES["apex278011"] + SHAPES["conv2d4d"]
    ours = make_params(shapes, device=device)
    oracle = clone_params(ours)
    opt = nm_optim.SGD(ours, backend=backend, **kwargs_of(optim_input))
    ref = nm_optim.SGD(oracle, backend="reference", **kwargs_of(optim_input))
    for step in range(STEPS):
        set_grads(step, ours, oracle)
        opt.step()
        ref.step()
    tol = tol_for(device, backend, FP32_TOL)
    for i, (p, q) in enumerate(zip(ours, oracle)):
        assert_rel_close(p, q, tol, f"param {i} {tuple(p.shape)}")
    for i, (u, v) in enumerate(zip(buffers(opt, ours), buffers(ref, oracle))):
        if u is not None:
            assert_rel_close(u, v, tol, f"momentum_buffer {i}")
