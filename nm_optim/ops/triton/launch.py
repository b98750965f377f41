"""The "triton" backend: the launches of nm_optim/ops/triton/kernels.py for one bucket, from the
shared GPU plan (nm_optim/ops/plan.py). Sixteen launches at most, whatever the number of
tensors: plain and tracked flat tiles, 2-D statistics tiles with and without column partials
(tracked ones for all 9 sums and for the 6 products only, each in an aligned and an unaligned
run), two levels of reductions."""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from nm_optim.ops import plan as P
from nm_optim.ops.args import Bucket, StepArgs
from nm_optim.ops.native import address_table, amp_scalar, stepped_in_levels
from nm_optim.ops.plan import stats_layout, stats_plan
from nm_optim.ops.triton import kernels as K


def sgd_step_triton(bucket: Bucket, args: StepArgs) -> None:
    """One step of dense tensors sharing a device and dtype (see ops/op.py), with the statistics
    of the tracked ones written to `args.stats`."""
    params, grads, momentum_buffers, is_first, numels, owner, layout = bucket
    if not params:
        return
    device = params[0].device
    dtype = params[0].dtype
    has_momentum = args.has_momentum
    with_stats = args.with_stats
    numels = numels if numels is not None else tuple(p.numel() for p in params)
    owner = owner if owner is not None else params[0]
    tiling = dict(flat_tile=K.FLAT_TILE, reduce_chunk=P.REDUCE_CHUNK, align=K.VEC[dtype])
    if with_stats:
        # the bucket's layout, unless it is the CPU kernel's (Triton's interpreter on CPU tensors)
        # or was found without the sums masks
        if layout is None or layout.cpu or not layout.has_sums(args.stats_sums, args.stats_blocks):
            layout = stats_layout(owner, params, numels, args.stats_offsets, device, cpu=False, sums=args.stats_sums,
                                  blocks=args.stats_blocks)
        plan = layout.plan(device, K.TILE_ROWS, K.BLOCK_COLS, **tiling)
    else:
        plan = stats_plan(owner, numels, (), (), device, K.TILE_ROWS, K.BLOCK_COLS, **tiling)
    ptrs = address_table(params, grads, momentum_buffers, is_first, has_momentum)
    if stepped_in_levels(sgd_step_triton, bucket, args, ptrs, numels, owner):
        return
    table = plan.pointers.upload(ptrs, device)
    # The vector (ALIGNED) variants need every param, grad and buffer on 16 bytes (torch's
    # allocations are; a view at an odd offset is not): else every tile runs the plain variant.
    addresses_aligned = not any(a & 15 for a in ptrs[: 3 * len(params)])

    dummy = plan.scratch  # any device tensor, for pointer arguments a variant does not read
    lr_ptr = dummy
    if args.lr_tensor is not None:
        lr_ptr = args.lr_tensor.detach().to(device=device, dtype=torch.float32, non_blocking=True).reshape(())
    scale_ptr = dummy if args.grad_scale is None else amp_scalar(args.grad_scale, device, "grad_scale")
    inf_ptr = dummy if args.found_inf is None else amp_scalar(args.found_inf, device, "found_inf")
    compute = tl.float64 if dtype == torch.float64 else tl.float32
    scalars = (
        float(args.lr), lr_ptr, float(args.weight_decay), float(args.momentum), 1.0 - float(args.dampening),
        -1.0 if args.maximize else 1.0, scale_ptr, inf_ptr,
    )
    n = len(params)
    flags = dict(
        BITS=K.BITS[dtype], DT=K.FLOAT[dtype], CT=compute,
        HAS_LR_PTR=args.lr_tensor is not None, HAS_SCALE=args.grad_scale is not None,
        HAS_INF=args.found_inf is not None, HAS_WD=args.weight_decay != 0, HAS_MOM=has_momentum,
        NESTEROV=bool(args.nesterov),
    )
    out = args.stats if with_stats else dummy
    inf = args.found_inf is not None
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        # Flat tiles: the plain ones (untracked tensors) without statistics, then the tracked
        # ones (all 9 sums, then the 6 products only); each kind in runs of tiles with aligned
        # bounds and the others (plan.flat_groups).
        for first, count, tracked, products, aligned in plan.flat_groups:
            K.step_kernel[(count,)](
                table, n, plan.flat[5 * first :], *scalars, plan.scratch, out,
                BLOCK=K.flat_block(tracked and with_stats, dtype == torch.float64), VEC=K.VEC[dtype],
                WITH_STATS=tracked and with_stats, PRODUCTS=products,
                ALIGNED=aligned and addresses_aligned, num_warps=K.NUM_WARPS["step"], **flags,
            )
        # 2-D tiles: those with column partials (COLS), then the others; each for all 9 sums,
        # then for the 6 products only (PRODUCTS: fewer accumulators) (plan.tile_groups).
        for first, count, cols, products, aligned in plan.tile_groups:
            aligned = aligned and addresses_aligned
            K.stats_kernel[(count,)](
                table, n, plan.tiles2d[8 * first :], *scalars, plan.scratch,
                TILE_R=K.TILE_ROWS, SUB_R=K.sub_rows(cols, aligned, dtype == torch.float64),
                BLOCK_C=K.BLOCK_COLS, VEC=K.VEC[dtype], COLS=cols, PRODUCTS=products, ALIGNED=aligned,
                num_warps=K.NUM_WARPS["stats"], **flags,
            )
        if with_stats:
            # Two levels: chunks of long groups into scratch, then every group into the stats.
            for first, count, dst in ((0, plan.n_pre_tasks, plan.scratch),
                                      (plan.n_pre_tasks, plan.n_tasks - plan.n_pre_tasks, args.stats)):
                if count:
                    K.reduce_kernel[(triton.cdiv(count, K.REDUCE_TASKS),)](
                        plan.tasks[P.TASK_FIELDS * first :], count, plan.scratch, dst, inf_ptr,
                        TASKS=K.REDUCE_TASKS, CHUNK=K.REDUCE_CHUNK, HAS_INF=inf,
                        num_warps=K.NUM_WARPS["reduce"],
                    )
    written = [*params, *momentum_buffers] if has_momentum else list(params)
    if args.grad_scale is not None:  # the kernels wrote the unscaled grads back
        written += grads
    torch.autograd.graph.increment_version(written)
