"""What the kernels assume about tensors: the dtypes they compile for, the (d0, d1, rest) view the
statistics use, and which (param, grad, buffer) triples the flat-memory kernels may stream.

A tensor the kernels cannot stream (p, g, v of different dtype, device, size or strides) is
stepped by the reference instead, so a native call never reads or writes out of place.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
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


def geometry(shape: Sequence[int]) -> tuple[int, int, int]:
    """(d0, d1, rest) of a shape: size(0), size(1), product of the sizes after dim 1. The
    statistics view every tensor as [d0, d1, rest]: rows are dim 0, columns dim 1."""
    d0 = shape[0] if len(shape) >= 1 else 1
    d1 = shape[1] if len(shape) >= 2 else 1
    return d0, d1, math.prod(shape[2:])


def group_counts(shape: Sequence[int]) -> tuple[int, int, int]:
    """Groups of a "rows", "cols" and "all" track of a tensor of this shape."""
    d0, d1, _ = geometry(shape)
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
