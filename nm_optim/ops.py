"""The one op every backend goes through: ``torch.ops.nm_optim.sgd_step_``.

Registered with torch.library so torch.compile and CUDA graphs see one opaque op that mutates the
params and momentum buffers in place (the schema says so, so the dispatcher bumps their version
counters), with a fake implementation for tracing. The `backend` argument picks the
implementation inside the device's kernel:

  - "reference": nm_optim/reference.py (pure PyTorch, any device, float64 too; the oracle)
  - "cpu":  nm_optim._C on CPU tensors (csrc/cpu)
  - "cuda": nm_optim._C on CUDA tensors (csrc/cuda)
  - "triton": nm_optim/_triton.py on CUDA tensors (and CPU tensors under TRITON_INTERPRET=1)

All params of one call share a device and a dtype (nm_optim.SGD buckets them). A tensor that the
flat-memory kernels cannot stream (p, g, v of different dtype, device, size or strides) is stepped
by the reference instead, so a native call never reads or writes out of place.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import repeat
from operator import attrgetter, eq, is_

import torch
from torch import Tensor

from nm_optim._extension import require_backend
from nm_optim._native import DTYPE_CODES, kernel_layout_ok, sgd_step_native
from nm_optim.reference import sgd_step_reference
from nm_optim.tracks import STAT_NAMES, group_counts

_lib = torch.library.Library("nm_optim", "DEF")  # noqa: TOR901 (the op is defined once, here)
_lib.define(
    "sgd_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, bool[] is_first, "
    "float lr, Tensor? lr_tensor, float weight_decay, float momentum, float dampening, "
    "bool nesterov, bool maximize, Tensor? grad_scale, Tensor? found_inf, str backend, "
    "Tensor(c!)? stats=None, int[] stats_offsets=[]) -> ()"
)

_dtype = attrgetter("dtype")
_numel = Tensor.numel
_get_device = Tensor.get_device
_is_contiguous = Tensor.is_contiguous


def _sgd_step_impl(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    is_first: Sequence[bool],
    lr: float,
    lr_tensor: Tensor | None,
    weight_decay: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    backend: str,
    stats: Tensor | None = None,
    stats_offsets: Sequence[int] = (),
) -> None:
    has_momentum = momentum != 0
    n = len(params)
    if len(grads) != n:
        raise ValueError(f"sgd_step_: got {n} params but {len(grads)} grads")
    if has_momentum and (len(momentum_buffers) != n or len(is_first) != n):
        raise ValueError(
            "sgd_step_: momentum != 0 needs one momentum buffer and one is_first flag per param, "
            f"got {n} params, {len(momentum_buffers)} buffers, {len(is_first)} flags"
        )
    if stats is not None:
        _check_stats(params, stats, stats_offsets)
    else:
        stats_offsets = ()
    if n == 0:
        return
    kwargs = dict(
        lr=lr,
        lr_tensor=lr_tensor,
        weight_decay=weight_decay,
        momentum=momentum,
        dampening=dampening,
        nesterov=nesterov,
        maximize=maximize,
        grad_scale=grad_scale,
        found_inf=found_inf,
        stats=stats if stats_offsets else None,
        stats_offsets=stats_offsets,
    )
    dtype = params[0].dtype
    if backend == "reference" or dtype not in DTYPE_CODES:
        sgd_step_reference(params, grads, momentum_buffers, is_first, **kwargs)
        return
    device = params[0].device
    require_backend(backend, device)
    bufs = momentum_buffers if has_momentum else []
    native = sgd_step_native
    if backend == "triton":
        from nm_optim._triton import sgd_step_triton as native  # imports triton: only when asked
    numels = _uniform_dense(params, grads, bufs, dtype, params[0].get_device())
    if numels is not None:
        native(params, grads, momentum_buffers, is_first, numels=numels, **kwargs)
        return
    # Rare: some tensor the flat kernel cannot stream. Step the others natively.
    ok = list(
        map(kernel_layout_ok, params, grads, bufs if has_momentum else repeat(None),
            repeat(dtype), repeat(device))
    )
    kwargs.pop("stats_offsets")
    for run, want in ((native, True), (sgd_step_reference, False)):
        idx = [i for i, good in enumerate(ok) if good is want]
        if idx:
            offsets = [o for i in idx for o in stats_offsets[3 * i : 3 * i + 3]]
            run(
                [params[i] for i in idx],
                [grads[i] for i in idx],
                [momentum_buffers[i] for i in idx] if has_momentum else [],
                [is_first[i] for i in idx] if has_momentum else [],
                stats_offsets=offsets if any(o >= 0 for o in offsets) else (),
                **kwargs,
            )


def _uniform_dense(params, grads, bufs, dtype, device_index) -> tuple[int, ...] | None:
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


def _check_stats(params: Sequence[Tensor], stats: Tensor, offsets: Sequence[int]) -> None:
    """Every tracked group must land inside `stats` (a float64 [rows, 9] tensor on the params'
    device): the kernels write there through raw pointers."""
    if len(offsets) not in (0, 3 * len(params)):
        raise ValueError(f"sgd_step_: stats_offsets needs 3 entries per param, got {len(offsets)} for {len(params)}")
    if stats.dtype != torch.float64 or stats.dim() != 2 or stats.shape[1] != len(STAT_NAMES) or not stats.is_contiguous():
        raise ValueError(f"sgd_step_: stats must be a contiguous float64 [rows, 9] tensor, got {stats.dtype} {tuple(stats.shape)}")
    rows = stats.shape[0]
    for i in range(len(params) if offsets else 0):
        for off, n in zip(offsets[3 * i : 3 * i + 3], group_counts(params[i].shape)):
            if off >= 0 and off + n > rows:
                raise ValueError(
                    f"sgd_step_: param {i} (shape {tuple(params[i].shape)}) needs stats rows "
                    f"[{off}, {off + n}) but stats has {rows}"
                )
            if off >= 0 and stats.device != params[i].device:
                raise ValueError(f"sgd_step_: stats is on {stats.device}, param {i} on {params[i].device}")


def _sgd_step_fake(params, grads, momentum_buffers, is_first, lr, lr_tensor, weight_decay, momentum,
                   dampening, nesterov, maximize, grad_scale, found_inf, backend, stats=None,
                   stats_offsets=()) -> None:
    return None


_lib.impl("sgd_step_", _sgd_step_impl, "CPU")
_lib.impl("sgd_step_", _sgd_step_impl, "CUDA")
torch.library.register_fake("nm_optim::sgd_step_", _sgd_step_fake, lib=_lib)

sgd_step_ = torch.ops.nm_optim.sgd_step_
"""``sgd_step_(params, grads, momentum_buffers, is_first, lr, lr_tensor, weight_decay, momentum,
dampening, nesterov, maximize, grad_scale, found_inf, backend, stats=None, stats_offsets=[])``: one
fused SGD step, in place, over tensors of one device and dtype. With ``stats`` (float64 [rows, 9]),
param i's statistics go to the rows stats_offsets[3i : 3i + 3] of its rows / cols / all tracks
(-1: none; see nm_optim/tracks.py). ``momentum_buffers`` and ``is_first`` are empty when
momentum == 0; otherwise ``is_first[i]`` says buffer i is created by this step (v' = d, its old
contents unread). ``lr_tensor``, when given, overrides ``lr`` (read on the device, no host sync).
"""
