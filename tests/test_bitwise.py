"""The update is torch's, bit for bit (docs/architecture.md, "The update").

- "cpu" and "reference" against torch.optim.SGD with its defaults on the CPU (the for-loop path,
  `_single_tensor_sgd`): fp32 / fp64 params and momentum buffers are bitwise equal, for every
  hyper-parameter path, float and tensor lr, a scheduler, None grads, several param groups and
  steps, tensors of any length (vector bodies, tails, OpenMP splits). Hypothesis draws the cases.
- fp16 / bf16 are computed in float32 and rounded once per step: each step is bitwise the float32
  step (torch's, on the upcast values) rounded to the storage type.
- Tracks on or off: the same update, bit for bit (the statistics path and the plain path).
- Triton (interpreter on the CPU): torch's fused CUDA expression (FusedSgdKernel.cu), emulated
  here in float64 with a true fma, bitwise; tracks on or off bitwise.

csrc/sgd_math.h explains which torch operations each backend mirrors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import run_in_child
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nm_optim

INT_OF = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16,
          torch.bfloat16: torch.int16}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(INT_OF[t.dtype])


def assert_bitwise(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    a, e = bits(actual), bits(expected)
    if not torch.equal(a, e):
        bad = (a != e).nonzero().flatten()
        i = bad[0].item()
        x, y = actual.detach().reshape(-1)[i].item(), expected.detach().reshape(-1)[i].item()
        raise AssertionError(f"{what}: {bad.numel()} of {a.numel()} elements differ "
                             f"(first at {i}: {x!r} vs {y!r})")


def buffer_of(opt, p):
    return opt.state[p].get("momentum_buffer") if p in opt.state else None


# -- a run of two optimizers side by side -----------------------------------------------------------


def make_params(shapes, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).requires_grad_() for s in shapes]


def make_grads(params, step, seed, none_prob):
    """The same gradients for every optimizer: float64 draws cast to the dtype; some None."""
    gen = torch.Generator().manual_seed(seed * 1000 + step)
    out = []
    for p in params:
        g = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
        drop = torch.rand((), generator=gen).item() < none_prob
        out.append(None if drop else g)
    return out


def lr_value(lr, kind):
    if kind == "float":
        return lr
    return torch.tensor(lr, dtype=torch.float32 if kind == "tensor32" else torch.float64)


def build(opt_cls, params, groups, lr_kind, **kw):
    """Param groups: param i in group i % len(groups), each group with its own hyper-parameters."""
    pg = []
    for k, hyper in enumerate(groups):
        members = params[k :: len(groups)]
        if members:
            h = dict(hyper)
            h["lr"] = lr_value(h["lr"], lr_kind)
            pg.append({"params": members, **h})
    return opt_cls(pg, lr=0.01, **kw)


def scheduler_of(opt, kind):
    if kind == "exp":
        return torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.7)
    if kind == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.3)
    return None


def run_side_by_side(shapes, dtype, groups, lr_kind, steps, backend, seed=0, none_prob=0.2,
                     sched=None, track=None):
    """torch.optim.SGD (defaults: the for-loop on the CPU) and nm_optim.SGD on copies of the same
    params, fed the same gradients; asserts bitwise equality after every step."""
    theirs = make_params(shapes, dtype, seed)
    ours = [p.detach().clone().requires_grad_() for p in theirs]
    opt_t = build(torch.optim.SGD, theirs, groups, lr_kind)
    track_spec = track(ours) if callable(track) else track
    opt_o = build(nm_optim.SGD, ours, groups, lr_kind, backend=backend, track=track_spec)
    s_t, s_o = scheduler_of(opt_t, sched), scheduler_of(opt_o, sched)
    for step in range(steps):
        for p, q, g in zip(theirs, ours, make_grads(theirs, step, seed, none_prob)):
            p.grad = None if g is None else g.clone()
            q.grad = None if g is None else g.clone()
        opt_t.step()
        opt_o.step()
        if s_t is not None:
            s_t.step()
            s_o.step()
        for i, (p, q) in enumerate(zip(theirs, ours)):
            where = f"{backend} step {step} param {i} {tuple(p.shape)} {dtype}"
            assert_bitwise(q, p, where)
            bt, bo = buffer_of(opt_t, p), buffer_of(opt_o, q)
            assert (bt is None) == (bo is None), f"{where}: momentum buffer in only one optimizer"
            if bt is not None:
                assert_bitwise(bo, bt, f"{where}: momentum buffer")
    return ours, opt_o


# -- regression tests: defects once found here ------------------------------------------------


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_issue12_defect2_momentum_is_torch_bitwise(backend):
    """momentum 0.9, two steps, 100k fp32 elements: 28% of the buffer and 3.5% of the params were
    1 ulp off torch (one rounding of momentum * v + d where torch rounds twice)."""
    groups = [dict(lr=0.1, momentum=0.9)]
    run_side_by_side([(100_003,)], torch.float32, groups, "float", 2, backend, none_prob=0.0)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_issue12_defect2_weight_decay_nesterov_dampening(backend):
    """The weight-decay term, nesterov and dampening are rounded as torch rounds them."""
    groups = [dict(lr=0.05, momentum=0.9, weight_decay=1e-2, nesterov=True),
              dict(lr=0.3, momentum=0.5, dampening=0.25, weight_decay=3e-3, maximize=True)]
    for dtype in (torch.float32, torch.float64):
        run_side_by_side([(100_003,), (1001,), (67,)], dtype, groups, "float", 3, backend, none_prob=0.0)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_issue12_defect3_tracks_do_not_change_the_update(backend):
    """One step with weight decay, 100k elements: with tracks 37 buffer elements differed from the
    same step without them (the statistics loop rounded the update differently)."""
    shapes = [(100, 1000), (64, 3, 5, 7), (1000,)]
    hyper = dict(lr=0.1, momentum=0.9, weight_decay=1e-2)
    for dtype in (torch.float32, torch.float64):
        tracked_vs_plain(shapes, dtype, hyper, 2, backend, 0, None, none_prob=0.0, tracks=[
            lambda ps: [(ps[0], "rows"), (ps[0], "cols"), (ps[1], "cols"), (ps[2], "all")], "layers"])


# -- the property test -------------------------------------------------------------------------------

SHAPE_POOL = [(), (0,), (3, 0), (1,)] + [(n,) for n in range(1, 71)] + [
    (97,), (255,), (257,), (1023,), (4099,), (7, 13), (16, 3, 3, 3), (5, 4, 3), (33, 65)]
LARGE = [(65_537,), (100_003,), (131_101,)]  # above the one-thread threshold: OpenMP tiles and tails


@st.composite
def hyper_groups(draw):
    def one():
        momentum = draw(st.one_of(st.sampled_from([0.0, 0.9, 0.5]), st.floats(0.0, 0.99)))
        dampening = draw(st.one_of(st.sampled_from([0.0, 0.1]), st.floats(0.0, 1.0)))
        nesterov = momentum > 0 and dampening == 0 and draw(st.booleans())
        return dict(
            lr=draw(st.one_of(st.sampled_from([0.1, 1e-3]), st.floats(1e-4, 1.0))),
            momentum=momentum,
            dampening=dampening,
            nesterov=nesterov,
            weight_decay=draw(st.one_of(st.sampled_from([0.0, 1e-4, 0.05]), st.floats(0.0, 0.1))),
            maximize=draw(st.booleans()),
        )
    return [one() for _ in range(draw(st.integers(1, 2)))]


@st.composite
def cases(draw):
    shapes = draw(st.lists(st.sampled_from(SHAPE_POOL), min_size=1, max_size=4))
    if draw(st.booleans()):
        shapes.append(draw(st.sampled_from(LARGE)))
    return dict(
        shapes=shapes,
        dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        groups=draw(hyper_groups()),
        lr_kind=draw(st.sampled_from(["float", "tensor32", "tensor64"])),
        steps=draw(st.integers(1, 4)),
        sched=draw(st.sampled_from([None, "exp", "step"])),
        seed=draw(st.integers(0, 2**16)),
        none_prob=draw(st.sampled_from([0.0, 0.3])),
    )


def check_case(case, backend):
    run_side_by_side(case["shapes"], case["dtype"], case["groups"], case["lr_kind"], case["steps"], backend,
                     seed=case["seed"], none_prob=case["none_prob"], sched=case["sched"])


PROPERTY = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PROPERTY_SLOW = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@PROPERTY
@given(case=cases())
def test_bitwise_torch_sgd(backend, case):
    check_case(case, backend)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["cpu", "reference"])
@PROPERTY_SLOW
@given(case=cases())
def test_bitwise_torch_sgd_many(backend, case):
    check_case(case, backend)


# -- fp16 / bf16: float32 compute, one rounding per step ------------------------------------------


def check_low_precision(shapes, dtype, hyper, lr_kind, steps, backend, seed):
    """Each step equals torch.optim.SGD's float32 step on the upcast values (params, grads and
    buffers), rounded once to `dtype`."""
    ours = make_params(shapes, dtype, seed)
    h = dict(hyper)
    opt = nm_optim.SGD(ours, **{**h, "lr": lr_value(h["lr"], lr_kind)}, backend=backend)
    for step in range(steps):
        grads = make_grads(ours, step, seed, 0.2)
        p32 = [p.detach().float().requires_grad_() for p in ours]
        ref = torch.optim.SGD(p32, **{**h, "lr": lr_value(h["lr"], lr_kind)})
        for p, q, g in zip(ours, p32, grads):
            p.grad = g
            q.grad = None if g is None else g.float()
            b = buffer_of(opt, p)
            if b is not None:
                ref.state[q]["momentum_buffer"] = b.float().clone()
        opt.step()
        ref.step()
        for i, (p, q) in enumerate(zip(ours, p32)):
            where = f"{backend} {dtype} step {step} param {i} {tuple(p.shape)}"
            assert_bitwise(p, q.detach().to(dtype), where)
            b, bq = buffer_of(opt, p), buffer_of(ref, q)
            assert (b is None) == (bq is None), where
            if b is not None:
                assert_bitwise(b, bq.to(dtype), f"{where}: momentum buffer")


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@settings(max_examples=15, deadline=None)
@given(shapes=st.lists(st.sampled_from(SHAPE_POOL + [(20_011,)]), min_size=1, max_size=4),
       dtype=st.sampled_from([torch.float16, torch.bfloat16]), groups=hyper_groups(),
       lr_kind=st.sampled_from(["float", "tensor32"]), steps=st.integers(1, 3), seed=st.integers(0, 999))
def test_low_precision_is_one_rounding_of_fp32(backend, shapes, dtype, groups, lr_kind, steps, seed):
    check_low_precision(shapes, dtype, groups[0], lr_kind, steps, backend, seed)


# -- tracks on vs off -----------------------------------------------------------------------------

TRACK_SHAPES = [(), (1,), (7,), (37, 5), (64, 3, 3, 3), (3, 70), (130, 9), (2049,), (9, 1, 4)]


def track_spec_of(params, axes_seed):
    rng = np.random.default_rng(axes_seed)
    out = []
    for p in params:
        for axis, ndim in (("rows", 1), ("cols", 2), ("all", 0)):
            if p.dim() >= ndim and rng.random() < 0.6:
                out.append((p, axis))
    return out


def tracked_vs_plain(shapes, dtype, hyper, steps, backend, seed, axes_seed, none_prob=0.2, tracks=None):
    """The same steps without tracks, with "layers" and with random tracks: bitwise the same."""
    runs = []
    tracks = tracks or ["layers", lambda ps: track_spec_of(ps, axes_seed)]
    for track in [None, *tracks]:
        params = make_params(shapes, dtype, seed)
        opt = nm_optim.SGD(params, **hyper, backend=backend,
                           track=track(params) if callable(track) else track)
        for step in range(steps):
            for p, g in zip(params, make_grads(params, step, seed, none_prob)):
                p.grad = g
            opt.step()
        runs.append((params, [buffer_of(opt, p) for p in params]))
    (p0, b0) = runs[0]
    for k, (ps, bs) in enumerate(runs[1:]):
        for i in range(len(p0)):
            assert_bitwise(ps[i], p0[i], f"{backend} tracks run {k} param {i}")
            assert (bs[i] is None) == (b0[i] is None)
            if b0[i] is not None:
                assert_bitwise(bs[i], b0[i], f"{backend} tracks run {k} buffer {i}")


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@settings(max_examples=15, deadline=None)
@given(shapes=st.lists(st.sampled_from(TRACK_SHAPES + [(300, 400)]), min_size=1, max_size=4),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]),
       groups=hyper_groups(), steps=st.integers(1, 3), seed=st.integers(0, 999),
       axes_seed=st.integers(0, 999))
def test_tracks_do_not_change_the_update(backend, shapes, dtype, groups, steps, seed, axes_seed):
    tracked_vs_plain(shapes, dtype, groups[0], steps, backend, seed, axes_seed)


# -- the CPU kernel's baseline (no FMA) variant ----------------------------------------------------


@pytest.mark.skipif("cpu" not in nm_optim.available_backends("cpu"), reason="no compiled CPU kernel")
def test_baseline_variant_follows_torch_default_capability():
    """With ATEN_CPU_CAPABILITY=default torch's CPU kernels round every multiply and add (no FMA):
    the CPU kernel then runs its baseline variant, which does the same. Run in a child process,
    since both read the variable once."""
    code = (
        "import torch, test_bitwise as t\n"
        "assert torch.backends.cpu.get_cpu_capability() == 'DEFAULT'\n"
        "import nm_optim; assert nm_optim.build_info()['cpu_simd'].startswith('baseline')\n"
        "g = [dict(lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=True),"
        " dict(lr=0.2, momentum=0.8, dampening=0.1, weight_decay=1e-3, maximize=True)]\n"
        "shapes = [(n,) for n in range(1, 71)] + [(100_003,), (1001,), (4099,), ()]\n"
        "for dt in (torch.float32, torch.float64):\n"
        "    for lr_kind in (('float', 'tensor32') if dt == torch.float32 else ('float',)):\n"
        "        t.run_side_by_side(shapes, dt, g, lr_kind, 3, 'cpu', none_prob=0.1, sched='exp')\n"
        "    t.tracked_vs_plain([(37, 5), (130, 9), (2049,)], dt, g[0], 2, 'cpu', 1, 2)\n"
        "t.check_low_precision([(1001,), (33,)], torch.float16, g[0], 'float', 2, 'cpu', 3)\n"
        "print('ok')\n"
    )
    run_in_child(code, ATEN_CPU_CAPABILITY="default")


# -- Triton: torch's fused CUDA expression ------------------------------------------------------


def fused_cuda_emulation(p, g, v, first, hyper, lr):
    """torch's FusedSgdKernel.cu sgd_math on the CPU, in NumPy float64 with a true fma (nvcc
    contracts a * b + c): opmath values, double hyper-parameters. Returns (p', v')."""
    from triton._C.libtriton import interpreter as tri

    def fma(a, b, c):
        a, b, c = np.broadcast_arrays(np.float64(a), np.float64(b), np.float64(c))
        return tri.fma_fp64(np.ascontiguousarray(a), np.ascontiguousarray(b), np.ascontiguousarray(c))

    cdt = np.float64 if p.dtype == torch.float64 else np.float32
    pc = p.detach().double().numpy().astype(cdt)
    gc = g.detach().double().numpy().astype(cdt)
    if hyper.get("maximize"):
        gc = -gc
    wd, mom, damp = hyper.get("weight_decay", 0.0), hyper.get("momentum", 0.0), hyper.get("dampening", 0.0)
    if wd != 0:
        gc = fma(wd, pc, gc).astype(cdt)
    vn = None
    if mom != 0:
        buf = gc.astype(np.float64) if first else fma(mom, v.detach().double().numpy().astype(cdt),
                                                      (1 - damp) * gc.astype(np.float64))
        vn = buf.astype(cdt)
        gc = fma(mom, buf, gc).astype(cdt) if hyper.get("nesterov") else vn
    pn = fma(-lr, gc, pc).astype(cdt)
    return pn, vn


triton_here = pytest.mark.skipif("triton" not in nm_optim.available_backends("cpu"),
                                  reason="backend 'triton' not available for cpu here")


def _interpreter_fma_is_exact() -> bool:
    try:
        from triton._C.libtriton import interpreter as tri
    except ImportError:
        return False
    return hasattr(tri, "fma_fp64")  # Triton 3.6's interpreter multiplies and adds: two roundings


@triton_here
@pytest.mark.skipif(not _interpreter_fma_is_exact(), reason="this Triton's interpreter rounds tl.fma twice (no fma_fp64)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_triton_is_torch_fused_cuda_expression(dtype):
    """Two steps (the buffer's first and a later one) of tiny tensors through the plain and the
    statistics kernels: bitwise the emulated fused CUDA expression (fp16: computed in float32,
    rounded once per step, as torch's fused kernel), and tracks on == tracks off."""
    shapes = [(37,), (5, 7), (1,)]
    hyper = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=1e-2, nesterov=True, maximize=True)
    for track in (None, lambda ps: [(ps[1], "rows"), (ps[1], "cols"), (ps[0], "all")]):
        params = make_params(shapes, dtype, 5)
        opt = nm_optim.SGD(params, **hyper, backend="triton", track=track(params) if track else None)
        for step in range(2):
            grads = make_grads(params, step, 5, 0.0)
            expected = [fused_cuda_emulation(p, g, buffer_of(opt, p), step == 0, hyper, hyper["lr"])
                        for p, g in zip(params, grads)]
            for p, g in zip(params, grads):
                p.grad = g
            opt.step()
            for i, (p, (pe, ve)) in enumerate(zip(params, expected)):
                assert_bitwise(p, torch.from_numpy(pe).reshape(p.shape).to(dtype), f"triton step {step} param {i}")
                assert_bitwise(buffer_of(opt, p), torch.from_numpy(ve).reshape(p.shape).to(dtype),
                               f"triton step {step} buffer {i}")


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("track", [False, True])
def test_maximize_flips_the_sign_of_nan_grads_as_torch_does(backend, dtype, track):
    """torch's for-loop step negates the grad under maximize (`-grad`), which flips a NaN's sign
    bit; a multiply by -1 keeps it on x86. NaNs of both signs, in vector bodies and scalar tails,
    plain and statistics kernels: params and buffers carry torch's NaN bits."""
    for momentum in (0.0, 0.9):
        torch.manual_seed(0)
        shapes = [(1037,), (33, 65)]
        ours = [torch.randn(s, dtype=dtype) for s in shapes]
        theirs = [p.clone() for p in ours]
        spec = [(ours[0], "all"), (ours[1], "rows"), (ours[1], "cols")] if track else None
        hyper = dict(lr=0.1, momentum=momentum, weight_decay=1e-2, maximize=True)
        opt = nm_optim.SGD(ours, **hyper, backend=backend, track=spec)
        ref = torch.optim.SGD(theirs, **hyper, foreach=False)
        for step in range(3):
            for a, b in zip(ours, theirs):
                g = torch.randn(a.shape, dtype=dtype)
                g.view(-1)[step::7] = float("nan")
                g.view(-1)[step + 3::11] = -float("nan")
                a.grad, b.grad = g.clone(), g.clone()
            opt.step()
            ref.step()
            for i, (a, b) in enumerate(zip(ours, theirs)):
                assert_bitwise(a, b, f"momentum {momentum} step {step} param {i}")
                if momentum:
                    assert_bitwise(buffer_of(opt, a), buffer_of(ref, b), f"momentum {momentum} step {step} buffer {i}")
