"""The CUDA statistics kernels' tables, checked on the CPU: the 2-D tiles cover every element of
every tracked tensor exactly once, and adding partials the way the kernels index them
(csrc/cuda/sgd_step_cuda.cu: row_part[(cb * d0 + r)], col_part[(rb * rowlen + c)], the three
reduction tasks) gives every group's sums. The kernels themselves run only on a GPU (gpu tests)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nm_optim._native import CudaStatsTable
from nm_optim.tracks import geometry

TR = TC = 128
SHAPES = [(1,), (7,), (300, 1), (5, 700), (129, 130), (33, 3, 3, 3), (3, 0), (2, 3, 0, 4), (260, 5)]


def build(shapes, axes_of):
    geom, offsets, row = [], [], 0
    expected_rows = {}
    for i, s in enumerate(shapes):
        d0, d1, rest = geometry(s)
        geom += (d0, d1, rest)
        offs = [-1, -1, -1]
        for a in axes_of(s):
            k = ("rows", "cols", "all").index(a)
            offs[k] = row
            n = (d0, d1, 1)[k]
            expected_rows[(i, a)] = (row, n)
            row += n
        offsets += offs
    return geom, offsets, expected_rows, row


def axes_of(shape):
    return ["rows", "cols", "all"] if len(shape) >= 2 else ["rows", "all"]


def test_tiles_cover_every_element_once():
    geom, offsets, _, _ = build(SHAPES, axes_of)
    table = CudaStatsTable(geom, offsets, torch.device("cpu"), TR, TC)
    counts = [np.zeros((geom[3 * i], geom[3 * i + 1] * geom[3 * i + 2]), dtype=int) for i in range(len(SHAPES))]
    tiles = table.tiles[: 3 * table.n_tiles].reshape(-1, 3).tolist()
    for t, rb, cb in tiles:
        counts[t][rb * TR : (rb + 1) * TR, cb * TC : (cb + 1) * TC] += 1
    for i, c in enumerate(counts):
        assert (c == 1).all(), f"tensor {i} {SHAPES[i]}"


def test_partials_indexed_like_the_kernels_add_up_to_every_group():
    gen = torch.Generator().manual_seed(0)
    geom, offsets, expected_rows, n_rows = build(SHAPES, axes_of)
    table = CudaStatsTable(geom, offsets, torch.device("cpu"), TR, TC)
    terms = [torch.randn(*s, 9, generator=gen, dtype=torch.float64) for s in SHAPES]
    scratch = np.full(table.scratch.numel(), np.nan)
    off = table.scratch_off.tolist()
    for t, rb, cb in table.tiles[: 3 * table.n_tiles].reshape(-1, 3).tolist():  # the tile kernel
        d0, d1, rest = geom[3 * t : 3 * t + 3]
        rowlen = d1 * rest
        x = terms[t].reshape(d0, rowlen, 9).numpy()
        r0, r1, c0, c1 = rb * TR, min(d0, (rb + 1) * TR), cb * TC, min(rowlen, (cb + 1) * TC)
        for r in range(r0, r1):
            scratch[off[2 * t] + (cb * d0 + r) * 9 : off[2 * t] + (cb * d0 + r) * 9 + 9] = x[r, c0:c1].sum(0)
        for c in range(c0, c1):
            at = off[2 * t + 1] + (rb * rowlen + c) * 9
            scratch[at : at + 9] = x[r0:r1, c].sum(0)
    out = np.full((n_rows, 9), np.nan)
    for t, axis, group, out_row in table.tasks[: 4 * table.n_tasks].reshape(-1, 4).tolist():  # reduce
        d0, d1, rest = geom[3 * t : 3 * t + 3]
        rowlen = d1 * rest
        n_cb, n_rb = -(-rowlen // TC), -(-d0 // TR)
        acc = np.zeros(9)
        if axis == 0:
            for i in range(n_cb):
                acc += scratch[off[2 * t] + (i * d0 + group) * 9 : off[2 * t] + (i * d0 + group) * 9 + 9]
        elif axis == 1:
            for i in range(n_rb * rest):
                rb, e = divmod(i, rest)
                at = off[2 * t + 1] + (rb * rowlen + group * rest + e) * 9
                acc += scratch[at : at + 9]
        else:
            for i in range(n_cb * d0):
                acc += scratch[off[2 * t] + i * 9 : off[2 * t] + i * 9 + 9]
        out[out_row] = acc
    for (i, axis), (row, n) in expected_rows.items():
        d0, d1, rest = geom[3 * i : 3 * i + 3]
        x = terms[i].reshape(d0, d1, rest, 9)
        want = {"rows": x.sum((1, 2)), "cols": x.sum((0, 2)), "all": x.sum((0, 1, 2)).reshape(1, 9)}[axis]
        np.testing.assert_allclose(out[row : row + n], want.numpy(), rtol=1e-12, atol=1e-12,
                                   err_msg=f"{SHAPES[i]}:{axis}")


@pytest.mark.parametrize("shape", [(4096, 25088), (512, 512, 3, 3)], ids=["fc1", "conv"])
def test_scratch_stays_proportional_to_the_tensor(shape):
    d0, d1, rest = geometry(shape)
    table = CudaStatsTable([d0, d1, rest], [0, d0, -1], torch.device("meta"), TR, TC)
    numel = d0 * d1 * rest
    assert table.scratch.numel() * 8 <= 0.6 * numel * 4, "partials stay well below the tensor's size"
