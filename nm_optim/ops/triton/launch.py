"""The "triton" backend: the launches of nm_optim/ops/triton/kernels.py for one bucket, from the
shared GPU plan (nm_optim/ops/plan.py). Three launches at most, whatever the number of tensors:
flat tiles, 2-D statistics tiles, reductions."""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from nm_optim.ops.args import Bucket, StepArgs
from nm_optim.ops.native import address_table, amp_scalar
from nm_optim.ops.plan import stats_geometry, stats_plan
from nm_optim.ops.triton import kernels as K


def sgd_step_triton(bucket: Bucket, args: StepArgs) -> None:
    """One step of dense tensors sharing a device and dtype (see ops/op.py), with the statistics
    of the tracked ones written to `args.stats`."""
    params, grads, momentum_buffers, is_first, numels, owner = bucket
    if not params:
        return
    device = params[0].device
    dtype = params[0].dtype
    has_momentum = args.has_momentum
    with_stats = args.with_stats
    numels = numels if numels is not None else tuple(p.numel() for p in params)
    offsets = tuple(args.stats_offsets) if with_stats else ()
    geom = stats_geometry([p.shape for p in params], offsets) if with_stats else ()
    owner = owner if owner is not None else params[0]
    plan = stats_plan(owner, numels, geom, offsets, device, K.TILE_ROWS, K.BLOCK_COLS, flat_tile=K.FLAT_TILE)
    table = plan.pointers.upload(address_table(params, grads, momentum_buffers, is_first, has_momentum), device)

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
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        if plan.n_flat:
            K.step_kernel[(plan.n_flat,)](
                table, n, plan.flat, *scalars, plan.scratch, out,
                BLOCK=K.FLAT_BLOCK, WITH_STATS=with_stats, num_warps=K.NUM_WARPS["step"], **flags,
            )
        if plan.n_tiles2d:
            K.stats_kernel[(plan.n_tiles2d,)](
                table, n, plan.tiles2d, *scalars, plan.scratch,
                TILE_R=K.TILE_ROWS, SUB_R=K.SUB_ROWS, BLOCK_C=K.BLOCK_COLS, num_warps=K.NUM_WARPS["stats"], **flags,
            )
        if with_stats and plan.n_tasks:
            K.reduce_kernel[(triton.cdiv(plan.n_tasks, K.REDUCE_TASKS),)](
                plan.tasks, plan.n_tasks, plan.scratch, args.stats, inf_ptr,
                TASKS=K.REDUCE_TASKS, CHUNK=K.REDUCE_CHUNK, HAS_INF=args.found_inf is not None,
                num_warps=K.NUM_WARPS["reduce"],
            )
    torch.autograd.graph.increment_version([*params, *momentum_buffers] if has_momentum else list(params))
