"""Calling the compiled kernels: bucket tables, layout checks, pointers.

A bucket is the tensors of one param group on one device with one dtype. Its static layout (element
counts and the tile table that splits the work into blocks) is built once and cached, keyed by the
element counts, and rebuilt only when the set of params changes. Per step only pointers move: the
grads are new tensors after every `zero_grad(set_to_none=True)`. One kernel call (one OpenMP
region, one CUDA launch) per bucket, whatever the number of tensors.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Sequence
from itertools import repeat

import torch
from torch import Tensor

from nm_optim._extension import extension
from nm_optim.tracks import geometry

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}

# Elements per tile. CPU: 32K fp32 = 128 KiB per stream, large enough to amortise the loop setup,
# small enough to balance 2..64 threads on VGG-sized layers. CUDA: one 256-thread block per 16K.
TILE_SIZE = {"cpu": 32768, "cuda": 16384}
# A tensor with a "cols" track is cut into tiles of whole rows, about this many elements each:
# the CPU kernel walks such a tile in column strips (csrc/cpu/sgd_step_cpu.cpp, StatsTile).
ROW_TILE_SIZE = 1 << 19
# CPU buckets with fewer elements than this are stepped by one thread.
SERIAL_BELOW = 1 << 16

_TABLE_CACHE_SIZE = 64
_data_ptr = Tensor.data_ptr
_numel = Tensor.numel


class TileTable:
    """numel[n] and tiles[3 * n_tiles] = (tensor index, begin, end), on the kernel's device.

    `row_lengths[i]` > 0 asks for tiles of whole rows of that length for tensor i."""

    def __init__(
        self,
        numels: tuple[int, ...],
        tile_size: int,
        device: torch.device,
        row_lengths: tuple[int, ...] | None = None,
    ) -> None:
        numel = torch.tensor(numels, dtype=torch.int64)
        step = torch.full_like(numel, tile_size)
        if row_lengths is not None:
            rowlen = torch.tensor(row_lengths, dtype=torch.int64)
            whole_rows = rowlen.clamp_min(1) * (ROW_TILE_SIZE // rowlen.clamp_min(1)).clamp_min(1)
            step = torch.where(rowlen > 0, whole_rows, step)
        counts = (numel + step - 1) // step
        n_tiles = int(counts.sum())
        tensor_index = torch.repeat_interleave(torch.arange(len(numels)), counts)
        first_tile = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        tile_step = torch.repeat_interleave(step, counts)
        start = (torch.arange(n_tiles) - first_tile) * tile_step
        end = torch.minimum(start + tile_step, torch.repeat_interleave(numel, counts))
        tiles = torch.stack([tensor_index, start, end], dim=1).reshape(-1).contiguous()
        self.n_tensors = len(numels)
        self.n_tiles = n_tiles
        self.tile_size = int(step.max()) if len(numels) else tile_size
        self.numel = numel.to(device)
        self.tiles = tiles.to(device)
        # CUDA only: the device copy of the pointer table [4, n] (param, grad, buf, is_first).
        self.last_pointers: tuple[int, ...] | None = None
        if device.type == "cuda":
            self.pointers = torch.empty(4 * len(numels), dtype=torch.int64, device=device)


_tables: OrderedDict[tuple, TileTable] = OrderedDict()


def tile_table(
    numels: tuple[int, ...], device: torch.device, owner: int = 0, row_lengths: tuple[int, ...] | None = None
) -> TileTable:
    """The cached table for these element counts. `owner` (the first param's address on CUDA)
    keeps buckets apart whose device pointer tables must not be shared across streams."""
    return _cached(
        ("tiles", device, numels, owner, row_lengths),
        lambda: TileTable(numels, TILE_SIZE[device.type], device, row_lengths),
    )


def _cached(key: tuple, make):
    """The LRU cache of tables (a few per bucket, built once, rebuilt when the params change)."""
    table = _tables.get(key)
    if table is None:
        table = _tables[key] = make()
        if len(_tables) > _TABLE_CACHE_SIZE:
            _tables.popitem(last=False)
    else:
        _tables.move_to_end(key)
    return table


class CudaStatsTable:
    """The CUDA statistics kernels' tables for one bucket (csrc/sgd_step.h, CudaStatsView): 2-D
    tiles of `tile_rows` rows x `tile_cols` row elements over the tracked tensors, where each
    tensor's row and column partials go in `scratch`, and one reduction task per output group."""

    def __init__(self, geom: Sequence[int], offsets: Sequence[int], device: torch.device,
                 tile_rows: int, tile_cols: int) -> None:
        n = len(offsets) // 3
        tiles: list[int] = []
        tasks: list[int] = []
        scratch_off = [0] * (2 * n)
        total = 0
        for i in range(n):
            rows_at, cols_at, all_at = offsets[3 * i : 3 * i + 3]
            if max(rows_at, cols_at, all_at) < 0:
                continue
            d0, d1, rest = geom[3 * i : 3 * i + 3]
            rowlen = d1 * rest
            n_rb, n_cb = -(-d0 // tile_rows), -(-rowlen // tile_cols)
            scratch_off[2 * i] = total
            total += n_cb * d0 * 9
            scratch_off[2 * i + 1] = total
            total += n_rb * rowlen * 9
            for rb in range(n_rb if rowlen > 0 else 0):
                for cb in range(n_cb):
                    tiles += (i, rb, cb)
            if rows_at >= 0:
                for gi in range(d0):
                    tasks += (i, 0, gi, rows_at + gi)
            if cols_at >= 0:
                for gi in range(d1):
                    tasks += (i, 1, gi, cols_at + gi)
            if all_at >= 0:
                tasks += (i, 2, 0, all_at)
        as_tensor = lambda xs: torch.tensor(xs or [0], dtype=torch.int64).to(device)  # noqa: E731
        self.geom = as_tensor(list(geom))
        self.tiles = as_tensor(tiles)
        self.n_tiles = len(tiles) // 3
        self.scratch_off = as_tensor(scratch_off)
        self.scratch = torch.empty(max(total, 1), dtype=torch.float64, device=device)
        self.tasks = as_tensor(tasks)
        self.n_tasks = len(tasks) // 4


def cuda_stats_table(geom: Sequence[int], offsets: Sequence[int], device: torch.device, owner: int) -> CudaStatsTable:
    C = extension()
    return _cached(
        ("cuda-stats", device, tuple(geom), tuple(offsets), owner),
        lambda: CudaStatsTable(geom, offsets, device, C.STATS_TILE_ROWS, C.STATS_TILE_COLS),
    )


def kernel_layout_ok(
    p: Tensor, g: Tensor, v: Tensor | None, dtype: torch.dtype, device: torch.device
) -> bool:
    """Whether the flat-memory kernels may step (p, g, v) in a bucket of `dtype` on `device`:
    same dtype, device and shape, dense, identical strides. Anything else goes to the reference,
    which handles it correctly (or raises a clear error)."""
    shape = p.shape
    if p.dtype != dtype or p.device != device:
        return False
    if g.dtype != dtype or g.shape != shape or g.device != device:
        return False
    if v is not None and (v.dtype != dtype or v.shape != shape or v.device != device):
        return False
    if p.is_contiguous() and g.is_contiguous() and (v is None or v.is_contiguous()):
        return True
    if not _non_overlapping_and_dense(p):
        return False
    s = p.stride()
    return g.stride() == s and (v is None or v.stride() == s)


def _non_overlapping_and_dense(t: Tensor) -> bool:
    """Whether t's elements fill its memory span exactly once, in some dimension order."""
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def sgd_step_native(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    is_first: Sequence[bool],
    *,
    lr: float,
    lr_tensor: Tensor | None,
    weight_decay: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    stats: Tensor | None = None,
    stats_offsets: Sequence[int] = (),
    numels: tuple[int, ...] | None = None,
) -> None:
    """One kernel call for tensors that share a device and dtype, laid out densely (see ops.py).
    `numels`: the params' element counts when the caller has them already."""
    if not params:
        return
    C = extension()
    device = params[0].device
    has_momentum = momentum != 0
    owner = params[0].data_ptr() if device.type == "cuda" else 0
    with_stats = stats is not None and len(stats_offsets) > 0
    geom = _geometries(params, stats_offsets) if with_stats else None
    row_lengths = None
    if with_stats and device.type == "cpu" and any(o >= 0 for o in stats_offsets[1::3]):
        row_lengths = tuple(
            geom[3 * i + 1] * geom[3 * i + 2] if stats_offsets[3 * i + 1] >= 0 else 0 for i in range(len(params))
        )
    numels = numels if numels is not None else tuple(map(_numel, params))
    if with_stats and device.type == "cuda":
        # Tracked tensors are stepped by the statistics kernel: none of their tiles here.
        numels = tuple(0 if max(stats_offsets[3 * i : 3 * i + 3]) >= 0 else m for i, m in enumerate(numels))
    table = tile_table(numels, device, owner, row_lengths)
    if table.n_tiles == 0 and not with_stats:
        return
    ptrs = list(map(_data_ptr, params))
    ptrs += map(_data_ptr, grads)
    if has_momentum:
        ptrs += map(_data_ptr, momentum_buffers)
        ptrs += map(int, is_first)
    else:
        ptrs += repeat(0, 2 * len(params))
    if device.type == "cpu":
        # A host array is all the CPU kernel needs; it lives until the call returns.
        host = array("q", ptrs)
        table_ptr = host.buffer_info()[0]
    else:
        # The device copy is refreshed only when a pointer changed since the last step (with
        # a caching allocator the grads of step k+1 often land where those of step k were).
        ptrs_t = tuple(ptrs)
        if ptrs_t != table.last_pointers:
            host_t = torch.tensor(ptrs, dtype=torch.int64).pin_memory()
            table.pointers.copy_(host_t, non_blocking=True)
            table.last_pointers = ptrs_t
        table_ptr = table.pointers.data_ptr()

    scale_ptr = 0
    if grad_scale is not None:
        grad_scale = _amp_scalar(grad_scale, device, "grad_scale")
        scale_ptr = grad_scale.data_ptr()
    inf_ptr = 0
    if found_inf is not None:
        found_inf = _amp_scalar(found_inf, device, "found_inf")
        inf_ptr = found_inf.data_ptr()
    common = dict(
        dtype=DTYPE_CODES[params[0].dtype],
        n_tensors=table.n_tensors,
        numel=table.numel.data_ptr(),
        table=table_ptr,
        n_tiles=table.n_tiles,
        tiles=table.tiles.data_ptr(),
        tile_size=table.tile_size,
        momentum=float(momentum),
        dampening=float(dampening),
        weight_decay=float(weight_decay),
        nesterov=bool(nesterov),
        maximize=bool(maximize),
        grad_scale=scale_ptr,
        found_inf=inf_ptr,
    )
    if device.type == "cpu":
        lr_value = float(lr_tensor) if lr_tensor is not None else float(lr)
        geom_ptr = offsets_ptr = out_ptr = 0
        if with_stats:
            geom_arr = array("q", geom)
            offsets = array("q", stats_offsets)
            geom_ptr, offsets_ptr, out_ptr = geom_arr.buffer_info()[0], offsets.buffer_info()[0], stats.data_ptr()
        C.sgd_step_cpu(
            lr=lr_value,
            stats_geom=geom_ptr,
            stats_offsets=offsets_ptr,
            stats_out=out_ptr,
            # Small buckets run on the calling thread: a parallel region costs more than it saves
            # there, and far more when the machine is oversubscribed (spinning workers).
            num_threads=1 if sum(numels) < SERIAL_BELOW else torch.get_num_threads(),
            **common,
        )
    else:
        stats_args = {}
        if with_stats:
            cst = cuda_stats_table(geom, stats_offsets, device, owner)
            stats_args = dict(
                stats_geom=cst.geom.data_ptr(),
                stats_tiles=cst.tiles.data_ptr(),
                n_stats_tiles=cst.n_tiles,
                stats_scratch_off=cst.scratch_off.data_ptr(),
                stats_scratch=cst.scratch.data_ptr(),
                stats_tasks=cst.tasks.data_ptr(),
                n_stats_tasks=cst.n_tasks,
                stats_out=stats.data_ptr(),
            )
        lr_ptr = 0
        if lr_tensor is not None:
            lr_dev = lr_tensor.detach().to(device=device, dtype=torch.float32, non_blocking=True)
            lr_ptr = lr_dev.reshape(()).data_ptr()
        stream = torch.cuda.current_stream(device).cuda_stream
        with torch.cuda.device(device):
            C.sgd_step_cuda(lr=float(lr), lr_device=lr_ptr, stream=stream, **stats_args, **common)
    # The kernel wrote through raw pointers: tell autograd, as an in-place torch op would, so
    # that a backward through a stale saved param raises instead of using the new values.
    torch.autograd.graph.increment_version([*params, *momentum_buffers] if has_momentum else params)


def _geometries(params: Sequence[Tensor], offsets: Sequence[int]) -> list[int]:
    """(d0, d1, rest) per param for the kernel's statistics; zeros for untracked params."""
    out: list[int] = []
    for i, p in enumerate(params):
        if offsets[3 * i] >= 0 or offsets[3 * i + 1] >= 0 or offsets[3 * i + 2] >= 0:
            out += geometry(p.shape)
        else:
            out += (0, 0, 0)
    return out


def _amp_scalar(t: Tensor, device: torch.device, name: str) -> Tensor:
    """GradScaler's scale / found_inf as a float32 scalar on the kernel's device."""
    if t.numel() != 1:
        raise ValueError(f"{name} must have one element, got shape {tuple(t.shape)}")
    return t.detach().to(device=device, dtype=torch.float32, non_blocking=True).reshape(())
