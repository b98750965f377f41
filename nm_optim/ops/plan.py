"""The static part of a bucket's kernel launches, built once per layout and cached: how the work is
cut into tiles, where the statistics' partial sums go, and the device copy of the address table.

A bucket is the tensors of one param group on one device with one dtype. Its layout (element
counts, shapes of tracked tensors, statistics rows) decides the tables; per step only addresses
move (the grads are new tensors after every ``zero_grad(set_to_none=True)``). One kernel call
(one OpenMP region, one CUDA or Triton launch per kind of tile) per bucket, whatever the number
of tensors. docs/architecture.md, "The statistics plan", draws the GPU plan.
"""

from __future__ import annotations

import math
import weakref
from array import array
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from torch import Tensor

from nm_optim.names import ALL_SUMS_MASK, PRODUCT_SUMS_MASK, STAT_NAMES, SUM_MASKS
from nm_optim.ops.layout import geometry, group_counts

try:  # torch's C++ tensor-metadata check (TensorGuard); part of torch._C, so no torch._dynamo import
    from torch._C._dynamo.guards import TensorGuards as _TensorGuards
except ImportError:  # a torch without it: nothing is cached, every step checks in full
    _TensorGuards = None

# Elements per flat tile. CPU: 32K fp32 = 128 KiB per stream, large enough to amortise the loop
# setup, small enough to balance 2..64 threads on VGG-sized layers. CUDA: one 256-thread block
# per 16K.
TILE_SIZE = {"cpu": 32768, "cuda": 16384}
# A CPU tensor with a "cols" track is cut into tiles of whole rows, about this many elements
# each: the CPU kernel walks such a tile in column strips (csrc/cpu/sgd_step_cpu.cpp).
ROW_TILE_SIZE = 1 << 19
# ... and the rows of such a tile are a multiple of the AVX-512 kernel's fold period
# (kColFold512Rows in csrc/cpu/sgd_step_cpu.cpp: its float32 column partials go to float64 at
# least every 30 rows and at the end of every tile) wherever ROW_TILE_SIZE holds 15 rows or more:
# VGG-16's fc1 [4096, 25088] had tiles of 20 rows, so a fold (9 float64 column sums read and
# written, 1.8 MB per thread) every 20 rows; 30-row tiles measured 3-4% faster for rows + cols
# on fc1 (bench/kernel_cycles.cpp, both in one process).
COL_FOLD_ROWS = 30
# GPU reductions: a group with more than 2 * REDUCE_CHUNK partials (e.g. the "all" group of
# VGG-16's fc1 [4096, 25088]: 6,272 128 x 128 tiles) is reduced in two levels, chunks of about
# REDUCE_CHUNK partials in parallel, then the chunks' sums (StatsPlan).
REDUCE_CHUNK = 256

# Layouts kept per bucket: a bucket whose set of params with a grad alternates between a few
# layouts (a param skipped now and then) keeps each one's tables.
LAYOUTS_PER_BUCKET = 4
# id(owner) -> {layout key: table}, id(owner) -> its recent StatsLayouts, newest first, and
# id(owner) -> {device: AddressCheck}; the entries go when their owner (a bucket's first param)
# does, through the callback of the weak reference kept next to them.
_tables: dict[int, dict[tuple, object]] = {}
_layouts: dict[int, list[StatsLayout]] = {}
_address_checks: dict[int, dict[torch.device, AddressCheck]] = {}
_graph_tables: dict[int, list] = {}  # tables built under CUDA graph capture (`cached`), per owner
_guards: dict[int, dict[tuple[int, int], TensorGuard]] = {}  # id(owner) -> the op's guards (`owner_guard`)
_owners: dict[int, weakref.ref] = {}


def _forget(key: int) -> Callable[[weakref.ref], None]:
    def forget(_: weakref.ref) -> None:
        _tables.pop(key, None)
        _layouts.pop(key, None)
        _address_checks.pop(key, None)
        _graph_tables.pop(key, None)
        _guards.pop(key, None)
        _owners.pop(key, None)

    return forget


def _watch(owner: object) -> None:
    """Forget `owner`'s cached tables and layouts when it goes."""
    if id(owner) not in _owners:
        _owners[id(owner)] = weakref.ref(owner, _forget(id(owner)))


T = TypeVar("T")


def cached(owner: object, key: tuple, make: Callable[[], T]) -> T:
    """The plans and tables of one bucket, identified by `owner` (its first param): built once
    per layout, rebuilt when the bucket's layout changes. Per bucket rather than one global LRU,
    so that any number of buckets (per-layer param groups) never evict each other, and each
    bucket's device tables are its own (no sharing across streams).

    A table first needed under CUDA graph capture is built for that capture only (see
    `_upload`: its device copy is written when the graph replays, so an eager step before the
    first replay must not read it): kept alive with the owner, never cached."""
    per_owner = _tables.get(id(owner))
    if per_owner is None:
        _watch(owner)
        per_owner = _tables[id(owner)] = {}
    table = per_owner.get(key)
    if table is None:
        device = key[1] if len(key) > 1 and isinstance(key[1], torch.device) else None
        if device is not None and _capturing(device):
            return _keep_for_graph(owner, make())
        if len(per_owner) >= LAYOUTS_PER_BUCKET:
            per_owner.pop(next(iter(per_owner)))  # the oldest layout
        table = per_owner[key] = make()
    return table  # type: ignore[return-value]


def _capturing(device: torch.device) -> bool:
    """Whether work for `device` is being captured into a CUDA graph now."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _keep_for_graph(owner: object, table: T) -> T:
    """`table`, built under capture, kept alive as long as `owner`: the graph reads its memory at
    every replay, and freed memory would go back to the capture's pool for later tensors."""
    _watch(owner)
    _graph_tables.setdefault(id(owner), []).append(table)
    return table


def _upload(host: Tensor, device: torch.device) -> Tensor:
    """An int64 host tensor on `device`. Under CUDA graph capture neither a pageable host->device
    copy nor a pinned allocation is allowed (CUDA forbids both while a stream captures; torch's
    graph docs: no host synchronisation in a capture): the values travel as kernel arguments
    instead, torch._foreach_add_ of one value per element onto zeros (torch's multi-tensor kernels
    carry a list of scalars in their launch arguments, as torch's capturable optimizers rely on).
    The graph writes them again at every replay (the same values); nothing is written before the
    first replay."""
    if not _capturing(device):
        return host.to(device)
    out = torch.zeros(host.shape, dtype=torch.int64, device=device)
    if out.numel():
        torch._foreach_add_(list(out.view(-1).unbind()), host.view(-1).tolist())
    return out


def _int64(xs: Sequence[int], device: torch.device) -> Tensor:
    return _upload(torch.tensor(list(xs) or [0], dtype=torch.int64), device)


class PointerTable:
    """The device copy of a bucket's address table [4, n] (param, grad, buffer, is_first),
    refreshed only when an address changed since the last step (with a caching allocator the
    grads of step k+1 often land where those of step k were).

    Under CUDA graph capture every upload gets tables of its own, kept alive as long as this
    object: a replay writes and reads the copy the capture recorded, which no later eager step
    (with other addresses) may overwrite; built without a host->device copy (`_upload`)."""

    def __init__(self) -> None:
        self.device_copy: Tensor | None = None
        self.host_copy: Tensor | None = None
        self.last: tuple[int, ...] | None = None
        self.captured: list[Tensor] = []

    def upload(self, ptrs: Sequence[int], device: torch.device) -> Tensor:
        key = tuple(ptrs)
        if _capturing(device):
            dev = _upload(torch.tensor(key, dtype=torch.int64), device)
            self.captured.append(dev)
            return dev
        if key != self.last or self.device_copy is None:
            host = torch.tensor(key, dtype=torch.int64)
            if device.type == "cuda":
                host = host.pin_memory()
                if self.device_copy is None or self.device_copy.numel() != host.numel():
                    self.device_copy = torch.empty_like(host, device=device)
                self.device_copy.copy_(host, non_blocking=True)
            else:
                self.device_copy = host
            self.host_copy = host
            self.last = key
        return self.device_copy


class HostTable:
    """The CPU kernel's address table [4, n] (params, grads, buffers, is_first) in one uint64
    array, which the kernel reads by address. Converting 4000 Python ints costs about 75 us; each
    quarter is converted again only when it differs from what the array holds (the params'
    addresses and the buffers' rarely change, the flags only on the step that creates the
    buffers; grads often land where the last ones were). None for a quarter: zeros."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.array = array("Q", bytes(32 * n))
        self._held: list[Sequence[int] | None] = [None] * 4

    def address(self, parts: Sequence[Sequence[int] | None]) -> int:
        """The array's address after writing `parts` (4 sequences of n ints, or None: zeros)."""
        n = self.n
        for k, part in enumerate(parts):
            held = self._held[k]
            if part is None:
                if held is not None:
                    self.array[k * n : (k + 1) * n] = array("Q", bytes(8 * n))
                    self._held[k] = None
            elif held is None or (part is not held and part != held):
                self.array[k * n : (k + 1) * n] = array("Q", part)
                # A copy of the caller's sequence: what the array holds cannot change behind it.
                self._held[k] = tuple(part) if isinstance(part, tuple) else list(part)
        return self.array.buffer_info()[0]


class AddressCheck:
    """Whether the params of a bucket share memory, checked again only when an address changed.

    nm_optim.SGD never puts params whose memory overlaps into one call (its plan steps them in
    successive calls, in order, like torch.optim.SGD's loop), but under torch.compile the plan is
    a constant of the graph and Dynamo does not guard where a Parameter's memory is (late weight
    tying, ``b.data = a.data``, keeps the graph): the op itself must not let the kernel's threads
    step the same memory at once. Per step this is one list comparison of addresses the kernel
    call gathers anyway."""

    def __init__(self) -> None:
        self.disjoint: tuple | None = None  # the params' addresses and sizes last found disjoint

    def levels(self, ptrs: list[int], numels: Sequence[int], itemsize: int) -> list[int] | None:
        """None when no two params' memory overlaps, else the call each param goes to: 0, or one
        past the call of every earlier param whose memory overlaps it (as sgd.py's plan).
        `ptrs` starts with the params' addresses; the tensors are dense (numel * itemsize bytes)."""
        n = len(numels)
        # A tuple: the same object as last time where the caller passes the one it keeps (then
        # the comparison is one identity test), and a copy nobody can change behind this check.
        key = (ptrs if len(ptrs) == n and isinstance(ptrs, tuple) else tuple(ptrs[:n]), numels)
        if key == self.disjoint:
            return None
        spans = sorted((ptrs[i], ptrs[i] + numels[i] * itemsize, i) for i in range(n) if numels[i])
        end, overlap = 0, False
        for lo, hi, _ in spans:
            if lo < end:
                overlap = True
                break
            end = max(end, hi)
        if not overlap:
            self.disjoint = key
            return None
        levels = [0] * n
        by_order = sorted(spans, key=lambda s: s[2])
        for k, (lo, hi, i) in enumerate(by_order):  # quadratic, but only on this rare path
            levels[i] = max((levels[j] + 1 for lo_j, hi_j, j in by_order[:k] if lo_j < hi and lo < hi_j), default=0)
        return levels


def address_check(owner: object, device: torch.device) -> AddressCheck:
    """The AddressCheck of `owner`'s bucket on `device`: kept apart from the layouts' tables, so
    that it never takes the place of one of the LAYOUTS_PER_BUCKET layouts (nor is evicted by
    them: a check over 1000 params costs about 0.4 ms)."""
    per_owner = _address_checks.get(id(owner))
    if per_owner is None:
        _watch(owner)
        per_owner = _address_checks[id(owner)] = {}
    check = per_owner.get(device)
    if check is None:
        check = per_owner[device] = AddressCheck()
    return check


class TensorGuard:
    """The metadata of a bucket's params, grads and momentum buffers as last checked in full, and
    what was derived from it.

    With many small tensors a step's host time goes to reading tensor properties from Python
    (dtype, device, contiguity, element count, shape: 50-60 ns a read, four or five reads for each
    of 3000 params, grads and buffers). They rarely change, so they are compared instead, in C++:
    torch's TensorGuards (torch/csrc/dynamo/guards.cpp, the tensor check of torch.compile's
    guards, in torch._C: no torch._dynamo import) compares each tensor's Python type, dispatch
    keys (device type, layout, sparse, conjugate, inference), dtype, device index, requires_grad,
    sizes and strides with those recorded at construction: about 60 ns a tensor, against 200 ns
    for the reads. A None where a tensor was, or one tensor twice in a part, fails it. One
    TensorGuards per part: no tuple of all of them to build, and a smaller table of the objects
    seen (it checks that they are distinct) per call.

    `facts` holds what callers derived from the tensors while the guard held: each fact must be
    a function of the compared metadata only (the element counts of dense tensors, that every
    tensor is a plain one, that each momentum buffer fits its param), so it stays true for any
    tensors the guard holds for. Not compared: where the memory is (the addresses are read every
    step) and the values."""

    __slots__ = ("_checks", "_sizes", "facts")

    def __init__(self, params: Sequence[Tensor], grads: Sequence[Tensor], buffers: Sequence[Tensor]) -> None:
        parts = (params, grads, buffers)
        self._checks = tuple(_TensorGuards(*part, dynamic_dims_sizes=None, dynamic_dims_strides=None).check
                             for part in parts)
        self._sizes = tuple(map(len, parts))
        self.facts: dict[str, object] = {}

    def holds(self, params: Sequence[Tensor], grads: Sequence[Tensor], buffers: Sequence[Tensor]) -> bool:
        """Whether the tensors have, one for one, the metadata recorded."""
        check_p, check_g, check_b = self._checks
        if (len(params), len(grads), len(buffers)) != self._sizes:
            return False
        try:
            return check_p(*params) and check_g(*grads) and check_b(*buffers)
        except Exception:  # a tensor it cannot read (e.g. a sparse one's strides): not the same
            return False


def tensor_guard(params: Sequence[Tensor], grads: Sequence[Tensor], buffers: Sequence[Tensor]) -> TensorGuard | None:
    """A TensorGuard of these tensors, or None where this torch has no TensorGuards."""
    if _TensorGuards is None:
        return None
    try:
        return TensorGuard(params, grads, buffers)
    except (TypeError, RuntimeError):  # not all tensors; a torch whose TensorGuards takes other arguments
        return None


def owner_guard(owner: object, params: Sequence[Tensor], grads: Sequence[Tensor], buffers: Sequence[Tensor],
                derive: Callable[[], T]) -> T:
    """`derive()` (a function of the metadata of the tensors only), computed again only when the
    metadata changed since the last call for `owner`'s bucket with as many params and buffers:
    the op's own cache, for calls that come without a guard (`vouched`)."""
    per_owner = _guards.get(id(owner))
    if per_owner is None:
        _watch(owner)
        per_owner = _guards[id(owner)] = {}
    key = (len(params), len(buffers))
    guard = per_owner.get(key)
    if guard is not None and guard.holds(params, grads, buffers):
        return guard.facts["derived"]  # type: ignore[return-value]
    value = derive()
    guard = tensor_guard(params, grads, buffers)
    if guard is not None:
        guard.facts["derived"] = value
        if key not in per_owner and len(per_owner) >= LAYOUTS_PER_BUCKET:
            per_owner.pop(next(iter(per_owner)))
        per_owner[key] = guard
    return value


# What a caller checked last (`vouch`): (guard, params, grads, buffers, addresses).
_vouched: list[tuple | None] = [None]


def vouch(guard: TensorGuard | None, params: tuple = (), grads: tuple = (), buffers: tuple = (),
          addresses: tuple[list[int], list[int], list[int]] | None = None) -> None:
    """Tell the op, called next with these very tuples, that `guard` held for them just now and, when given, that `addresses` are the data_ptr() of the params, the
    grads and the buffers (nm_optim.SGD reads them right after the guard, while those tensors are
    in the cache): the op then uses the guard's facts and these addresses without reading them
    again. The tuples are compared by identity: a tuple cannot change, and the op meets these very
    objects only when its caller passes them on; between the caller's check and the op only the
    caller's code runs. ``vouch(None)`` forgets (the caller does, after its calls)."""
    _vouched[0] = None if guard is None else (guard, params, grads, buffers, addresses)


def vouched(params: Sequence[Tensor], grads: Sequence[Tensor], buffers: Sequence[Tensor]) -> TensorGuard | None:
    """The guard vouched for exactly these objects, else None."""
    v = _vouched[0]
    if v is None or v[1] is not params or v[2] is not grads or v[3] is not buffers:
        return None
    return v[0]


def vouched_addresses(params: Sequence[Tensor], grads: Sequence[Tensor], buffers: Sequence[Tensor]
                      ) -> tuple[list[int], list[int], list[int]] | None:
    """The addresses vouched for with exactly these objects, else None."""
    v = _vouched[0]
    return v[4] if v is not None and v[1] is params and v[2] is grads and v[3] is buffers else None


class TileTable:
    """Flat tiles for the compiled kernels: numel[n] and tiles[3 * n_tiles] = (tensor index,
    begin, end), on the kernel's device. `row_lengths[i]` > 0 asks for tiles of whole rows of
    that length for tensor i (the CPU kernel's "cols" statistics)."""

    def __init__(self, numels: tuple[int, ...], tile_size: int, device: torch.device,
                 row_lengths: tuple[int, ...] | None = None) -> None:
        numel = torch.tensor(numels, dtype=torch.int64)
        step = torch.full_like(numel, tile_size)
        if row_lengths is not None:
            lengths = torch.tensor(row_lengths, dtype=torch.int64)
            rowlen = lengths.clamp_min(1)
            rows = (ROW_TILE_SIZE // rowlen).clamp_min(1)
            folds = torch.div(rows + COL_FOLD_ROWS // 2, COL_FOLD_ROWS, rounding_mode="floor")  # nearest
            rows = torch.where(rows * 2 >= COL_FOLD_ROWS, folds * COL_FOLD_ROWS, rows)
            step = torch.where(lengths > 0, rowlen * rows, step)
        counts = (numel + step - 1) // step
        n_tiles = int(counts.sum())
        tensor_index = torch.repeat_interleave(torch.arange(len(numels)), counts)
        first_tile = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        tile_step = torch.repeat_interleave(step, counts)
        start = (torch.arange(n_tiles) - first_tile) * tile_step
        end = torch.minimum(start + tile_step, torch.repeat_interleave(numel, counts))
        tiles = torch.stack([tensor_index, start, end], dim=1).reshape(-1).contiguous()
        self.n_tensors = len(numels)
        self.numel_total = sum(numels)
        self.n_tiles = n_tiles
        self.tile_size = int(step.max()) if len(numels) else tile_size
        self.numel = _upload(numel, device)
        self.tiles = _upload(tiles, device)
        self.pointers = PointerTable()
        self.host = HostTable(len(numels))


def tile_table(owner: object, numels: tuple[int, ...], device: torch.device,
               row_lengths: tuple[int, ...] | None = None) -> TileTable:
    """The flat tiles of `owner`'s bucket for these element counts (see `cached`)."""
    return cached(owner, ("tiles", device, numels, row_lengths),
                  lambda: TileTable(numels, TILE_SIZE[device.type], device, row_lengths))


class StatsPlan:
    """The GPU plan of one bucket with tracks, shared by the CUDA and Triton kernels.

    - 2-D tiles (``tiles2d``, 8 int64 each: tensor, row block, column block, d0, row length,
      row-partials base, column-partials base, tile slot) of `tile_rows` rows x `tile_cols` row
      elements over the [d0, d1 * rest] view of each tracked tensor. Each tile steps its
      elements and writes the 9 partial sums a track needs, in float64, to ``scratch`` (bases
      and slots in units of 9 float64; -1: not needed): the partial of (row r, column block cb)
      at row_base + cb * d0 + r, of (row block rb, column c) at col_base + rb * rowlen + c, the
      tile's total at its slot. The first ``n_tiles2d_cols`` tiles are those with column
      partials (col_base >= 0), the others follow: the kernels launch a variant with column
      accumulators only for the first (the register-hungry one), one without for the rest.
      Within each kind the tiles of tensors whose groups hold all 9 sums come first, then those
      of tensors that need only the 6 products (`sums`): their variant keeps 6 accumulators per
      row and column instead of 9 and writes 6 of the 9 partials (fewer registers in the column
      variants, a third less partial traffic).
    - Flat tiles (``flat``, 5 int64 each: tensor, begin, end, tile slot, first per-element
      output row), only when `flat_tile` is given (Triton): untracked tensors, and tracked
      tensors whose rows are single elements (1-D biases), whose "rows" groups are the elements
      themselves. The first ``n_flat_plain`` tiles write no statistics (untracked tensors): the
      plain step variant runs them; the statistics variant runs only the tracked ones (all 9
      sums first, then the product-only ones, as above; the product-only variant writes NaN for
      Σp, Σg, Σv where it writes an element's own sums).
    - `sums`: one bit mask per tensor (bit k: names.STAT_NAMES[k]), one of names.SUM_MASKS;
      empty: all 9 for every tensor.
    - `align` (elements; Triton: 16 bytes): within each kind, tiles whose rows (flat tiles: bounds)
      are multiples of it come first, so that they run a variant with 16-byte vector accesses
      (``flat_groups`` and ``tile_groups`` list the runs: first, count, statistics / column
      partials, aligned).
    - Reduction tasks (``tasks``, 5 int64 each: base, count, inner, outer stride, destination
      row), one per output group: partial j of a task is at base + (j // inner) * outer +
      j % inner; the kernel adds them in float64 in this order, so results are bitwise
      reproducible (no atomics). Two levels: a group with more than 2 * `reduce_chunk` partials
      is cut into chunks of about `reduce_chunk` partials (a multiple of `inner`, so a chunk is
      again a strided walk), each reduced by a first-level task into a scratch slot; the group's
      task then adds its chunks' slots. The first ``n_pre_tasks`` tasks are the first level
      (destination: a row of ``scratch``), launched first; the rest write rows of the stats
      tensor. Each level is sorted by count, so that tasks reduced together take alike time.
    """

    def __init__(self, numels: Sequence[int], geom: Sequence[int], offsets: Sequence[int],
                 device: torch.device, tile_rows: int, tile_cols: int, flat_tile: int | None = None,
                 reduce_chunk: int = REDUCE_CHUNK, align: int = 1, sums: Sequence[int] = ()) -> None:
        flat: list[tuple[int, int, int, int, int]] = []
        flat_products: list[bool] = []  # per flat tile: its tensor needs only the 6 products
        tiles2d: list[tuple[int, ...]] = []
        tiles_products: list[bool] = []
        tasks: list[tuple[int, int, int, int, int, int]] = []
        scratch = 0

        def alloc(n: int) -> int:
            nonlocal scratch
            scratch += n
            return scratch - n

        for i, numel in enumerate(numels):
            at = offsets[3 * i : 3 * i + 3] if offsets else (-1, -1, -1)
            rows_at, cols_at, all_at = at
            tracked = max(at) >= 0
            mask = sums_mask_of(sums, i) if tracked else ALL_SUMS_MASK
            products = mask == PRODUCT_SUMS_MASK
            d0, d1, rest = geom[3 * i : 3 * i + 3] if tracked else (numel, 1, 1)
            rowlen = d1 * rest
            if tracked and numel == 0:  # every group of an empty tensor sums nothing: zeros
                for at_row, n_groups in ((rows_at, d0), (cols_at, d1), (all_at, 1)):
                    if at_row >= 0:
                        tasks += [(0, 0, 1, 1, at_row + k, mask) for k in range(n_groups)]
                continue
            if flat_tile is not None and (not tracked or rowlen == 1):
                n_tiles = -(-numel // flat_tile)
                first_slot = alloc(n_tiles) if tracked and (cols_at >= 0 or all_at >= 0) else -1
                for k in range(n_tiles):
                    flat.append((i, k * flat_tile, min(numel, (k + 1) * flat_tile),
                                 first_slot + k if first_slot >= 0 else -1, rows_at if tracked else -1))
                flat_products += [products] * n_tiles
                for at_row in (cols_at, all_at):
                    if at_row >= 0:
                        tasks.append((first_slot, n_tiles, 1, 1, at_row, mask))
                continue
            if not tracked:
                continue  # stepped by the caller's flat kernel
            n_rb, n_cb = -(-d0 // tile_rows), -(-rowlen // tile_cols)
            row_base = alloc(n_cb * d0) if rows_at >= 0 else -1
            col_base = alloc(n_rb * rowlen) if cols_at >= 0 else -1
            first_slot = alloc(n_rb * n_cb) if all_at >= 0 else -1
            for rb in range(n_rb):
                for cb in range(n_cb):
                    slot = first_slot + rb * n_cb + cb if first_slot >= 0 else -1
                    tiles2d.append((i, rb, cb, d0, rowlen, row_base, col_base, slot))
            tiles_products += [products] * (n_rb * n_cb)
            if rows_at >= 0:  # row r: its n_cb partials, stride d0
                tasks += [(row_base + r, n_cb, 1, d0, rows_at + r, mask) for r in range(d0)]
            if cols_at >= 0:  # column j: rest consecutive partials in each of n_rb row blocks
                tasks += [(col_base + j * rest, n_rb * rest, rest, rowlen, cols_at + j, mask) for j in range(d1)]
            if all_at >= 0:
                tasks.append((first_slot, n_rb * n_cb, 1, 1, all_at, mask))

        # Two-level reduction of long tasks: chunks of a multiple of `inner` partials, so chunk k
        # starts at partial k * size, i.e. at base + (k * size // inner) * outer. A chunk keeps
        # its group's mask (its unreduced sums are NaN in its slot, and again in the group's row).
        pre: list[tuple[int, int, int, int, int, int]] = []
        final: list[tuple[int, int, int, int, int, int]] = []
        for base, count, inner, outer, row, mask in tasks:
            if count <= 2 * reduce_chunk:
                final.append((base, count, inner, outer, row, mask))
                continue
            size = inner * -(-reduce_chunk // inner)
            n_chunks = -(-count // size)
            first = alloc(n_chunks)
            for k in range(n_chunks):
                pre.append((base + (k * size // inner) * outer, min(size, count - k * size), inner, outer, first + k,
                            mask))
            final.append((first, n_chunks, 1, 1, row, mask))
        pre.sort(key=lambda task: -task[1])
        final.sort(key=lambda task: -task[1])
        # Plain flat tiles first, 2-D tiles with column partials first; within each kind those
        # of tensors that need all 9 sums first, then the product-only ones; within those the
        # tiles whose rows (flat: bounds) are multiples of `align` elements first (stable: tile
        # order kept otherwise). Each run of alike tiles is one launch (`flat_groups`,
        # `tile_groups`: first tile, count, statistics / column partials, products only, aligned).
        flat_keys = [(tile[3] >= 0 or tile[4] >= 0, prod, (tile[2] - tile[1]) % align == 0)
                     for tile, prod in zip(flat, flat_products)]
        tile_keys = [(tile[6] >= 0, prod, tile[4] % align == 0) for tile, prod in zip(tiles2d, tiles_products)]
        flat_order = sorted(range(len(flat)), key=lambda k: (flat_keys[k][0], flat_keys[k][1], not flat_keys[k][2]))
        tile_order = sorted(range(len(tiles2d)), key=lambda k: (not tile_keys[k][0], tile_keys[k][1], not tile_keys[k][2]))
        flat = [flat[k] for k in flat_order]
        tiles2d = [tiles2d[k] for k in tile_order]
        self.flat_groups = _groups([flat_keys[k] for k in flat_order])
        self.tile_groups = _groups([tile_keys[k] for k in tile_order])
        # CUDA's launches (csrc/cuda/sgd_step_cuda.cu, launch): the runs of 2-D tiles as (first,
        # count, variant: 1 column partials | 2 products only), a host array read by address when
        # the kernels are launched (no device copy: the launch configuration lives on the host).
        self.tile_runs = array("q", [x for first, count, cols, prod, _ in self.tile_groups
                                     for x in (first, count, int(cols) | int(prod) << 1)])
        self.n_tile_runs = len(self.tile_groups)
        self.flat = _int64([x for tile in flat for x in tile], device)
        self.n_flat = len(flat)
        self.n_flat_plain = sum(1 for tile in flat if tile[3] < 0 and tile[4] < 0)
        self.tiles2d = _int64([x for tile in tiles2d for x in tile], device)
        self.n_tiles2d = len(tiles2d)
        self.n_tiles2d_cols = sum(1 for tile in tiles2d if tile[6] >= 0)
        self.n_tiles2d_products = sum(1 for k in tile_order if tile_keys[k][1])
        self.tasks = _int64([x for task in pre + final for x in task], device)
        self.n_pre_tasks = len(pre)
        self.n_tasks = len(pre) + len(final)
        self.scratch = torch.zeros(9 * max(scratch, 1), dtype=torch.float64, device=device)
        self.pointers = PointerTable()


# Int64 per reduction task (StatsPlan): base, count, inner, outer, destination row, sums.
TASK_FIELDS = 6


def _groups(keys: list[tuple[bool, ...]]) -> list[tuple]:
    """Runs of equal keys: (first, count, *key)."""
    out: list[tuple] = []
    for i, key in enumerate(keys):
        if out and out[-1][2:] == key:
            out[-1] = (out[-1][0], out[-1][1] + 1, *key)
        else:
            out.append((i, 1, *key))
    return out


def sums_mask_of(sums: Sequence[int], i: int) -> int:
    """Tensor i's sums mask (all 9 where `sums` is empty); ValueError for a mask that is not one
    of names.SUM_MASKS (the kernels have a variant for each of those only)."""
    if not sums:
        return ALL_SUMS_MASK
    mask = sums[i]
    if mask not in SUM_MASKS:
        raise ValueError(f"stats_sums[{i}] = {mask:#x}: the sums a tensor's groups hold are one of "
                         f"{[hex(m) for m in SUM_MASKS]} (bit k: {STAT_NAMES}[k])")
    return mask


def stats_plan(owner: object, numels: tuple[int, ...], geom: tuple[int, ...], offsets: tuple[int, ...],
               device: torch.device, tile_rows: int, tile_cols: int, flat_tile: int | None = None,
               reduce_chunk: int = REDUCE_CHUNK, align: int = 1, sums: tuple[int, ...] = ()) -> StatsPlan:
    """The StatsPlan of `owner`'s bucket for this layout (see `cached`)."""
    return cached(owner, ("stats", device, numels, geom, offsets, tile_rows, tile_cols, flat_tile, reduce_chunk, align,
                          sums),
                  lambda: StatsPlan(numels, geom, offsets, device, tile_rows, tile_cols, flat_tile, reduce_chunk, align,
                                    sums))


def stats_geometry(shapes: Sequence[Sequence[int]], offsets: Sequence[int],
                   blocks: Sequence[int] = ()) -> tuple[int, ...]:
    """(d0, d1, rest) per tensor for the statistics, with its column block (`blocks`, one per
    tensor; empty: 1 each; ops/layout.py, geometry); zeros for untracked tensors."""
    out: list[int] = []
    for i, shape in enumerate(shapes):
        out += geometry(shape, blocks[i] if blocks else 1) if max(offsets[3 * i : 3 * i + 3]) >= 0 else (0, 0, 0)
    return tuple(out)


def rows_needed(shapes: Sequence[Sequence[int]], offsets: Sequence[int], blocks: Sequence[int] = ()) -> int:
    """One past the last stats row the tracked groups of this layout write (0 when none)."""
    return max((off + k for i, shape in enumerate(shapes)
                for off, k in zip(offsets[3 * i : 3 * i + 3], group_counts(shape, blocks[i] if blocks else 1))
                if off >= 0), default=0)


class StatsLayout:
    """What one tracked bucket layout gives the checks and the kernels, computed once per layout
    (a per-step Python loop over 1000 tensors costs milliseconds) and found again on later steps
    by list comparisons (`matches`), without hashing 1000 shapes and 3000 offsets every step.

    A layout is the statistics offsets, the element counts and the shapes the statistics depend
    on (`shaped`): those of the tensors with a "rows" or "cols" track and, off the CPU, of every
    tracked tensor. On the CPU a tensor with only an "all" track is stepped as one row of numel
    elements (its sum does not depend on the row structure, and a 1-D tensor would otherwise be
    reduced as numel rows of one element: 1000 such 4096-element tensors cost 12 ms per step
    instead of 3), so its element count is all that matters: track="layers" on the CPU compares
    no shape at all.

    - rows_needed: one past the last stats row the tracked groups write (0 when none).
    - geom: (d0, d1, rest) per tensor with its column block (zeros: untracked; ops/layout.py,
      geometry); on the CPU (1, 1, numel) for a tensor with only an "all" track.
    - row_lengths (CPU, when some tensor has a "cols" track): the row length of each tensor with
      one (0 otherwise): those are cut into tiles of whole rows.
    - flat_numels (off the CPU): the element counts of the flat step's tiles: zero for tracked
      tensors, which the statistics kernel steps.
    - geom_array, offsets_array (CPU): int64 copies of geom and the offsets, which the kernel
      reads by address (built once: 3000 ints cost 50-75 us per step to convert).
    - sums: the sums masks as given (one per tensor, names.SUM_MASKS; empty: all 9), part of the
      layout; sums_array (CPU): their int64 copy for the kernel (StatsView.sums in
      csrc/sgd_step.h), None where every tracked tensor's groups hold all 9 (the kernel's
      default: the address 0).
    - blocks: the column blocks as given (one per tensor; empty: 1 each), part of the layout:
      the geometry follows them, so the kernels need nothing else.
    - plan() (off the CPU kernel: CUDA, Triton): the layout's StatsPlan, built once per device
      and tiling, so a step neither rebuilds the geometry nor hashes a key of 7 ints per tensor.

    `cpu`: the layout of the CPU kernel (above); False for the GPU kernels, also when Triton's
    interpreter runs them on CPU tensors."""

    def __init__(self, shapes: Sequence[Sequence[int]], numels: tuple[int, ...], offsets: list[int], cpu: bool,
                 sums: list[int] | None = None, blocks: list[int] | None = None) -> None:
        n = len(shapes)
        sums = [] if sums is None else sums
        blocks = [] if blocks is None else blocks
        if len(sums) not in (0, n):
            raise ValueError(f"stats_sums needs one mask per param, got {len(sums)} for {n}")
        if len(blocks) not in (0, n):
            raise ValueError(f"stats_blocks needs one block per param, got {len(blocks)} for {n}")
        at = [offsets[3 * i : 3 * i + 3] for i in range(n)]
        tracked = [max(a) >= 0 for a in at]
        masks = [sums_mask_of(sums, i) if tracked[i] else ALL_SUMS_MASK for i in range(n)]  # checks them
        only_all = [a[0] < 0 and a[1] < 0 and a[2] >= 0 for a in at]
        self.cpu = cpu
        self.numels = numels
        self.offsets = list(offsets)  # a copy: the caller may reuse its list
        self.offsets_key = tuple(offsets)
        self.sums = list(sums)  # a copy, as the offsets
        self.sums_key = tuple(sums)
        self.blocks = list(blocks)
        self.shaped = [i for i in range(n) if tracked[i] and not (cpu and only_all[i])]
        self.shapes = [shapes[i] for i in self.shaped]
        self.tracked = any(tracked)
        self.rows_needed = rows_needed(shapes, offsets, blocks)
        geom = stats_geometry(shapes, offsets, blocks)
        self.flat_numels = None if cpu else tuple(0 if tracked[i] else math.prod(shapes[i]) for i in range(n))
        self.row_lengths = None
        self.geom_array = self.offsets_array = self.sums_array = None
        if cpu:
            geom = tuple(x for i in range(n) for x in (
                (1, 1, geom[3 * i] * geom[3 * i + 1] * geom[3 * i + 2]) if only_all[i] else geom[3 * i : 3 * i + 3]))
            if any(o >= 0 for o in offsets[1::3]):
                self.row_lengths = tuple(geom[3 * i + 1] * geom[3 * i + 2] if offsets[3 * i + 1] >= 0 else 0
                                         for i in range(n))
            self.geom_array, self.offsets_array = array("q", geom), array("q", offsets)
            if any(m != ALL_SUMS_MASK for m in masks):
                self.sums_array = array("q", masks)
        self.geom = geom
        self.plans: dict[tuple, StatsPlan] = {}
        self.graph_plans: list[StatsPlan] = []

    def plan(self, device: torch.device, tile_rows: int, tile_cols: int, flat_tile: int | None = None,
             reduce_chunk: int = REDUCE_CHUNK, align: int = 1) -> StatsPlan:
        """The GPU kernels' StatsPlan of this layout on `device` with this tiling (built once)."""
        key = (device, tile_rows, tile_cols, flat_tile, reduce_chunk, align)
        plan = self.plans.get(key)
        if plan is None:
            if self.cpu:
                raise ValueError("a StatsPlan is for the GPU kernels: get the layout with cpu=False")
            plan = StatsPlan(self.numels, self.geom, self.offsets_key, device, tile_rows, tile_cols,
                             flat_tile, reduce_chunk, align, self.sums_key)
            if _capturing(device):  # for this capture only (see `cached`), kept as long as the layout
                self.graph_plans.append(plan)
                return plan
            self.plans[key] = plan
        return plan

    def matches(self, params: Sequence[Tensor], numels: tuple[int, ...], offsets: list[int],
                sums: list[int] | None = None, blocks: list[int] | None = None) -> bool:
        """Whether `params` (with these element counts), `offsets`, `sums` and `blocks` have
        this layout."""
        return (numels == self.numels and offsets == self.offsets and self.has_sums(sums, blocks)
                and [params[i].shape for i in self.shaped] == self.shapes)

    def has_sums(self, sums: Sequence[int] | None, blocks: Sequence[int] | None = None) -> bool:
        """Whether `sums` and `blocks` (lists or tuples; None: empty) are this layout's masks and
        column blocks: a list comparison each (a step's host cost with 1000 tracked tensors)."""
        return _same(sums, self.sums) and _same(blocks, self.blocks)


def _same(given: Sequence[int] | None, have: list[int]) -> bool:
    if given is None:
        return not have
    return given == have if type(given) is list else list(given) == have


def stats_layout(owner: object, params: Sequence[Tensor], numels: tuple[int, ...], offsets: Sequence[int],
                 device: torch.device, cpu: bool | None = None, sums: Sequence[int] = (),
                 blocks: Sequence[int] = ()) -> StatsLayout:
    """The StatsLayout of `owner`'s bucket (see `cached`) for these tensors on `device`,
    statistics offsets, sums masks (one per param, names.SUM_MASKS; empty: all 9) and column
    blocks (one per param; empty: 1 each): one of its last LAYOUTS_PER_BUCKET layouts when it
    matches, else a new one. cpu: whether for the CPU kernel (default: whether `device` is the
    CPU)."""
    offsets = offsets if isinstance(offsets, list) else list(offsets)
    sums = sums if isinstance(sums, list) else list(sums)
    blocks = blocks if isinstance(blocks, list) else list(blocks)
    cpu = device.type == "cpu" if cpu is None else cpu
    recent = _layouts.get(id(owner))
    if recent is None:
        _watch(owner)
        recent = _layouts[id(owner)] = []
    for layout in recent:
        if layout.cpu == cpu and layout.matches(params, numels, offsets, sums, blocks):
            return layout
    layout = StatsLayout([p.shape for p in params], numels, offsets, cpu, sums, blocks)
    recent.insert(0, layout)
    del recent[LAYOUTS_PER_BUCKET:]
    return layout
