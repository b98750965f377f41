"""The GPU statistics plan (nm_optim/ops/plan.py), shared by the CUDA and Triton kernels, checked
on the CPU: its tiles cover every element of every tensor exactly once, and adding partials the
way the kernels index them (csrc/cuda/sgd_step_cuda.cu, nm_optim/ops/triton/kernels.py: row
partial at row_base + cb * d0 + r, column partial at col_base + rb * rowlen + c, tile totals at
their slot, reduction tasks as strided walks) gives every group's sums, in the columns of the sums
its tensor holds (names.SUM_MASKS: all 9 or the 6 products; NaN in the others). The kernels themselves
run on a GPU (gpu tests) and, for Triton, in its interpreter (tests/test_triton.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nm_optim.names import ALL_SUMS_MASK, PRODUCT_SUMS_MASK
from nm_optim.ops.layout import geometry
from nm_optim.ops.plan import COL_FOLD_ROWS, ROW_TILE_SIZE, TASK_FIELDS, StatsPlan, TileTable

SHAPES = [(1,), (7,), (300, 1), (5, 700), (129, 130), (33, 3, 3, 3), (3, 0), (2, 3, 0, 4), (260, 5), (40,)]
# (tile_rows, tile_cols, flat_tile): CUDA's 2-D tiles for every tracked tensor; Triton's, with
# flat tiles for untracked tensors and tensors whose rows are single elements.
CONFIGS = {"cuda": (128, 128, None), "triton": (128, 128, 16384), "tiny": (4, 8, 16)}


def axes_of(shape):
    return ["rows", "cols", "all"] if len(shape) >= 2 else ["rows", "all"]


def build(shapes, axes_of, untracked=()):
    geom, offsets, row = [], [], 0
    expected_rows = {}
    for i, s in enumerate(shapes):
        offs = [-1, -1, -1]
        if i not in untracked:
            d0, d1, rest = geometry(s)
            for a in axes_of(s):
                k = ("rows", "cols", "all").index(a)
                offs[k] = row
                expected_rows[(i, a)] = (row, (d0, d1, 1)[k])
                row += (d0, d1, 1)[k]
        geom += geometry(s) if i not in untracked else (0, 0, 0)
        offsets += offs
    return tuple(geom), tuple(offsets), expected_rows, row


def run_variants(groups, n):
    """The products-only flag of each tile, from the plan's runs (first, count, kind, products,
    aligned): the variant the launch of its run selects."""
    products = [None] * n
    for first, count, _, prod, _ in groups:
        products[first : first + count] = [prod] * count
    assert None not in products, "the runs cover the table"
    return products


def simulate(plan: StatsPlan, shapes, terms, tile_rows, tile_cols, n_rows):
    """What the kernels compute from the plan: scratch partials, then the reductions. A tile of
    a products-only run writes the partials of the 6 products only (the others stay NaN here,
    as unwritten memory: the reduction must not read them) and an element's own Σp, Σg, Σv as
    NaN; the reduction writes NaN in the columns outside its task's mask."""
    scratch = np.full((plan.scratch.numel() // 9, 9), np.nan)
    covered = [np.zeros(max(1, int(np.prod(s))), dtype=int) for s in shapes]
    out = np.full((n_rows, 9), np.inf)  # inf: never written
    flat_products = run_variants(plan.flat_groups, plan.n_flat)
    tiles_products = run_variants(plan.tile_groups, plan.n_tiles2d)
    for k, (t, begin, end, slot, elem_row) in enumerate(plan.flat[: 5 * plan.n_flat].reshape(-1, 5).tolist()):
        x = terms[t].reshape(-1, 9).numpy()
        first = 3 if flat_products[k] else 0
        covered[t][begin:end] += 1
        if slot >= 0:
            scratch[slot, first:] = x[begin:end, first:].sum(0)
        if elem_row >= 0:
            out[elem_row + begin : elem_row + end] = x[begin:end]
            out[elem_row + begin : elem_row + end, :first] = np.nan
    for k, (t, rb, cb, d0, rowlen, row_base, col_base, slot) in enumerate(
            plan.tiles2d[: 8 * plan.n_tiles2d].reshape(-1, 8).tolist()):
        x = terms[t].reshape(d0, rowlen, 9).numpy()
        first = 3 if tiles_products[k] else 0
        r0, r1 = rb * tile_rows, min(d0, (rb + 1) * tile_rows)
        c0, c1 = cb * tile_cols, min(rowlen, (cb + 1) * tile_cols)
        covered[t].reshape(d0, rowlen)[r0:r1, c0:c1] += 1
        if row_base >= 0:
            for r in range(r0, r1):
                scratch[row_base + cb * d0 + r, first:] = x[r, c0:c1, first:].sum(0)
        if col_base >= 0:
            for c in range(c0, c1):
                scratch[col_base + rb * rowlen + c, first:] = x[r0:r1, c, first:].sum(0)
        if slot >= 0:
            scratch[slot, first:] = x[r0:r1, c0:c1, first:].sum((0, 1))
    counts = []
    tasks = plan.tasks[: TASK_FIELDS * plan.n_tasks].reshape(-1, TASK_FIELDS).tolist()
    for k, (base, count, inner, outer, row, sums) in enumerate(tasks):
        counts.append(count)
        held = np.array([sums >> s & 1 for s in range(9)], dtype=bool)
        idx = [base + (j // inner) * outer + j % inner for j in range(count)]
        total = scratch[idx][:, held].sum(0) if idx else np.zeros(held.sum())
        # The first level (chunks of long groups) writes scratch slots, launched first.
        dst = scratch if k < plan.n_pre_tasks else out
        dst[row] = np.nan
        dst[row, held] = total
    return out, covered, counts


# The sums masks of SHAPES' tensors: all 9, or mixed (products only for every other tensor, the
# empty ones included, so that a bucket's runs hold both variants of every kind).
SUMS = {"all9": (), "mixed": tuple(PRODUCT_SUMS_MASK if i % 2 else ALL_SUMS_MASK for i in range(len(SHAPES)))}


@pytest.mark.parametrize("sums", SUMS, ids=list(SUMS))
@pytest.mark.parametrize("config", CONFIGS, ids=list(CONFIGS))
@pytest.mark.parametrize("reduce_chunk", [256, 2], ids=["chunk256", "chunk2"])
def test_tiles_cover_every_element_once_and_partials_add_up_to_every_group(config, reduce_chunk, sums):
    """reduce_chunk=2: every group of more than 4 partials is reduced in two levels. mixed:
    product-only tensors beside all-9 ones; their groups' Σp, Σg, Σv columns are NaN, the
    others are the sums, although their tiles wrote no partial of Σp, Σg, Σv."""
    tile_rows, tile_cols, flat_tile = CONFIGS[config]
    untracked = (len(SHAPES) - 1,)  # the last tensor has no track
    geom, offsets, expected_rows, n_rows = build(SHAPES, axes_of, untracked)
    numels = tuple(int(np.prod(s)) for s in SHAPES)
    plan = StatsPlan(numels, geom, offsets, torch.device("cpu"), tile_rows, tile_cols, flat_tile,
                     reduce_chunk=reduce_chunk, align=4, sums=SUMS[sums])
    gen = torch.Generator().manual_seed(0)
    terms = [torch.randn(*s, 9, generator=gen, dtype=torch.float64) for s in SHAPES]
    out, covered, counts = simulate(plan, SHAPES, terms, tile_rows, tile_cols, n_rows)
    for i, c in enumerate(covered):
        if numels[i] == 0 or (i in untracked and flat_tile is None):
            assert c.sum() == 0, f"tensor {i} {SHAPES[i]}: the caller's flat kernel steps it"
        else:
            assert (c == 1).all(), f"tensor {i} {SHAPES[i]}: every element in exactly one tile"
    pre, final = counts[: plan.n_pre_tasks], counts[plan.n_pre_tasks :]
    assert pre == sorted(pre, reverse=True) and final == sorted(final, reverse=True), "each level sorted by size"
    assert not np.isinf(out).any(), "every row of every group written"
    for (i, axis), (row, n) in expected_rows.items():
        d0, d1, rest = geometry(SHAPES[i])
        x = terms[i].reshape(d0, d1, rest, 9)
        want = {"rows": x.sum((1, 2)), "cols": x.sum((0, 2)), "all": x.sum((0, 1, 2)).reshape(1, 9)}[axis].numpy()
        if SUMS[sums] and SUMS[sums][i] == PRODUCT_SUMS_MASK:
            want[:, :3] = np.nan
        np.testing.assert_allclose(out[row : row + n], want, rtol=1e-12, atol=1e-12,
                                   err_msg=f"{config} {SHAPES[i]}:{axis}")


@pytest.mark.parametrize("axes", [("rows",), ("all",), ("cols",)])
def test_only_the_partials_a_track_needs_are_planned(axes):
    shape = (300, 500)
    geom, offsets, _, _ = build([shape], lambda s: list(axes))
    plan = StatsPlan((150000,), geom, offsets, torch.device("cpu"), 128, 128)
    n_rb, n_cb = 3, 4
    want = {"rows": n_cb * 300, "all": n_rb * n_cb, "cols": n_rb * 500}[axes[0]]
    assert plan.scratch.numel() == 9 * want


@pytest.mark.parametrize("shape", [(4096, 25088), (512, 512, 3, 3)], ids=["fc1", "conv"])
def test_scratch_stays_proportional_to_the_tensor(shape):
    d0, d1, rest = geometry(shape)
    plan = StatsPlan((d0 * d1 * rest,), (d0, d1, rest), (0, d0, -1), torch.device("meta"), 128, 128)
    assert plan.scratch.numel() * 8 <= 0.6 * d0 * d1 * rest * 4, "partials stay well below the tensor's size"


def test_plain_tiles_come_first_and_runs_group_alike_tiles():
    """Untracked flat tiles first (the plain step variant runs them), then the tracked ones;
    2-D tiles with column partials first; within each kind the tensors with all 9 sums, then
    the product-only ones; within those aligned rows (bounds) first; the groups cover the tables
    in order, one run per kind, and CUDA's runs (tile_runs) are the 2-D groups."""
    shapes = [(7,), (40,), (64, 27), (16, 32), (20000,), (8, 12), (16, 32), (41,), (64, 27)]
    product_only = {5, 6, 7, 8}
    sums = tuple(PRODUCT_SUMS_MASK if i in product_only else ALL_SUMS_MASK for i in range(len(shapes)))
    geom, offsets, _, _ = build(shapes, lambda s: ["rows", "cols"] if s == (16, 32) else ["rows"], untracked=(0, 4))
    numels = tuple(int(np.prod(s)) for s in shapes)
    plan = StatsPlan(numels, geom, offsets, torch.device("cpu"), 4, 8, 16384, align=4, sums=sums)
    flat = plan.flat[: 5 * plan.n_flat].reshape(-1, 5).tolist()
    tracked = [slot >= 0 or row >= 0 for _, _, _, slot, row in flat]
    assert tracked == sorted(tracked) and plan.n_flat_plain == tracked.count(False) == 3  # (7,) + 2 tiles of (20000,)
    tiles = plan.tiles2d[: 8 * plan.n_tiles2d].reshape(-1, 8).tolist()
    cols = [t[6] >= 0 for t in tiles]
    assert cols == sorted(cols, reverse=True) and plan.n_tiles2d_cols == cols.count(True) == 2 * 4 * 4
    for groups, n, key in ((plan.flat_groups, plan.n_flat,
                            lambda t: (t[3] >= 0 or t[4] >= 0, t[0] in product_only, (t[2] - t[1]) % 4 == 0)),
                           (plan.tile_groups, plan.n_tiles2d,
                            lambda t: (t[6] >= 0, t[0] in product_only, t[4] % 4 == 0))):
        rows = flat if groups is plan.flat_groups else tiles
        at = 0
        for first, count, *k in groups:
            assert first == at and all(key(t) == tuple(k) for t in rows[first : first + count])
            at += count
        assert at == n and len({tuple(g[2:]) for g in groups}) == len(groups), "one run per kind"
        kinds = [tuple(g[2:4]) for g in groups]
        assert kinds == sorted(kinds, key=lambda k: (k[0] != (groups is plan.tile_groups), k[1])), "kinds in order"
    assert (False, False, False) in [tuple(g[2:]) for g in plan.flat_groups]  # (7,): bounds not multiples of 4
    assert (False, False, False) in [tuple(g[2:]) for g in plan.tile_groups]  # (64, 27): rows of 27
    assert (False, True, False) in [tuple(g[2:]) for g in plan.tile_groups]  # (64, 27), product-only
    assert (True, True) in [tuple(g[2:4]) for g in plan.flat_groups]  # (41,), product-only
    assert list(plan.tile_runs) == [x for first, count, c, prod, _ in plan.tile_groups
                                    for x in (first, count, int(c) | int(prod) << 1)]
    assert plan.n_tile_runs == len(plan.tile_groups)
    assert plan.n_tiles2d_products == sum(g[1] for g in plan.tile_groups if g[3])


def test_a_sums_mask_outside_the_sum_sets_is_refused():
    """The kernels have a variant for all 9 sums and one for the 6 products: another mask would
    leave columns neither reduced nor NaN."""
    geom, offsets, _, _ = build([(4, 5)], axes_of)
    with pytest.raises(ValueError, match="stats_sums"):
        StatsPlan((20,), geom, offsets, torch.device("cpu"), 4, 8, sums=(0b111,))


def test_long_groups_are_reduced_in_two_levels():
    """VGG-16's fc1 with an "all" track: 32 x 196 tiles; chunks of a multiple of `inner`
    partials (a "cols" group of a conv weight walks rest = 9 consecutive partials per row block)."""
    plan = StatsPlan((4096 * 25088,), (4096, 25088, 1), (-1, -1, 0), torch.device("cpu"), 128, 128)
    tasks = plan.tasks.reshape(-1, TASK_FIELDS).tolist()
    assert plan.n_pre_tasks == 25 and plan.n_tasks == 26
    assert sum(t[1] for t in tasks[:25]) == 32 * 196 and max(t[1] for t in tasks[:25]) <= 256
    assert tasks[25][1] == 25 and tasks[25][2:4] == [1, 1]
    plan = StatsPlan((600 * 64 * 9,), (600, 64, 9), (-1, 0, -1), torch.device("cpu"), 2, 8, reduce_chunk=16)
    assert plan.n_pre_tasks > 0
    for base, count, inner, outer, row, _ in plan.tasks.reshape(-1, TASK_FIELDS).tolist()[: plan.n_pre_tasks]:
        assert inner == 9 and outer == 64 * 9 and count <= 18


@pytest.mark.parametrize("shape", [(4096, 25088), (4096, 4096), (512, 4608), (10, 100000), (64, 27), (31, 1)])
def test_cpu_cols_tiles_are_whole_rows_in_whole_fold_periods(shape):
    """A CPU tensor with a "cols" track is cut into tiles of whole rows; where ROW_TILE_SIZE holds
    half a fold period or more, a tile's rows are a multiple of the AVX-512 kernel's fold period
    (it folds its partials at every tile's end), so VGG-16's fc1 folds every 30 rows, not every
    20. The tiles still cover every element once; untracked tensors keep flat tiles."""
    d0, rowlen = shape
    table = TileTable((d0 * rowlen, 100_000), 32768, torch.device("cpu"), (rowlen, 0))
    tiles = table.tiles.view(-1, 3)
    mine = tiles[tiles[:, 0] == 0]
    assert mine[0, 1] == 0 and (mine[1:, 1] == mine[:-1, 2]).all() and mine[-1, 2] == d0 * rowlen
    rows = (mine[:, 2] - mine[:, 1]) // rowlen
    assert ((mine[:, 2] - mine[:, 1]) % rowlen == 0).all()
    per_tile = ROW_TILE_SIZE // rowlen
    if per_tile * 2 >= COL_FOLD_ROWS:
        assert (rows[:-1] % COL_FOLD_ROWS == 0).all() and int(rows[0]) % COL_FOLD_ROWS in (0, d0 % COL_FOLD_ROWS)
    else:
        assert int(rows.max()) == max(per_tile, 1)
    if shape == (4096, 25088):
        assert int(rows[0]) == 30
    flat = tiles[tiles[:, 0] == 1]
    assert (flat[:, 2] - flat[:, 1]).max() == 32768


def test_the_host_table_holds_what_it_was_given_last_whatever_the_caller_does_with_its_lists():
    """The CPU kernel's address table (ops/plan.py, HostTable) rewrites a quarter only where it
    differs from what it holds: after any sequence of calls it must hold the last parts given, also
    when the caller changes a list it passed before, or passes the same tuple again."""
    from array import array

    from nm_optim.ops.plan import HostTable

    rng = np.random.default_rng(0)
    n = 5
    table = HostTable(n)
    params = tuple(int(x) for x in rng.integers(1, 1 << 40, n))
    grads = list(params)
    for _ in range(50):
        if rng.random() < 0.5:  # a new list; else the last one again, changed in place below
            grads = [int(x) for x in rng.integers(1, 1 << 40, n)]
        bufs = None if rng.random() < 0.2 else [int(x) for x in rng.integers(1, 1 << 40, n)]
        flags = None if bufs is None else tuple(bool(x) for x in rng.integers(0, 2, n))
        if rng.random() < 0.2:
            params = tuple(int(x) for x in rng.integers(1, 1 << 40, n))
        address = table.address((params, grads, bufs, flags))
        want = [*params, *grads, *(bufs or [0] * n), *(flags or [0] * n)]
        got = array("Q", bytes(32 * n))
        assert address == table.array.buffer_info()[0]
        got[:] = table.array
        assert list(got) == [int(x) for x in want]
        grads[0] += 8  # the caller reuses its list: the next call must not take it for unchanged
        if bufs is not None:
            bufs[-1] += 8


def test_the_address_check_is_not_fooled_by_a_list_changed_after_it_was_checked():
    """AddressCheck remembers the addresses it found disjoint; the caller's list changed in place
    afterwards (to addresses that overlap) must be checked again."""
    from nm_optim.ops.plan import AddressCheck

    check = AddressCheck()
    ptrs = [0, 4096]
    assert check.levels(ptrs, (8, 8), 4) is None  # [0, 32) and [4096, 4128): disjoint
    ptrs[1] = 16  # now [16, 48) overlaps [0, 32)
    assert check.levels(ptrs, (8, 8), 4) == [0, 1]


def test_the_sums_masks_are_part_of_the_layout():
    """A bucket's StatsLayout is found again only with the same sums masks (a list or a tuple of
    them); another mask is another layout, whose GPU plan runs the product-only variant for that
    tensor and whose CPU copy of the masks (sums_array, read by the CPU kernel by address) exists
    only where some tracked tensor needs less than all 9 sums."""
    from nm_optim.ops.plan import stats_layout

    owner = torch.zeros(1)
    params = [torch.zeros(4, 6), torch.zeros(5)]
    numels, offsets = (24, 5), [0, 4, -1, -1, -1, -1]  # rows + cols of the matrix; the vector untracked
    cpu = torch.device("cpu")
    all9 = stats_layout(owner, params, numels, offsets, cpu)
    assert all9.sums_array is None and stats_layout(owner, params, numels, list(offsets), cpu) is all9
    assert stats_layout(owner, params, numels, offsets, cpu, sums=[ALL_SUMS_MASK, ALL_SUMS_MASK]).sums_array is None
    mixed = [PRODUCT_SUMS_MASK, ALL_SUMS_MASK]
    layout = stats_layout(owner, params, numels, offsets, cpu, sums=mixed)
    assert layout is not all9 and layout.has_sums(mixed) and layout.has_sums(tuple(mixed))
    assert not layout.has_sums(()) and all9.has_sums(()) and all9.has_sums(None)
    assert stats_layout(owner, params, numels, offsets, cpu, sums=tuple(mixed)) is layout
    assert list(layout.sums_array) == mixed
    gpu = stats_layout(owner, params, numels, offsets, cpu, cpu=False, sums=mixed)
    plan = gpu.plan(cpu, 4, 8, 16384)
    assert [(g[2], g[3]) for g in plan.tile_groups] == [(True, True)] and plan.n_tiles2d_products == plan.n_tiles2d
    tasks = plan.tasks.reshape(-1, TASK_FIELDS).tolist()
    assert {t[5] for t in tasks} == {PRODUCT_SUMS_MASK}
    with pytest.raises(ValueError, match="one mask per param"):
        stats_layout(owner, params, numels, offsets, cpu, sums=[PRODUCT_SUMS_MASK])
