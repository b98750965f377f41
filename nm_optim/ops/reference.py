"""The oracle: the fused step in plain PyTorch, float64-capable, any device.

It mirrors the branch structure of the kernels (csrc/sgd_math.h) line by line, in the same compute
type (float32 for fp16/bf16/fp32 storage, float64 for float64), and rounds to the storage type
once per step as the kernels do. Every backend is tested against it and against torch.optim.SGD.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from nm_optim.names import STAT_NAMES
from nm_optim.ops.args import Bucket, StepArgs
from nm_optim.ops.layout import geometry, group_counts


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The arithmetic type of the step for params of `dtype`."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def reduce_stats(p: Tensor, g: Tensor, v: Tensor, offsets: Sequence[int], stats: Tensor) -> None:
    """Writes the 9 sums (STAT_NAMES order) of one tensor's pre-step float64 values into the rows
    of `stats` that its rows / cols / all tracks own (offsets[k] < 0: no such track)."""
    d0, d1, rest = geometry(p.shape)
    terms = torch.stack([p, g, v, p * p, g * g, v * v, p * g, p * v, g * v], dim=-1)
    terms = terms.reshape(d0, d1, rest, len(STAT_NAMES))
    for offset, dims, n in ((offsets[0], (1, 2), d0), (offsets[1], (0, 2), d1), (offsets[2], (0, 1, 2), 1)):
        if offset >= 0:
            stats[offset : offset + n] = terms.sum(dims).reshape(n, len(STAT_NAMES)).to(stats.device)


def sgd_step_reference(params: Sequence[Tensor], grads: Sequence[Tensor], momentum_buffers: Sequence[Tensor],
                       is_first: Sequence[bool], **hyper) -> None:
    """The reference step with the hyper-parameters by keyword (StepArgs' fields), e.g.
    ``sgd_step_reference(params, grads, bufs, is_first, lr=0.1, momentum=0.9)``."""
    step_reference(Bucket(params, grads, momentum_buffers, is_first), StepArgs(**hyper))


def step_reference(bucket: Bucket, args: StepArgs) -> None:
    """One SGD step in place on the bucket's params (and `momentum_buffers` when momentum != 0).

    g  = grad * gmul, gmul = (-1 if maximize else 1) / grad_scale
    d  = g + weight_decay * p                    (only when weight_decay != 0)
    v' = d  (is_first)   else  momentum * v + (1 - dampening) * d
    u  = d + momentum * v'  (nesterov)   else  v'
    p' = p - lr * u
    When found_inf is non-zero nothing changes (decided on the device: no host sync).

    With `stats`, tensor i's statistics of the pre-step values (p, g, v in float64; g = grad * gmul,
    v = 0 on the first step and without momentum) go to the rows stats_offsets[3i : 3i + 3] of
    its rows / cols / all tracks (see nm_optim/tracks.py); a skipped step writes NaN there.
    """
    params, grads, momentum_buffers, is_first = bucket[:4]
    a = args
    lr, lr_tensor, weight_decay, momentum = a.lr, a.lr_tensor, a.weight_decay, a.momentum
    dampening, nesterov, maximize = a.dampening, a.nesterov, a.maximize
    grad_scale, found_inf, stats, stats_offsets = a.grad_scale, a.found_inf, a.stats, a.stats_offsets
    has_momentum = momentum != 0
    skip = None if found_inf is None else found_inf.reshape(()) != 0
    for i, p in enumerate(params):
        cdt = compute_dtype(p.dtype)
        gmul = torch.tensor(-1.0 if maximize else 1.0, dtype=torch.float64, device=p.device)
        if grad_scale is not None:
            gmul = gmul / grad_scale.to(device=p.device, dtype=torch.float64).reshape(())
        if stats is not None and any(o >= 0 for o in stats_offsets[3 * i : 3 * i + 3]):
            v64 = (
                momentum_buffers[i].detach().double()
                if has_momentum and not is_first[i]
                else torch.zeros_like(p, dtype=torch.float64)
            )
            g64 = (grads[i].detach().to(cdt) * gmul.to(cdt)).double()
            reduce_stats(p.detach().double(), g64, v64, stats_offsets[3 * i : 3 * i + 3], stats)
            if skip is not None:
                for off, n in zip(stats_offsets[3 * i : 3 * i + 3], group_counts(p.shape)):
                    if off >= 0:
                        stats[off : off + n] = torch.where(skip.to(stats.device), float("nan"), stats[off : off + n])
        if p.numel() == 0:
            continue
        pc = p.detach().to(cdt)
        d = grads[i].detach().to(cdt) * gmul.to(cdt)
        if weight_decay != 0:
            d = d + weight_decay * pc
        u = d
        if has_momentum:
            v = momentum_buffers[i]
            if is_first[i]:
                v_new = d
            else:
                v_new = momentum * v.detach().to(cdt) + (1 - dampening) * d
            u = d + momentum * v_new if nesterov else v_new
        if lr_tensor is not None:
            p_new = pc - lr_tensor.to(device=p.device, dtype=cdt).reshape(()) * u
        else:
            p_new = pc + (-lr) * u
        if skip is not None:
            p_new = torch.where(skip.to(p.device), pc, p_new)
        p.detach().copy_(p_new)
        if has_momentum:
            if skip is not None and not is_first[i]:
                v_new = torch.where(skip.to(p.device), v.detach().to(cdt), v_new)
            momentum_buffers[i].detach().copy_(v_new)
