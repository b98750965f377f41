"""What the kernels assume about tensors: the dtypes they compile for, the (d0, d1, rest) view the
statistics use, and which (param, grad, buffer) triples the flat-memory kernels may stream.

A tensor the kernels cannot stream (p, g, v of different dtype, device, size or strides) is
stepped by the reference instead, so a native call never reads or writes out of place.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import repeat
from operator import attrgetter, eq, is_

import torch
from torch import Tensor

# The storage types the compiled and Triton kernels handle (the code each kernel dispatches on).
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}

_dtype = attrgetter("dtype")
_numel = Tensor.numel
_get_device = Tensor.get_device
_is_contiguous = Tensor.is_contiguous


def geometry(shape: Sequence[int], block: int = 1) -> tuple[int, int, int]:
    """(d0, d1, rest) of a shape: size(0), size(1) / block, block × the product of the sizes after
    dim 1. The statistics view every tensor as [d0, d1, rest]: rows are dim 0, columns dim 1.

    `block` (the column block of a "cols" track, nm_optim/tracks.py): that many consecutive
    columns of dim 1 form one group, e.g. the 49 columns a channel of VGG-16's last conv feeds into
    fc1 [4096, 25088] after a Flatten: the kernels then reduce fc1 as [4096, 512, 49], the memory
    order being the same. It must divide size(1)."""
    d0 = shape[0] if len(shape) >= 1 else 1
    d1 = shape[1] if len(shape) >= 2 else 1
    return d0, d1 // block, block * math.prod(shape[2:])


def group_counts(shape: Sequence[int], block: int = 1) -> tuple[int, int, int]:
    """Groups of a "rows", "cols" (of `block` columns each) and "all" track of a tensor of this
    shape."""
    d0, d1, _ = geometry(shape, block)
    return d0, d1, 1


def uniform_dense(params, grads, bufs, dtype: torch.dtype, device_index: int) -> tuple[int, ...] | None:
    """The common case, checked list-wise (a C-level loop per property): every tensor
    contiguous, of `dtype`, on the same device, and grads / buffers with their param's element
    count. Returns the element counts, or None when the per-tensor path is needed."""
    tensors = [*params, *grads, *bufs]
    if not all(map(is_, map(_dtype, tensors), repeat(dtype))):
        return None
    if not all(map(eq, map(_get_device, tensors), repeat(device_index))):
        return None
    if not all(map(_is_contiguous, tensors)):
        return None
    numels = tuple(map(_numel, params))
    if numels != tuple(map(_numel, grads)) or (bufs and numels != tuple(map(_numel, bufs))):
        return None
    return numels


def kernel_layout_ok(p: Tensor, g: Tensor, v: Tensor | None, dtype: torch.dtype, device: torch.device) -> bool:
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


@dataclass(frozen=True)
class StorageView:
    """A dense tensor in any dimension order (channels_last, ``.t()``, a permutation), as the
    row-major [P, Q, R] view of its memory that the kernels index, and where its logical
    "rows" / "cols" groups come from in that view.

    The tensor's dims sorted by stride give its storage order n_0 .. n_k (a contiguous
    permutation: no copy). Logical dims 0 and 1 sit at storage positions a and b; with
    x = min(a, b), y = max(a, b) the view is P = n_0..n_x, Q = n_x+1..n_y, R = the rest, so each
    view row holds one index of storage axis x (innermost of P) and each view column one index of
    axis y (innermost of Q). A logical group is then the sum of the view groups g with
    g % n = its index: ``view_sums.view(G // n, n, 9).sum(0)``, exact in float64."""

    perm: tuple[int, ...]
    shape: tuple[int, int, int]
    rows_from: int  # view axis (0: view rows, 1: view cols) that gives the logical rows
    cols_from: int  # ... the logical cols (-1: a tensor with fewer than 2 dims)

    def view(self, t: Tensor) -> Tensor:
        return t.permute(self.perm).reshape(self.shape)


def storage_view(t: Tensor) -> StorageView:
    """The StorageView of a dense tensor (kernel_layout_ok) with at least 1 dimension."""
    sizes, strides = t.shape, t.stride()
    # Size-1 dims have arbitrary strides and do not change the memory order: any place works.
    perm = tuple(sorted(range(t.dim()), key=lambda d: (-strides[d] if sizes[d] > 1 else 0, d)))
    n = [sizes[d] for d in perm]
    a = perm.index(0)
    b = perm.index(1) if t.dim() >= 2 else a
    x, y = min(a, b), max(a, b)
    shape = (math.prod(n[: x + 1]), math.prod(n[x + 1 : y + 1]), math.prod(n[y + 1 :]))
    if t.dim() < 2:
        return StorageView(perm, shape, 0, -1)
    return StorageView(perm, shape, 0 if a <= b else 1, 1 if a <= b else 0)
