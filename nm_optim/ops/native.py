"""The "cpu" and "cuda" backends: one call of the compiled kernels (nm_optim._C) per bucket.

The tables come from nm_optim/ops/plan.py; here only the per-step values move: the address
table, the AMP scalars, the learning rate.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from nm_optim.ops import plan as P
from nm_optim.ops.args import Bucket, StepArgs
from nm_optim.ops.extension import extension
from nm_optim.ops.layout import DTYPE_CODES
from nm_optim.ops.plan import stats_layout, tile_table

# CPU buckets with fewer elements than this are stepped by one thread: an OpenMP region costs
# more than the work there, and 10-20x more when the machine is oversubscribed (spinning
# workers: 3.7-17 ms vs 0.8 ms per step measured on the digits nets under load).
SERIAL_BELOW = 1 << 16
# CUDA statistics: a second count rides in the high bits of n_stats_tasks (kCountBits in
# csrc/cuda/sgd_step_cuda.cu).
CUDA_COUNT_BITS = 32

_data_ptr = Tensor.data_ptr
_numel = Tensor.numel


def address_table(params: Sequence[Tensor], grads: Sequence[Tensor], momentum_buffers: Sequence[Tensor],
                  is_first: Sequence[bool], has_momentum: bool) -> list[int]:
    """[4, n] int64: the addresses of params, grads, buffers (0 without momentum), is_first (the
    flags as they are: a bool is the int 0 or 1)."""
    param_ptrs, grad_ptrs, buf_ptrs = addresses(params, grads, momentum_buffers, has_momentum)
    ptrs = [*param_ptrs, *grad_ptrs]
    if has_momentum:
        ptrs += buf_ptrs
        ptrs += is_first
    else:
        ptrs += [0] * (2 * len(params))
    return ptrs


def addresses(params: Sequence[Tensor], grads: Sequence[Tensor], momentum_buffers: Sequence[Tensor],
              has_momentum: bool) -> tuple[list[int], list[int], list[int]]:
    """The data_ptr() of params, grads and buffers (none without momentum): from the caller where
    it read them just before the call (ops/plan.py, vouched_addresses), else read here."""
    known = P.vouched_addresses(params, grads, momentum_buffers)
    if known is not None:
        return known
    return (list(map(_data_ptr, params)), list(map(_data_ptr, grads)),
            list(map(_data_ptr, momentum_buffers)) if has_momentum else [])


def amp_scalar(t: Tensor, device: torch.device, name: str) -> Tensor:
    """GradScaler's scale / found_inf as a float32 scalar on the kernel's device."""
    if t.numel() != 1:
        raise ValueError(f"{name} must have one element, got shape {tuple(t.shape)}")
    return t.detach().to(device=device, dtype=torch.float32, non_blocking=True).reshape(())


def stepped_in_levels(step, bucket: Bucket, args: StepArgs, ptrs: list[int], numels: Sequence[int],
                      owner: object) -> bool:
    """When params of the bucket share memory (P.AddressCheck), step them in successive calls of
    `step`, in order, as torch.optim.SGD's loop does, and return True; else False (one call)."""
    params = bucket.params
    levels = P.address_check(owner, params[0].device).levels(ptrs, numels, params[0].element_size())
    if levels is None:
        return False
    for level in range(max(levels) + 1):
        idx = [i for i, k in enumerate(levels) if k == level]
        step(bucket.subset(idx, args.has_momentum), args.subset(idx))
    return True


def sgd_step_native(bucket: Bucket, args: StepArgs) -> None:
    """One kernel call for dense tensors that share a device and dtype (see ops/op.py)."""
    params, grads, momentum_buffers, is_first, numels, owner, layout = bucket
    if not params:
        return
    C = extension()
    device = params[0].device
    has_momentum = args.has_momentum
    owner = owner if owner is not None else params[0]
    numels = numels if numels is not None else tuple(map(_numel, params))
    param_ptrs, grad_ptrs, buf_ptrs = addresses(params, grads, momentum_buffers, has_momentum)
    if stepped_in_levels(sgd_step_native, bucket, args, param_ptrs, numels, owner):
        return
    if args.with_stats and (layout is None or not layout.has_sums(args.stats_sums, args.stats_blocks)):
        # (a layout found without the sums masks: the one of these masks, one list comparison)
        layout = stats_layout(owner, params, numels, args.stats_offsets, device, sums=args.stats_sums,
                              blocks=args.stats_blocks)
    with_stats = layout is not None
    row_lengths = None
    if with_stats:
        row_lengths = layout.row_lengths
        if device.type == "cuda":
            numels = layout.flat_numels
    table = tile_table(owner, numels, device, row_lengths)
    if table.n_tiles == 0 and not with_stats:
        return
    if device.type == "cpu":
        # All the CPU kernel needs: the bucket's host table, rewritten where an address changed.
        table_ptr = table.host.address((param_ptrs, grad_ptrs, buf_ptrs if has_momentum else None,
                                        is_first if has_momentum else None))
    else:
        ptrs = [*param_ptrs, *grad_ptrs, *buf_ptrs, *is_first] if has_momentum else [
            *param_ptrs, *grad_ptrs, *[0] * (2 * len(params))]
        table_ptr = table.pointers.upload(ptrs, device).data_ptr()

    scale_ptr = inf_ptr = 0
    if args.grad_scale is not None:
        grad_scale = amp_scalar(args.grad_scale, device, "grad_scale")
        scale_ptr = grad_scale.data_ptr()
    if args.found_inf is not None:
        found_inf = amp_scalar(args.found_inf, device, "found_inf")
        inf_ptr = found_inf.data_ptr()
    common = dict(
        dtype=DTYPE_CODES[params[0].dtype],
        n_tensors=table.n_tensors,
        numel=table.numel.data_ptr(),
        table=table_ptr,
        n_tiles=table.n_tiles,
        tiles=table.tiles.data_ptr(),
        tile_size=table.tile_size,
        momentum=float(args.momentum),
        dampening=float(args.dampening),
        weight_decay=float(args.weight_decay),
        nesterov=bool(args.nesterov),
        maximize=bool(args.maximize),
        grad_scale=scale_ptr,
        found_inf=inf_ptr,
    )
    if device.type == "cpu":
        lr_value = float(args.lr_tensor) if args.lr_tensor is not None else float(args.lr)
        geom_ptr = offsets_ptr = out_ptr = 0
        sums = {}  # all 9 sums everywhere: the binding's default (0: no mask table)
        if with_stats:  # the layout (held here) keeps its arrays alive through the call
            geom_ptr, offsets_ptr = layout.geom_array.buffer_info()[0], layout.offsets_array.buffer_info()[0]
            out_ptr = args.stats.data_ptr()
            if layout.sums_array is not None:
                sums = dict(stats_sums=layout.sums_array.buffer_info()[0])
        C.sgd_step_cpu(
            lr=lr_value,
            stats_geom=geom_ptr,
            stats_offsets=offsets_ptr,
            stats_out=out_ptr,
            num_threads=1 if table.numel_total < SERIAL_BELOW else torch.get_num_threads(),
            **sums,
            **common,
        )
    else:
        stats_args = {}
        if with_stats:
            plan = layout.plan(device, C.STATS_TILE_ROWS, C.STATS_TILE_COLS, reduce_chunk=P.REDUCE_CHUNK)
            # The runs of alike tiles, one launch of their kernel variant each (column partials
            # or not, all 9 sums or the 6 products: csrc/cuda/sgd_step_cuda.cu, launch), from a
            # host array the plan keeps; the first-level reduction tasks (first in the plan)
            # counted in the high 32 bits of n_stats_tasks. The binding passes both through.
            stats_args = dict(
                stats_tiles=plan.tiles2d.data_ptr(),
                n_stats_tiles=plan.n_tiles2d,
                stats_runs=plan.tile_runs.buffer_info()[0],
                n_stats_runs=plan.n_tile_runs,
                stats_scratch=plan.scratch.data_ptr(),
                stats_tasks=plan.tasks.data_ptr(),
                n_stats_tasks=plan.n_tasks | plan.n_pre_tasks << CUDA_COUNT_BITS,
                stats_out=args.stats.data_ptr(),
            )
        lr_ptr = 0
        if args.lr_tensor is not None:
            lr_dev = args.lr_tensor.detach().to(device=device, dtype=torch.float32, non_blocking=True)
            lr_ptr = lr_dev.reshape(()).data_ptr()
        stream = torch.cuda.current_stream(device).cuda_stream
        with torch.cuda.device(device):
            C.sgd_step_cuda(lr=float(args.lr), lr_device=lr_ptr, stream=stream, **stats_args, **common)
    # The kernel wrote through raw pointers: tell autograd, as an in-place torch op would, so
    # that a backward through a stale saved param raises instead of using the new values. With
    # a grad scale the kernels also wrote the unscaled grads back.
    # torch.autograd.graph.increment_version without its wrapper, one list at a time (no list of
    # all of them to build).
    torch._C._increment_version(params)
    if has_momentum:
        torch._C._increment_version(momentum_buffers)
    if args.grad_scale is not None:
        torch._C._increment_version(grads)
