"""The Triton backend: the same step and statistics as the reference, in one fused pass.

Without a GPU the kernels run on CPU tensors in Triton's interpreter (conftest sets
TRITON_INTERPRET=1), the same kernel source the GPU compiles. The interpreter is slow, so this
file picks its cases: trajectories over awkward shapes (tiles, partial tiles, rows longer than a
column block, single rows and columns, empty tensors) for every dtype and the hyper-parameter
paths, the statistics against float64 up to 10^6-element groups, AMP skips and determinism. The
broad parametrised suites (test_parity, test_stats, ...) also run "cpu-triton", marked slow.
On a GPU machine every test here runs on CUDA tensors, plus CUDA-graph capture (marked gpu).
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nm_optim
from helpers import assert_rel_close
from helpers import SHAPES, axes_for, run_and_check

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

pytestmark = pytest.mark.skipif(
    "triton" not in nm_optim.available_backends(DEVICE),
    reason=f"backend 'triton' not available for {DEVICE} here (needs triton; on CPU, TRITON_INTERPRET=1)",
)

# (shape, axes tracked): flat tiles (untracked, 1-D rows, an "all" over several tiles), 2-D tiles
# with partial row and column blocks, a single row / column, and empty tensors.
TRAJECTORY_SHAPES = [
    ((1,), ("rows", "all")),
    ((7,), ()),
    ((20000,), ("all",)),  # two flat tiles
    ((13, 17), ("rows", "cols", "all")),
    ((3, 5, 7, 11), ("rows", "cols")),  # 4-D: a "cols" group spans rows and the trailing dims
    ((130, 300), ("rows", "cols", "all")),  # 2 row blocks x 3 column blocks, both partial
    ((300, 1), ("cols", "all")),  # rows of one element
    ((1, 300), ("rows", "cols")),
    ((40, 9), ()),
    ((0,), ("rows", "all")),
    ((3, 0), ("rows", "cols", "all")),
]

TOL = {torch.float32: 1e-6, torch.float64: 1e-12, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def make_params(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(device=DEVICE, dtype=dtype).requires_grad_() for s, _ in TRAJECTORY_SHAPES]


def tracks_of(params):
    return [(p, axis) for p, (_, axes) in zip(params, TRAJECTORY_SHAPES) for axis in axes]


@pytest.mark.parametrize(
    "dtype,hyper",
    [
        (torch.float32, dict(momentum=0.9, dampening=0.1, weight_decay=1e-2)),
        (torch.float32, dict(momentum=0.9, nesterov=True, maximize=True)),
        (torch.float32, dict(weight_decay=1e-3)),
        (torch.float32, dict(momentum=0.5, lr_tensor=True)),
        (torch.bfloat16, dict(momentum=0.9, weight_decay=1e-2)),
        (torch.float16, dict(momentum=0.9, nesterov=True)),
        (torch.float64, dict(momentum=0.9, dampening=0.3, weight_decay=1e-2)),
    ],
    ids=["f32-momentum-dampening-wd", "f32-nesterov-maximize", "f32-no-momentum", "f32-tensor-lr",
         "bf16-momentum-wd", "f16-nesterov", "f64-momentum-dampening-wd"],
)
def test_trajectory_matches_the_reference_backend(dtype, hyper):
    """Params, momentum buffers and every track's statistics, step after step, against the
    reference backend fed the same gradients (same formula, same compute type)."""
    hyper = dict(hyper)
    lr = torch.tensor(0.05, device=DEVICE) if hyper.pop("lr_tensor", False) else 0.05
    a, b = make_params(dtype), make_params(dtype)
    opt = nm_optim.SGD(a, lr=lr, backend="triton", track=tracks_of(a), **hyper)
    ref = nm_optim.SGD(b, lr=copy.deepcopy(lr), backend="reference", track=tracks_of(b), **hyper)
    tol = TOL[dtype]
    for step in range(3):
        gen = torch.Generator().manual_seed(100 + step)
        for p, q in zip(a, b):
            g = torch.randn(p.shape, generator=gen).to(device=DEVICE, dtype=dtype)
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        for i, (p, q) in enumerate(zip(a, b)):
            what = f"step {step}, param {i} {tuple(p.shape)}"
            assert_rel_close(p, q, tol, f"{what}: param")
            if "momentum" in hyper:
                assert_rel_close(opt.state[p]["momentum_buffer"], ref.state[q]["momentum_buffer"], tol,
                                 f"{what}: momentum buffer")
        for t, got, want in zip(opt.tracks, opt.last_stats(), ref.last_stats()):
            # Another summation order than the reference's: relative to |sum| + 1 (the terms are
            # O(1), so a group sum that cancels to ~0 is compared at the scale of its terms).
            # fp16 / bf16: Triton follows torch's fused CUDA expression, the reference torch's CPU
            # for-loop, so a param may end one storage ulp apart and the next step's pre-step sums
            # differ by that much: a few storage ulps for groups of single elements (bf16: 2^-8).
            scale = want.abs() + 1.0
            err = ((got - want).abs() / scale).max().item() if got.numel() else 0.0
            stats_tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 4e-3}.get(dtype, 3e-2)
            assert err <= stats_tol, (
                f"step {step} {t.name}: stats differ from the reference by {err:.2e}"
            )
        if isinstance(lr, torch.Tensor):  # a scheduler moving a tensor lr: no recompiles, no sync
            opt.param_groups[0]["lr"].mul_(0.8)
            ref.param_groups[0]["lr"].mul_(0.8)


@pytest.mark.slow  # about 2 minutes in the interpreter (10^6-element groups, 313 tiles of one tensor)
@pytest.mark.parametrize("hyper", [dict(momentum=0.9, dampening=0.1, weight_decay=1e-2)], ids=["momentum_dampening_wd"])
def test_stats_match_float64_on_the_awkward_shapes_up_to_a_million_elements(hyper):
    """test_stats.SHAPES (numel 1, primes, 278011, 4-D conv weights, rows longer than a tile,
    a single column, 10^6-element groups, empty tensors): <= 1e-6 relative to the sum of
    |terms|."""
    torch.manual_seed(0)
    params = [torch.randn(s, device=DEVICE, requires_grad=True) for s in SHAPES]
    tracks = [(p, axis) for p in params for axis in axes_for(p.shape)]
    opt = nm_optim.SGD(params, lr=0.05, backend="triton", track=tracks, **hyper)
    run_and_check(params, opt, tracks, steps=2)


def test_g_is_the_unscaled_gradient_under_amp():
    params = [torch.randn(s, device=DEVICE, requires_grad=True) for s in [(40, 30), (17,)]]
    tracks = [(params[0], "rows"), (params[0], "cols"), (params[1], "all")]
    opt = nm_optim.SGD(params, lr=0.05, momentum=0.9, backend="triton", track=tracks)
    run_and_check(params, opt, tracks, steps=2, grad_scale=1024.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_unscaled_gradient_is_written_back_as_torch_fused_sgd_writes_it(dtype):
    """p.grad after a scaled step is torch.optim.SGD(fused=True)'s bits (grad / scale, rounded
    to the dtype, before the maximize sign) in flat tiles (plain and tracked) and 2-D tiles (rows
    and cols), with a scale that is not a power of two; a step skipped by found_inf leaves it."""
    params = make_params(dtype)
    ref = [p.detach().clone().requires_grad_() for p in params]
    gen = torch.Generator().manual_seed(3)
    for p, q in zip(params, ref):
        p.grad = (torch.randn(p.shape, generator=gen) * 1e4).to(device=DEVICE, dtype=dtype)
        q.grad = p.grad.clone()
    scaled = [p.grad.clone() for p in params]
    opt = nm_optim.SGD(params, lr=0.1, momentum=0.9, maximize=True, fused=True, backend="triton",
                       track=tracks_of(params))
    torch_fused = torch.optim.SGD(ref, lr=0.1, momentum=0.9, maximize=True, fused=True)
    for o, inf in ((opt, 1.0), (opt, 0.0), (torch_fused, 0.0)):
        o.grad_scale = torch.tensor(3000.0, device=DEVICE)
        o.found_inf = torch.tensor(inf, device=DEVICE)
        o.step()
        if inf:
            assert all(torch.equal(p.grad, g) for p, g in zip(params, scaled)), "a skipped step wrote a grad"
    for p, q, g in zip(params, ref, scaled):
        bits = torch.int32 if dtype == torch.float32 else torch.int16
        assert torch.equal(p.grad.view(bits), q.grad.view(bits)), f"{tuple(p.shape)}: grad not torch's"
        assert p.numel() == 0 or not torch.equal(p.grad, g), f"{tuple(p.shape)}: grad left scaled"


def test_found_inf_writes_nothing_and_reports_nan_statistics():
    params = make_params(torch.float32)
    opt = nm_optim.SGD(params, lr=0.1, momentum=0.9, backend="triton", track=tracks_of(params))
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()  # buffers exist now
    before = [p.detach().clone() for p in params]
    bufs = [opt.state[p]["momentum_buffer"].clone() for p in params]
    opt.grad_scale = torch.tensor(1.0, device=DEVICE)
    opt.found_inf = torch.tensor(1.0, device=DEVICE)
    opt.step()
    for p, b, v in zip(params, before, bufs):
        assert torch.equal(p.detach(), b)
        assert torch.equal(opt.state[p]["momentum_buffer"], v)
    assert all(s.isnan().all() for s in opt.last_stats())


def test_statistics_are_bitwise_identical_run_to_run():
    runs = []
    for _ in range(2):
        params = make_params(torch.float32)
        opt = nm_optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-3, backend="triton",
                           track=tracks_of(params))
        for step in range(2):
            gen = torch.Generator().manual_seed(step)
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(DEVICE)
            opt.step()
        runs.append(torch.cat([s.reshape(-1) for s in opt.last_stats()]))
    assert torch.equal(runs[0].nan_to_num(7.0), runs[1].nan_to_num(7.0))


def test_training_a_model_matches_torch_sgd():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).to(DEVICE)
    b = copy.deepcopy(a)
    opt = nm_optim.SGD(a.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3, backend="triton", track="layers")
    ref = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3, foreach=False)
    x, y = torch.randn(32, 8, device=DEVICE), torch.randint(0, 3, (32,), device=DEVICE)
    for model, o in ((a, opt), (b, ref)):
        for _ in range(4):
            o.zero_grad()
            F.cross_entropy(model(x), y).backward()
            o.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert_rel_close(p, q, 1e-5, "param after 4 steps")


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_long_groups_are_reduced_in_two_levels(monkeypatch, backend):
    """Groups of more than 2 * REDUCE_CHUNK partials go through the first-level reduction (chunks
    into scratch) and then the second: with REDUCE_CHUNK = 2 every "rows" group of a 5-column-block
    tensor, its "all" group (15 tiles) and the "cols" groups of a conv weight (3 row blocks x 9
    partials, chunks of a multiple of 9) take both levels. Against float64. The plan is shared:
    on a GPU machine the CUDA kernels run the same two levels."""
    from nm_optim.ops import plan as P

    if backend not in nm_optim.available_backends(DEVICE):
        pytest.skip(f"backend {backend!r} not available for {DEVICE} here")
    monkeypatch.setattr(P, "REDUCE_CHUNK", 2)
    torch.manual_seed(0)
    params = [torch.randn(s, device=DEVICE, requires_grad=True) for s in [(300, 600), (300, 4, 3, 3), (20000,)]]
    tracks = [(params[0], "rows"), (params[0], "cols"), (params[0], "all"), (params[1], "cols"),
              (params[1], "rows"), (params[2], "all")]
    opt = nm_optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-3, backend=backend, track=tracks)
    run_and_check(params, opt, tracks, steps=2)
    plans = [plan for layout in P._layouts.get(id(params[0]), []) for plan in layout.plans.values()]
    assert plans and all(plan.n_pre_tasks > 0 for plan in plans)


def test_untracked_tiles_of_a_tracked_bucket_run_the_plain_variant(monkeypatch):
    """A bucket with tracked and untracked tensors: the untracked tensors' flat tiles run the step
    kernel without statistics, the tracked 1-D tensor's with; 2-D tiles with column partials
    run the COLS variant, the others the one without; and the results match the reference."""
    from nm_optim.ops.triton import kernels as K

    launches = []

    class Spy:
        def __init__(self, kernel, name):
            self.kernel, self.name = kernel, name

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((self.name, grid[0], {k: v for k, v in kwargs.items() if k in ("WITH_STATS", "COLS", "ALIGNED")}))
                return self.kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(K, "step_kernel", Spy(K.step_kernel, "step"))
    monkeypatch.setattr(K, "stats_kernel", Spy(K.stats_kernel, "stats"))
    torch.manual_seed(0)
    shapes = [(20000,), (33,), (40, 64), (17, 12), (5, 27)]  # untracked, 1-D rows, cols+rows, rows, rows (unaligned)
    params = [torch.randn(s, device=DEVICE, requires_grad=True) for s in shapes]
    tracks = [(params[1], "rows"), (params[2], "cols"), (params[2], "rows"), (params[3], "rows"), (params[4], "rows")]
    opt = nm_optim.SGD(params, lr=0.05, momentum=0.9, backend="triton", track=tracks)
    run_and_check(params, opt, tracks, steps=1)
    step = [(n, f["WITH_STATS"]) for name, n, f in launches if name == "step"]
    assert step == [(2, False), (1, True)], launches  # the 2 tiles of (20000,), then (33,)
    stats = [(n, f["COLS"], f["ALIGNED"]) for name, n, f in launches if name == "stats"]
    assert stats == [(1, True, True), (1, False, True), (1, False, False)], launches


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_training_step_captured_in_a_cuda_graph_replays_like_eager(backend):
    """lr as a device tensor, grads kept in place (zero_grad(set_to_none=False)), a side-stream
    warm-up that creates the buffers and tables; then every replay equals an eager step."""
    if backend not in nm_optim.available_backends("cuda"):
        pytest.skip(f"backend {backend!r} not available")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10)).cuda()
    eager = copy.deepcopy(model)
    lr = torch.tensor(0.05, device="cuda")
    opt = nm_optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-3, backend=backend, track="layers")
    opt.recorder.enabled = False  # the recorder's bookkeeping is host-side: read last_stats() instead
    ref = nm_optim.SGD(eager.parameters(), lr=lr.clone(), momentum=0.9, weight_decay=1e-3, backend=backend,
                       track="layers")
    x = torch.randn(16, 32, device="cuda")
    y = torch.randint(0, 10, (16,), device="cuda")

    def step(m, o, inputs, targets):
        o.zero_grad(set_to_none=False)
        F.cross_entropy(m(inputs), targets).backward()
        o.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step(model, opt, x, y)
    torch.cuda.current_stream().wait_stream(side)
    for _ in range(3):
        step(eager, ref, x, y)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(model, opt, x, y)
    for k in range(5):
        new_x, new_y = torch.randn(16, 32, device="cuda"), torch.randint(0, 10, (16,), device="cuda")
        x.copy_(new_x)
        y.copy_(new_y)
        lr.fill_(0.05 * 0.8**k)
        ref.param_groups[0]["lr"].fill_(0.05 * 0.8**k)
        graph.replay()
        step(eager, ref, new_x, new_y)
    torch.cuda.synchronize()
    for p, q in zip(model.parameters(), eager.parameters()):
        assert_rel_close(p, q, 1e-5, "param after graph replays")
    for got, want in zip(opt.last_stats(), ref.last_stats()):
        assert_rel_close(got, want, 1e-5, "stats of the last replay", floor=1.0)


def test_the_op_passes_opcheck_so_torch_compile_sees_one_opaque_mutating_op():
    """The Triton backend goes through torch.ops.nm_optim.sgd_step_ (schema, fake kernel,
    mutation annotations), with statistics."""
    from nm_optim import ops
    from helpers import op_args

    params, grads, bufs, is_first, *rest = op_args(DEVICE, "triton", 0.9, False, lr_tensor=True)
    stats = torch.zeros(5 + 1 + 3 + 3 + 1, 9, dtype=torch.float64, device=DEVICE)
    # rows + all of the (5,) param; rows of (3, 4); cols + all of (2, 3, 3, 3)
    offsets = [0, -1, 5, 6, -1, -1, -1, 9, 12]
    torch.library.opcheck(ops.sgd_step_, (params, grads, bufs, is_first, *rest, stats, offsets))


def _compile_for_gpus(tmp_path, *args: str) -> str:
    """tools/compile_triton_kernels.py in a fresh process (outside the interpreter) and cache."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    script = Path(__file__).parents[1] / "tools" / "compile_triton_kernels.py"
    r = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"Triton kernels failed to compile:\n{r.stdout}\n{r.stderr[-3000:]}"
    return r.stdout


def test_kernels_compile_for_sm90_without_spilling(tmp_path):
    """Ahead-of-time compilation for an H100 (Triton ships ptxas; no GPU needed): float32 and
    bfloat16 with every switch on (the plain step, the statistics step with all 9 sums and with the
    6 products, the statistics kernel with and without column partials, each for all 9 sums and
    for the products, all with 16-byte vector accesses), and the reduction. No register spills
    (STACK:0); tools/kernel_resources.py prints the occupancy."""
    pytest.importorskip("triton.backends.nvidia")
    out = _compile_for_gpus(tmp_path, "--quick")
    compiled = [line for line in out.splitlines() if line.startswith("ok")]
    assert len(compiled) == 2 * 7 + 1 and all("STACK:0" in line for line in compiled), out


def test_statistics_sub_blocks_keep_every_thread_busy():
    """A sub-block of SUB_R rows x BLOCK_COLS elements has at least one element per thread: a
    [1, 128] float64 sub-block left half of the 256 threads holding copies, and Triton 3.6's ptxas
    spilled that variant (docs/kernel_resources.md)."""
    from nm_optim.ops.triton import kernels as K

    threads = 32 * K.NUM_WARPS["stats"]
    for cols in (True, False):
        for aligned in (True, False):
            for float64 in (True, False):
                assert K.sub_rows(cols, aligned, float64) * K.BLOCK_COLS >= threads, (cols, aligned, float64)


def test_the_float64_statistics_variants_fit_two_blocks_per_sm_without_spilling(tmp_path):
    """sm_90, the two float64 variants that were the heaviest: the statistics step with every
    switch on (196 registers at BLOCK 1024, one block of 8 warps per SM) and the column-partials
    tile without alignment (spilled on Triton 3.6): at most 128 registers, no stack."""
    pytest.importorskip("triton.backends.nvidia")
    out = _compile_for_gpus(tmp_path, "--arch", "90", "--match",
                            r"^sm_90 (stats fp64 COLS|step fp64 HAS_LR_PTR.*WITH_STATS ALIGNED)$")
    compiled = [line for line in out.splitlines() if line.startswith("ok")]
    assert len(compiled) == 2, out
    for line in compiled:
        regs = int(re.search(r"REG:(\d+)", line).group(1))
        assert regs <= 128 and "STACK:0" in line, line


@pytest.mark.slow  # about 3 minutes: 4 dtypes x 2 switch sets x 8 variants + reductions, sm_90 and sm_80
def test_every_kernel_variant_compiles_for_sm80_and_sm90(tmp_path):
    pytest.importorskip("triton.backends.nvidia")
    _compile_for_gpus(tmp_path)


def test_a_tracked_buckets_plan_is_built_once_per_layout(monkeypatch):
    """The StatsPlan hangs on the bucket's statistics layout (found again each step by list
    comparisons): steps with the same tracked tensors neither rebuild it nor recompute the
    geometry (a Python loop over the tensors); a new layout builds a new one."""
    from nm_optim.ops import plan as P

    built = []
    real = P.StatsPlan

    def spy(numels, *args, **kwargs):
        built.append(numels)
        return real(numels, *args, **kwargs)

    monkeypatch.setattr(P, "StatsPlan", spy)
    geometries = []
    real_geometry = P.stats_geometry
    monkeypatch.setattr(P, "stats_geometry", lambda *a: geometries.append(1) or real_geometry(*a))
    params = [nn.Parameter(torch.randn(6, 5, device=DEVICE)) for _ in range(3)]
    opt = nm_optim.SGD(params, lr=0.1, momentum=0.9, backend="triton", track="layers")
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    assert built == [(30, 30, 30)]
    assert len(geometries) <= 2  # per layout (the CPU kernel's too, where the op checks one), not per step
    params[1].grad = None  # another bucket layout: two tensors
    opt.step()
    assert built == [(30, 30, 30), (30, 30)]
