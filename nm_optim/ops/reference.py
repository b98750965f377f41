"""The oracle: the fused step in plain PyTorch, float64-capable, any device.

The update is torch.optim.SGD's for-loop (`_single_tensor_sgd`) performed with the same torch ops
in the same order (`add` with alpha, `mul`, `add_` with alpha), so its roundings are those of the
device's ATen kernels: on the CPU, params and buffers of fp32 / fp64 are bitwise torch.optim.SGD's
(the CPU kernel's flavour, csrc/sgd_math.h). It computes in the compute type (float32 for
fp16/bf16/fp32 storage, float64 for float64) and rounds to the storage type once per step, as
the kernels do. Every backend is tested against it and against torch.optim.SGD.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from nm_optim.names import ALL_SUMS_MASK, STAT_NAMES
from nm_optim.ops.args import Bucket, StepArgs
from nm_optim.ops.layout import geometry, group_counts


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The arithmetic type of the step for params of `dtype`."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def reduce_stats(p: Tensor, g: Tensor, v: Tensor, offsets: Sequence[int], stats: Tensor,
                 sums: int = ALL_SUMS_MASK, block: int = 1) -> None:
    """Writes the sums (STAT_NAMES order) of one tensor's pre-step float64 values into the rows
    of `stats` that its rows / cols / all tracks own (offsets[k] < 0: no such track): the columns
    of the bit mask `sums` (bit k: STAT_NAMES[k]), NaN in the others, as every backend does. A
    "cols" group is `block` consecutive columns (ops/layout.py, geometry).

    All 9 are computed the same way whatever the mask, so a column holds the same bits under
    every mask (the oracle for the kernels' variants, which reduce only the columns they keep)."""
    d0, d1, rest = geometry(p.shape, block)
    terms = torch.stack([p, g, v, p * p, g * g, v * v, p * g, p * v, g * v], dim=-1)
    terms = terms.reshape(d0, d1, rest, len(STAT_NAMES))
    absent = [k for k in range(len(STAT_NAMES)) if not sums >> k & 1]
    for offset, dims, n in ((offsets[0], (1, 2), d0), (offsets[1], (0, 2), d1), (offsets[2], (0, 1, 2), 1)):
        if offset >= 0:
            block = terms.sum(dims).reshape(n, len(STAT_NAMES))
            if absent:
                block[:, absent] = float("nan")
            stats[offset : offset + n] = block.to(stats.device)


def sgd_step_reference(params: Sequence[Tensor], grads: Sequence[Tensor], momentum_buffers: Sequence[Tensor],
                       is_first: Sequence[bool], **hyper: Any) -> None:
    """The reference step with the hyper-parameters by keyword (StepArgs' fields), e.g.
    ``sgd_step_reference(params, grads, bufs, is_first, lr=0.1, momentum=0.9)``."""
    step_reference(Bucket(params, grads, momentum_buffers, is_first), StepArgs(**hyper))


def step_reference(bucket: Bucket, args: StepArgs) -> None:
    """One SGD step in place on the bucket's params (and `momentum_buffers` when momentum != 0).

    g  = grad / grad_scale * (-1 if maximize else 1)
    d  = g + weight_decay * p                    (only when weight_decay != 0)
    v' = d  (is_first)   else  momentum * v + (1 - dampening) * d
    u  = d + momentum * v'  (nesterov)   else  v'
    p' = p - lr * u
    With grad_scale, the grad is divided by it in the compute type and the quotient (before the
    maximize sign) is written back to the grad, as torch's fused SGD kernels do
    (aten/src/ATen/native/cpu/FusedSGDKernel.cpp, native/cuda/FusedSgdKernel.cu); without one the
    grads are only read. When found_inf is non-zero nothing changes, grads included (decided on
    the device: no host sync).

    With `stats`, tensor i's statistics of the pre-step values (p, g, v in float64; g as above,
    v = 0 on the first step and without momentum) go to the rows stats_offsets[3i : 3i + 3] of
    its rows / cols / all tracks (see nm_optim/tracks.py), in the columns of its mask
    stats_sums[i] (NaN in the others), a "cols" group being stats_blocks[i] columns; a skipped
    step writes NaN there.
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
        g = grads[i].detach().to(cdt)
        if grad_scale is not None:
            # A division (torch's fused kernels), not a multiply by the reciprocal: the bits
            # differ for a scale that is not a power of two. The scale (float32) is exact in cdt.
            g = g / grad_scale.detach().to(device=p.device, dtype=cdt).reshape(())
            unscaled = g.to(p.dtype)
            if skip is not None:
                unscaled = torch.where(skip.to(p.device), grads[i].detach(), unscaled)
        if maximize:  # a negation, as torch's for-loop step (`-grad`): it flips a NaN's sign bit too
            g = -g
        if stats is not None and any(o >= 0 for o in stats_offsets[3 * i : 3 * i + 3]):
            v64 = (
                momentum_buffers[i].detach().double()
                if has_momentum and not is_first[i]
                else torch.zeros_like(p, dtype=torch.float64)
            )
            g64 = g.double()
            reduce_stats(p.detach().double(), g64, v64, stats_offsets[3 * i : 3 * i + 3], stats, a.sums_of(i),
                         a.block_of(i))
            if skip is not None:
                for off, n in zip(stats_offsets[3 * i : 3 * i + 3], group_counts(p.shape, a.block_of(i))):
                    if off >= 0:
                        stats[off : off + n] = torch.where(skip.to(stats.device), float("nan"), stats[off : off + n])
        if grad_scale is not None:
            grads[i].detach().copy_(unscaled)  # after the statistics, which read g (a copy)
        if p.numel() == 0:
            continue
        # torch's ops, in torch's order (torch/optim/sgd.py, _single_tensor_sgd). `add(x, alpha=a)`
        # is self + a * x with a converted to the dtype first; on the CPU one rounding (fma) with
        # AVX2 / AVX512 kernels, two with the DEFAULT ones: whatever it is, it is torch's.
        pc = p.detach().to(cdt)
        d = g
        if weight_decay != 0:
            d = d.add(pc, alpha=weight_decay)  # grad.add(param, alpha=weight_decay)
        u = d
        if has_momentum:
            v = momentum_buffers[i]
            # The buffer's own compute type: torch keeps a buffer in the dtype it was created in
            # until load_state_dict casts it, so after `model.double()` a float32 buffer's
            # mul_(momentum) rounds to float32, add_ computes in float64 and rounds to float32,
            # and param.add_ / grad.add promote again (as the same ops do here).
            vdt = compute_dtype(v.dtype)
            if is_first[i]:
                v_new = d  # buf = grad.clone()
            else:
                v_new = v.detach().to(vdt).mul(momentum).add_(d, alpha=1 - dampening)  # buf.mul_().add_()
            u = d.add(v_new, alpha=momentum) if nesterov else v_new  # grad.add(buf, alpha=momentum)
        if lr_tensor is not None and lr_tensor.device.type == "cpu":
            # torch: param.add_(grad, alpha=-lr) with lr a tensor: alpha is the tensor's value.
            p_new = pc.add(u, alpha=-lr_tensor.detach().reshape(()).item())
        elif lr_tensor is not None:
            # A device lr: torch's alpha=-lr would sync with the host (Tensor.item). addcmul is
            # self + t1 * t2, one fma on CUDA like add's self + alpha * other (not checked here:
            # no GPU on the development machines).
            neg_lr = -lr_tensor.detach().to(device=p.device).reshape(())
            p_new = torch.addcmul(pc, u, neg_lr.to(cdt))
        else:
            p_new = pc.add(u, alpha=-lr)  # param.add_(grad, alpha=-lr)
        if skip is not None:
            p_new = torch.where(skip.to(p.device), pc, p_new)
        p.detach().copy_(p_new)
        if has_momentum:
            if skip is not None and not is_first[i]:
                v_new = torch.where(skip.to(p.device), v.detach().to(vdt), v_new)
            momentum_buffers[i].detach().copy_(v_new)
