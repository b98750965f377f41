"""The GPU statistics plan (nm_optim/ops/plan.py), shared by the CUDA and Triton kernels, checked
on the CPU: its tiles cover every element of every tensor exactly once, and adding partials the
way the kernels index them (csrc/cuda/sgd_step_cuda.cu, nm_optim/ops/triton/kernels.py: row
partial at row_base + cb * d0 + r, column partial at col_base + rb * rowlen + c, tile totals at
their slot, reduction tasks as strided walks) gives every group's sums. The kernels themselves
run on a GPU (gpu tests) and, for Triton, in its interpreter (tests/test_triton.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nm_optim.ops.layout import geometry
from nm_optim.ops.plan import COL_FOLD_ROWS, ROW_TILE_SIZE, StatsPlan, TileTable

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


def simulate(plan: StatsPlan, shapes, terms, tile_rows, tile_cols, n_rows):
    """What the kernels compute from the plan: scratch partials, then the reductions."""
    scratch = np.full((plan.scratch.numel() // 9, 9), np.nan)
    covered = [np.zeros(max(1, int(np.prod(s))), dtype=int) for s in shapes]
    out = np.full((n_rows, 9), np.nan)
    for t, begin, end, slot, elem_row in plan.flat[: 5 * plan.n_flat].reshape(-1, 5).tolist():
        x = terms[t].reshape(-1, 9).numpy()
        covered[t][begin:end] += 1
        if slot >= 0:
            scratch[slot] = x[begin:end].sum(0)
        if elem_row >= 0:
            out[elem_row + begin : elem_row + end] = x[begin:end]
    for t, rb, cb, d0, rowlen, row_base, col_base, slot in plan.tiles2d[: 8 * plan.n_tiles2d].reshape(-1, 8).tolist():
        x = terms[t].reshape(d0, rowlen, 9).numpy()
        r0, r1 = rb * tile_rows, min(d0, (rb + 1) * tile_rows)
        c0, c1 = cb * tile_cols, min(rowlen, (cb + 1) * tile_cols)
        covered[t].reshape(d0, rowlen)[r0:r1, c0:c1] += 1
        if row_base >= 0:
            for r in range(r0, r1):
                scratch[row_base + cb * d0 + r] = x[r, c0:c1].sum(0)
        if col_base >= 0:
            for c in range(c0, c1):
                scratch[col_base + rb * rowlen + c] = x[r0:r1, c].sum(0)
        if slot >= 0:
            scratch[slot] = x[r0:r1, c0:c1].sum((0, 1))
    counts = []
    for k, (base, count, inner, outer, row) in enumerate(plan.tasks[: 5 * plan.n_tasks].reshape(-1, 5).tolist()):
        counts.append(count)
        idx = [base + (j // inner) * outer + j % inner for j in range(count)]
        # The first level (chunks of long groups) writes scratch slots, launched first.
        (scratch if k < plan.n_pre_tasks else out)[row] = scratch[idx].sum(0) if idx else 0.0
    return out, covered, counts


@pytest.mark.parametrize("config", CONFIGS, ids=list(CONFIGS))
@pytest.mark.parametrize("reduce_chunk", [256, 2], ids=["chunk256", "chunk2"])
def test_tiles_cover_every_element_once_and_partials_add_up_to_every_group(config, reduce_chunk):
    """reduce_chunk=2: every group of more than 4 partials is reduced in two levels."""
    tile_rows, tile_cols, flat_tile = CONFIGS[config]
    untracked = (len(SHAPES) - 1,)  # the last tensor has no track
    geom, offsets, expected_rows, n_rows = build(SHAPES, axes_of, untracked)
    numels = tuple(int(np.prod(s)) for s in SHAPES)
    plan = StatsPlan(numels, geom, offsets, torch.device("cpu"), tile_rows, tile_cols, flat_tile,
                     reduce_chunk=reduce_chunk, align=4)
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
    for (i, axis), (row, n) in expected_rows.items():
        d0, d1, rest = geometry(SHAPES[i])
        x = terms[i].reshape(d0, d1, rest, 9)
        want = {"rows": x.sum((1, 2)), "cols": x.sum((0, 2)), "all": x.sum((0, 1, 2)).reshape(1, 9)}[axis]
        np.testing.assert_allclose(out[row : row + n], want.numpy(), rtol=1e-12, atol=1e-12,
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
    2-D tiles with column partials first; within each kind aligned rows (bounds) first; the
    groups cover the tables in order."""
    shapes = [(7,), (40,), (64, 27), (16, 32), (20000,), (8, 12)]
    geom, offsets, _, _ = build(shapes, lambda s: ["rows", "cols"] if s == (16, 32) else ["rows"], untracked=(0, 4))
    numels = tuple(int(np.prod(s)) for s in shapes)
    plan = StatsPlan(numels, geom, offsets, torch.device("cpu"), 4, 8, 16384, align=4)
    flat = plan.flat[: 5 * plan.n_flat].reshape(-1, 5).tolist()
    tracked = [slot >= 0 or row >= 0 for _, _, _, slot, row in flat]
    assert tracked == sorted(tracked) and plan.n_flat_plain == tracked.count(False) == 3  # (7,) + 2 tiles of (20000,)
    tiles = plan.tiles2d[: 8 * plan.n_tiles2d].reshape(-1, 8).tolist()
    cols = [t[6] >= 0 for t in tiles]
    assert cols == sorted(cols, reverse=True) and plan.n_tiles2d_cols == cols.count(True) == 4 * 4
    for groups, n, key in ((plan.flat_groups, plan.n_flat, lambda t: (t[3] >= 0 or t[4] >= 0, (t[2] - t[1]) % 4 == 0)),
                           (plan.tile_groups, plan.n_tiles2d, lambda t: (t[6] >= 0, t[4] % 4 == 0))):
        rows = flat if groups is plan.flat_groups else tiles
        at = 0
        for first, count, *k in groups:
            assert first == at and all(key(t) == tuple(k) for t in rows[first : first + count])
            at += count
        assert at == n and len({tuple(g[2:]) for g in groups}) == len(groups), "one run per kind"
    assert (False, False) in [tuple(g[2:]) for g in plan.flat_groups]  # (7,): bounds not multiples of 4
    assert (False, False) in [tuple(g[2:]) for g in plan.tile_groups]  # (64, 27): rows of 27


def test_long_groups_are_reduced_in_two_levels():
    """VGG-16's fc1 with an "all" track: 32 x 196 tiles; chunks of a multiple of `inner`
    partials (a "cols" group of a conv weight walks rest = 9 consecutive partials per row block)."""
    plan = StatsPlan((4096 * 25088,), (4096, 25088, 1), (-1, -1, 0), torch.device("cpu"), 128, 128)
    tasks = plan.tasks.reshape(-1, 5).tolist()
    assert plan.n_pre_tasks == 25 and plan.n_tasks == 26
    assert sum(t[1] for t in tasks[:25]) == 32 * 196 and max(t[1] for t in tasks[:25]) <= 256
    assert tasks[25][1] == 25 and tasks[25][2:4] == [1, 1]
    plan = StatsPlan((600 * 64 * 9,), (600, 64, 9), (-1, 0, -1), torch.device("cpu"), 2, 8, reduce_chunk=16)
    assert plan.n_pre_tasks > 0
    for base, count, inner, outer, row in plan.tasks.reshape(-1, 5).tolist()[: plan.n_pre_tasks]:
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
