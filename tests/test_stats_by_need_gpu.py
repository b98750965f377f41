"""Statistics by need in the GPU kernels (CUDA and Triton): a tensor whose groups hold only the 6
product sums (names.PRODUCT_SUMS_MASK, what the scale and rescale laws read) is stepped by the
kernel variants that reduce only those (PRODUCTS: 6 accumulators instead of 9), beside tensors
that hold all 9 in the same bucket. The op's contract (ops/args.py, StepArgs): column k of each
of a tracked tensor's groups is written iff bit k of its mask is set; the others are NaN.

Checked through the op itself (torch.ops.nm_optim.sgd_step_ with stats_sums), for every kind of
tile the plan makes (ops/plan.py, StatsPlan): flat tiles of 1-D tensors whose "rows" groups are
single elements (written by the step kernel itself), 2-D tiles with and without column partials,
rows that are and are not multiples of 16 bytes, empty tensors, groups reduced in two levels, a
step skipped by found_inf. Each against float64 sums of the pre-step values (within 1e-6 of the
summed magnitudes, docs/architecture.md "The statistics") and against the same step with all 9
sums: the product columns are the same bits (the variants add the same terms in the same
order), and so are the params and buffers.

Without a GPU the Triton kernels run in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1); on a GPU machine the same cases run the CUDA and Triton kernels
(bench/gpu_check.sh runs this file in its first test shard).
"""

from __future__ import annotations

import pytest
import torch

import nm_optim
from helpers import expected_stats
from nm_optim.names import ALL_SUMS_MASK, PRODUCT_SUMS_MASK, STAT_INDEX, PRODUCT_SUMS
from nm_optim.ops.layout import group_counts

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = [pytest.param(b, id=b) for b in ("triton", "cuda")]
P, A = PRODUCT_SUMS_MASK, ALL_SUMS_MASK
PRODUCT_COLUMNS = [STAT_INDEX[name] for name in PRODUCT_SUMS]
OTHER_COLUMNS = [k for k in range(9) if k not in PRODUCT_COLUMNS]

# (shape, axes, mask): every kind of tile in both variants (product-only first for each kind).
CASES = [
    ((13, 17), ("rows", "cols", "all"), P),  # 2-D tiles with column partials, rows of 17 elements
    ((24, 40), ("rows", "cols"), A),
    ((3, 5, 7, 11), ("rows", "cols"), P),  # a "cols" group spans rows and the trailing dims
    ((64, 32), ("rows", "all"), P),  # 2-D tiles without column partials, 16-byte rows
    ((64, 27), ("rows",), P),  # ... and rows that are not multiples of 16 bytes
    ((9, 16), ("all",), A),
    ((300, 1), ("cols", "all"), P),  # rows of one element
    ((33,), ("rows", "all"), P),  # flat tiles: each element its own "rows" group
    ((40,), ("rows",), A),
    ((20000,), ("all",), P),  # two flat tiles
    ((0,), ("rows", "all"), P),  # empty: the products sum to 0, the others NaN
    ((3, 0), ("rows", "cols", "all"), P),
    ((7, 5), (), A),  # untracked
]


def require(backend):
    if backend not in nm_optim.available_backends(DEVICE):
        pytest.skip(f"backend {backend!r} not available for {DEVICE} here")


def layout(cases):
    """The op's statistics offsets, the rows of each (case, axis) and the number of rows."""
    offsets, rows, n = [], {}, 0
    for i, (shape, axes, _) in enumerate(cases):
        counts = group_counts(torch.Size(shape))
        for k, axis in enumerate(("rows", "cols", "all")):
            if axis in axes:
                offsets.append(n)
                rows[i, axis] = (n, counts[k])
                n += counts[k]
            else:
                offsets.append(-1)
    return offsets, rows, n


def tensors(cases, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    make = [[torch.randn(s, generator=gen, dtype=torch.float64).to(DEVICE, dtype) for s, _, _ in cases] for _ in range(3)]
    return make  # params, grads, buffers


def step(backend, cases, sums, dtype=torch.float32, found_inf=None, fill=7e300):
    """One step of the op with these sums masks: (params, buffers, stats, pre-step p, g, v).
    `fill`: the stats' value before the step (7e300: never written by the kernels)."""
    params, grads, bufs = tensors(cases, dtype)
    pre = [[t.detach().double().cpu().clone() for t in ts] for ts in (params, grads, bufs)]
    offsets, _, n = layout(cases)
    stats = torch.full((n, 9), fill, dtype=torch.float64, device=DEVICE)
    inf = None if found_inf is None else torch.tensor(found_inf, device=DEVICE)
    scale = None if found_inf is None else torch.tensor(1.0, device=DEVICE)
    torch.ops.nm_optim.sgd_step_(params, grads, bufs, [False] * len(cases), 0.1, None, 0.01, 0.9, 0.0, False,
                                 False, scale, inf, backend, stats, offsets, list(sums))
    return params, bufs, stats.cpu(), pre


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_product_only_groups_hold_the_products_and_nan_beside_all_nine(backend, dtype):
    require(backend)
    sums = [mask for _, _, mask in CASES]
    params, bufs, stats, (p0, g0, v0) = step(backend, CASES, sums, dtype)
    _, rows, _ = layout(CASES)
    assert not (stats == 7e300).any(), "every row of every tracked group is written"
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    for (i, axis), (row, count) in rows.items():
        shape, _, mask = CASES[i]
        got = stats[row : row + count]
        want, scale = expected_stats(p0[i], g0[i], v0[i], axis)
        held = PRODUCT_COLUMNS if mask == P else list(range(9))
        what = f"{backend} {shape}:{axis} mask {mask:#x}"
        if got.numel():
            err = ((got[:, held] - want[:, held]).abs() / scale[:, held].clamp_min(1e-300)).max().item()
            assert err <= tol, f"{what}: relative error {err:.2e}"
        if mask == P:
            assert got[:, OTHER_COLUMNS].isnan().all(), f"{what}: Σp, Σg, Σv not NaN"
        else:
            assert not got.isnan().any(), f"{what}: NaN in an all-9 group"


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_product_variants_give_the_all_nine_variants_bits(backend):
    """Params, buffers and the 6 product columns are bitwise those of the same step with all 9
    sums (the variants differ only in the sums they leave out)."""
    require(backend)
    product_only = step(backend, CASES, [P] * len(CASES))
    all_nine = step(backend, CASES, [A] * len(CASES))
    for a, b in zip(product_only[0] + product_only[1], all_nine[0] + all_nine[1]):
        assert torch.equal(a, b)
    assert torch.equal(product_only[2][:, PRODUCT_COLUMNS], all_nine[2][:, PRODUCT_COLUMNS])
    assert product_only[2][:, OTHER_COLUMNS].isnan().all() and not all_nine[2].isnan().any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_long_product_only_groups_are_reduced_in_two_levels(monkeypatch, backend):
    """REDUCE_CHUNK = 2: every group of more than 4 partials goes through a first-level chunk;
    a chunk keeps its group's mask (its unreduced sums are never read as numbers)."""
    from nm_optim.ops import plan as plan_module

    require(backend)
    monkeypatch.setattr(plan_module, "REDUCE_CHUNK", 2)
    cases = [((300, 600), ("rows", "cols", "all"), P), ((300, 4, 3, 3), ("cols", "rows"), A),
             ((20000,), ("all",), P)]
    params, _, stats, (p0, g0, v0) = step(backend, cases, [m for _, _, m in cases])
    _, rows, _ = layout(cases)
    for (i, axis), (row, count) in rows.items():
        want, scale = expected_stats(p0[i], g0[i], v0[i], axis)
        held = PRODUCT_COLUMNS if cases[i][2] == P else list(range(9))
        got = stats[row : row + count]
        err = ((got[:, held] - want[:, held]).abs() / scale[:, held]).max().item()
        assert err <= 1e-6, f"{cases[i][0]}:{axis}: relative error {err:.2e}"
        assert got[:, [k for k in range(9) if k not in held]].isnan().all()
    plans = [pl for lay in plan_module._layouts.get(id(params[0]), []) for pl in lay.plans.values()]
    assert plans and all(pl.n_pre_tasks > 0 for pl in plans)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_step_skipped_by_found_inf_writes_no_number(backend):
    """The stats read NaN after a skipped step (nm_optim/tracks.py fills them with NaN before a
    step; the kernels write no number over that, in any variant), and nothing else is written."""
    require(backend)
    params, bufs, stats, (p0, _, v0) = step(backend, CASES, [m for _, _, m in CASES], found_inf=1.0,
                                            fill=float("nan"))
    assert stats.isnan().all()
    for p, b, q, w in zip(params, bufs, p0, v0):
        assert torch.equal(p.double().cpu(), q) and torch.equal(b.double().cpu(), w)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_product_only_variants_run_for_their_tiles_only(monkeypatch, backend):
    """The plan's runs (ops/plan.py): the launches of product-only tiles select PRODUCTS, the
    others do not, and each kind of tile is launched in both variants here."""
    require(backend)
    if backend == "cuda":
        pytest.skip("the CUDA launches are made in C++ (csrc/cuda/sgd_step_cuda.cu, launch); "
                    "test_plan checks the runs it reads")
    from nm_optim.ops.triton import kernels as K

    seen = set()

    class Spy:
        def __init__(self, kernel, name):
            self.kernel, self.name = kernel, name

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.add((self.name, kwargs.get("WITH_STATS", True), kwargs.get("COLS"), kwargs["PRODUCTS"]))
                return self.kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(K, "step_kernel", Spy(K.step_kernel, "step"))
    monkeypatch.setattr(K, "stats_kernel", Spy(K.stats_kernel, "stats"))
    step(backend, CASES, [m for _, _, m in CASES])
    assert seen == {("step", False, None, False), ("step", True, None, False), ("step", True, None, True),
                    ("stats", True, True, False), ("stats", True, True, True),
                    ("stats", True, False, False), ("stats", True, False, True)}, seen
