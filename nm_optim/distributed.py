"""nm_optim.SGD under torch.distributed.

- **DTensor params** (FSDP2's ``fully_shard``, tensor parallel): the op runs on each rank's local
  tensors (param, grad, momentum buffer). The update is element-wise, so stepping the shards is
  stepping the whole tensor; the momentum buffer is created as a DTensor with its param's
  placements (as torch.optim.SGD's is), so state dicts hold DTensors as torch's do.
  Statistics of a tracked param sharded with ``Shard(d)`` placements are those of the **whole**
  tensor, identical on every rank: the 9 sums are additive, so each rank reduces its shard into
  the rows of its shard's global groups ("rows" of a Shard(0) shard: rows [offset, offset +
  local rows); its "cols" and "all" groups: partial sums over its rows), zeros elsewhere, and one
  all-reduce (SUM) per step and device combines them (``TrackTable.reduce_across_ranks``).
  Replicated DTensors are reduced locally: every rank holds the whole tensor.
  Symmetries: torch.fx cannot trace a sharded model, so ``find_symmetries`` runs on the plain
  model before ``fully_shard``; ``fully_shard`` then replaces the Parameter objects (keeping the
  names) and ``nm_optim.SGD(model.parameters(), symmetries=syms)`` matches each member to the
  DTensor param of its name (tracks.py, ``with_symmetries``): a DTensor's shape is the whole
  tensor's, so the members' shapes still fit and their tracks are whole-tensor statistics.
- **DDP**: params, buffers and (all-reduced) grads are identical on every rank before the step
  and the kernels' reductions are deterministic, so statistics and records are identical on
  every rank without any communication.
- **ZeroRedundancyOptimizer**: each rank's optimizer holds only its partition of the params, so
  tracks / symmetries are refused at construction (:func:`check_not_zero_partition`); without
  them nm_optim.SGD works as ZeRO's ``optimizer_class``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from torch import Tensor


def dtensor_type() -> type | None:
    """DTensor, if torch.distributed.tensor has been imported (no DTensor exists otherwise);
    never imports it."""
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None) if mod is not None else None


def has_dtensors(param_groups: Sequence[dict[str, Any]]) -> bool:
    """Whether any param of these groups is a DTensor (checked when the param set changes)."""
    dt = dtensor_type()
    return dt is not None and any(isinstance(p, dt) for g in param_groups for p in g["params"])


def _local(t: Tensor, dt: type) -> Tensor:
    # `_local_tensor` rather than to_local(): the same tensor object every step (to_local() of a
    # Parameter wraps it anew), so the op's per-bucket plan caches keep their key.
    return t._local_tensor if isinstance(t, dt) else t  # type: ignore[attr-defined]


def local_tensors(params: list[Tensor], grads: list[Tensor], bufs: list[Tensor]
                  ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """The local tensors the op steps for DTensor params, grads and buffers; a grad (or buffer)
    must be laid out like its param (the same mesh and placements), else stepping the local
    tensors would not step the same elements."""
    dt = dtensor_type()
    if dt is None:
        return params, grads, bufs
    for i, (p, g) in enumerate(zip(params, grads)):
        pd, gd = isinstance(p, dt), isinstance(g, dt)
        if pd or gd:
            b = bufs[i] if bufs else None
            if not (pd and gd) or g._spec.placements != p._spec.placements or g.device_mesh != p.device_mesh \
                    or (b is not None and (not isinstance(b, dt) or b._spec.placements != p._spec.placements)):
                raise RuntimeError(
                    "nm_optim.SGD: a DTensor parameter's grad and momentum buffer must be DTensors with the "
                    f"parameter's mesh and placements; got param {_layout(p, dt)}, grad {_layout(g, dt)}"
                    + (f", buffer {_layout(b, dt)}" if b is not None else "")
                )
    return ([_local(p, dt) for p in params], [_local(g, dt) for g in grads], [_local(b, dt) for b in bufs])


def _layout(t: Tensor, dt: type) -> str:
    if isinstance(t, dt):
        return f"DTensor{tuple(t._spec.placements)} on {t.device_mesh}"
    return f"a plain {type(t).__name__} of shape {tuple(t.shape)}"


def shard_layout(p: Tensor, name: str) -> tuple[tuple[int, ...], Any] | None:
    """For a tracked DTensor sharded over one mesh dimension: (the global offset of this rank's
    shard along each dim, the process group over which the shards differ); None for a plain
    tensor or a replicated DTensor (its local tensor is the whole tensor). Placements whose
    statistics cannot be assembled from shards raise NotImplementedError, naming the param."""
    dt = dtensor_type()
    if dt is None or not isinstance(p, dt):
        return None
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh, placements = p.device_mesh, tuple(p.placements)
    sharded = [i for i, pl in enumerate(placements) if type(pl) is Shard]
    bad = [pl for pl in placements if type(pl) not in (Shard, Replicate)]
    if bad or len(sharded) > 1:
        raise NotImplementedError(
            f"nm_optim.SGD: track on parameter {name!r}, a DTensor with placements {placements}: statistics of "
            "DTensor params are supported for Shard(d) over one mesh dimension (FSDP2's fully_shard, tensor "
            "parallel) and Replicate; untracked, any placements are stepped"
        )
    if not sharded:
        return None
    _, offset = compute_local_shape_and_global_offset(p.shape, mesh, placements)
    return tuple(offset), mesh.get_group(sharded[0])


def group_ranks(group: Any) -> list[int]:
    """The global ranks of a process group."""
    import torch.distributed as dist

    return dist.get_process_group_ranks(group)


def all_reduce_sum(stats: Tensor, group: Any) -> None:
    """Sum `stats` in place over `group`: one collective. With NCCL it is enqueued on the stream
    (the step's later work and the recorder's copies wait for it on the device, the host does
    not); with gloo (CPU tensors) it returns when it is done."""
    import torch.distributed as dist

    dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)


def check_not_zero_partition(tracked: bool) -> None:
    """Refuse tracks under torch.distributed.optim.ZeroRedundancyOptimizer, which builds one
    optimizer per rank over that rank's partition only: tracks would name other ranks' params
    (and fail on some ranks only), and records would hold each rank's partition under colliding
    names. Detected from the caller's frames, on every rank alike, at construction."""
    if not tracked:
        return
    mod = sys.modules.get("torch.distributed.optim.zero_redundancy_optimizer")
    zero = getattr(mod, "ZeroRedundancyOptimizer", None) if mod is not None else None
    if zero is None:
        return
    frame = sys._getframe(1)
    for _ in range(8):
        if frame is None:
            return
        if frame.f_code.co_name == "_init_local_optimizer" and isinstance(frame.f_locals.get("self"), zero):
            raise NotImplementedError(
                "nm_optim.SGD: track= / symmetries= are not supported under torch.distributed.optim."
                "ZeroRedundancyOptimizer (each rank's optimizer holds only its partition of the params, so "
                "statistics would be per rank, under colliding names). Supported: DDP (the statistics are "
                "identical on every rank, without communication) and FSDP2's fully_shard (whole-tensor "
                "statistics, identical on every rank, one all-reduce per step). ZeroRedundancyOptimizer("
                "optimizer_class=nm_optim.SGD) without tracks works."
            )
        frame = frame.f_back
