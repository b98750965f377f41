"""The one op every backend goes through: ``torch.ops.nm_optim.sgd_step_``.

Registered with torch.library so torch.compile and CUDA graphs see one opaque op that mutates the
params and momentum buffers in place, with a fake implementation for tracing. The `backend`
argument picks the implementation inside the device's kernel:

  - "reference": nm_optim/reference.py (pure PyTorch, any device, float64 too; the oracle)
  - "cpu":  nm_optim._C on CPU tensors (csrc/cpu)
  - "cuda": nm_optim._C on CUDA tensors (csrc/cuda)

All tensors of one call share a device and a dtype (nm_optim.SGD buckets them). Tensors whose
layout the flat-memory kernels cannot stream (p, g, v with different strides, or overlapping
memory) are stepped by the reference, so a native call never writes out of place.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import repeat

import torch
from torch import Tensor

from nm_optim._extension import require_backend
from nm_optim._native import DTYPE_CODES, kernel_layout_ok, sgd_step_native
from nm_optim.reference import sgd_step_reference


@torch.library.custom_op("nm_optim::sgd_step_", mutates_args=("params", "momentum_buffers"))
def sgd_step_(
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
) -> None:
    """One fused SGD step, in place, over tensors of one device and dtype.

    ``momentum_buffers`` is empty when momentum == 0; otherwise aligned with ``params``, and
    ``is_first[i]`` says that buffer i is created by this step (v' = d, its old contents unread).
    ``lr_tensor``, when given, overrides ``lr`` (read on the device, no host sync).
    """
    _check_call(params, grads, momentum_buffers, is_first, momentum, backend)
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
    )
    if not params:
        return
    if backend == "reference" or params[0].dtype not in DTYPE_CODES:
        sgd_step_reference(params, grads, momentum_buffers, is_first, **kwargs)
        return
    device, dtype = params[0].device, params[0].dtype
    require_backend(backend, device)
    has_momentum = momentum != 0
    bufs = momentum_buffers if has_momentum else repeat(None)
    ok = list(map(kernel_layout_ok, params, grads, bufs, repeat(dtype), repeat(device)))
    if all(ok):
        sgd_step_native(params, grads, momentum_buffers, is_first, **kwargs)
        return
    # Rare: a param / grad / buffer the flat kernel cannot stream. Step the rest natively.
    for run, want in ((sgd_step_native, True), (sgd_step_reference, False)):
        idx = [i for i, good in enumerate(ok) if good is want]
        if idx:
            run(
                [params[i] for i in idx],
                [grads[i] for i in idx],
                [momentum_buffers[i] for i in idx] if has_momentum else [],
                [is_first[i] for i in idx] if has_momentum else [],
                **kwargs,
            )


@sgd_step_.register_fake
def _(params, grads, momentum_buffers, is_first, lr, lr_tensor, weight_decay, momentum, dampening,
      nesterov, maximize, grad_scale, found_inf, backend) -> None:
    return None


def _check_call(params, grads, momentum_buffers, is_first, momentum, backend) -> None:
    n = len(params)
    if len(grads) != n:
        raise ValueError(f"sgd_step_: got {n} params but {len(grads)} grads")
    if momentum != 0 and (len(momentum_buffers) != n or len(is_first) != n):
        raise ValueError(
            f"sgd_step_: momentum != 0 needs one momentum buffer and one is_first flag per param, "
            f"got {n} params, {len(momentum_buffers)} buffers, {len(is_first)} flags"
        )
