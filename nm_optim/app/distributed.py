"""`nm-optim train --distributed ddp|fsdp`: one training run on several processes, launched by
torchrun (``torchrun --nproc-per-node N -m nm_optim train ... --distributed ddp``).

    environment   torchrun's RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT; without them
                  `--distributed` is a UserError (no silent single-process fallback: a run that
                  asked for N processes and got one would be N times slower, and the user would
                  not know). A torchrun launch with WORLD_SIZE > 1 but without `--distributed` is
                  a UserError too: every process would train the whole run and write --out.
    process group gloo on the CPU, NCCL on CUDA (each process on cuda:LOCAL_RANK).
    data          the global batch is --batch-size, as in a 1-process run: loop.epoch_order gives
                  the global batches and rank r takes the r-th contiguous 1/WORLD_SIZE of each
                  (deterministic sharding, like DistributedSampler but over the same order a
                  1-process run uses), so N processes see exactly the 1-process run's batches.
    ddp           torch.nn.parallel.DistributedDataParallel: grads averaged over the processes.
    fsdp          torch.distributed.fsdp.fully_shard on every module that holds params, then on
                  the root: params, grads and momentum buffers are DTensors sharded on dim 0;
                  nm_optim.SGD steps the shards and its statistics are the whole tensors'
                  (identical on every rank: nm_optim/distributed.py).
    writing       rank 0 only: the record, checkpoints, summary, figures, TensorBoard. The other
                  ranks record nothing (their recorder is disabled; the statistics are still
                  computed, FSDP's need every rank's shard) and write nothing into --out.
    ending        a worker that joined the process group ends with end_process: os._exit once
                  its outputs are written, without the interpreter's finalisation (see there why).
    checkpoints   the 1-process format (app.checkpoint): whole tensors, gathered from the shards
                  under FSDP (see gather_full / shard_like). So a checkpoint resumes on any number
                  of processes, in either mode or in none; plus every rank's RNG state, so a
                  resume on the same number of processes continues bit-identically.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
import sys
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
from torch import Tensor, nn

from nm_optim.app.config import UserError, resolve_device

MODES = ("ddp", "fsdp")
# What torchrun sets for every worker (torch.distributed's env:// initialisation reads them).
ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Distributed:
    """This process's place in a distributed run."""

    mode: str
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes the run's outputs."""
        return self.rank == 0

    def describe(self) -> dict[str, Any]:
        return {"mode": self.mode, "world_size": self.world_size}


def from_env(mode: str, environ: Mapping[str, str] | None = None) -> Distributed:
    """The run's layout from torchrun's environment, or a UserError naming --distributed."""
    environ = os.environ if environ is None else environ
    if mode not in MODES:
        raise UserError(f"--distributed {mode!r} is unknown; expected one of {', '.join(MODES)}")
    missing = [k for k in ENV_VARS if k not in environ]
    if missing:
        raise UserError(
            f"--distributed {mode} needs the environment torchrun gives each process ({', '.join(missing)} "
            f"not set): launch with torchrun --nproc-per-node N -m nm_optim train ... --distributed {mode}, "
            "or leave --distributed out for one process"
        )
    try:
        rank, world, local = (int(environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except ValueError as e:
        raise UserError(f"--distributed {mode}: RANK, WORLD_SIZE and LOCAL_RANK must be integers ({e})") from e
    if not (world >= 1 and 0 <= rank < world and local >= 0):
        raise UserError(f"--distributed {mode}: RANK {rank}, WORLD_SIZE {world}, LOCAL_RANK {local} do not fit")
    return Distributed(mode, rank, world, local)


def check_not_launched_by_torchrun(environ: Mapping[str, str] | None = None) -> None:
    """Without --distributed, several processes launched by torchrun would each train the whole
    run and write the same --out: refuse, naming --distributed."""
    environ = os.environ if environ is None else environ
    world = environ.get("WORLD_SIZE", "1")
    if world.isdigit() and int(world) > 1:
        raise UserError(f"this process is one of WORLD_SIZE={world} launched together (torchrun?) but --distributed "
                        f"was not given: add --distributed {' or '.join(MODES)}")


def check_batch_size(batch_size: int, d: Distributed) -> int:
    """The per-process batch: --batch-size is the global batch, split evenly over the processes."""
    if batch_size % d.world_size:
        raise UserError(
            f"--batch-size {batch_size} does not split evenly over the {d.world_size} processes of --distributed "
            f"{d.mode}: it is the global batch, each process takes --batch-size / WORLD_SIZE; give a multiple of "
            f"{d.world_size}"
        )
    return batch_size // d.world_size


def process_device(request: str, d: Distributed) -> torch.device:
    """This process's device: `request` (--device) resolved as in a 1-process run, then on CUDA
    the GPU of this process's LOCAL_RANK (one GPU per process, as NCCL needs)."""
    device = resolve_device(request)
    if device.type != "cuda":
        return device
    if device.index is not None:
        if d.world_size > 1:  # every process would pick the same GPU, which NCCL refuses
            raise UserError(f"--device {request}: under --distributed each process uses cuda:LOCAL_RANK; give "
                            "--device cuda or auto")
        return device
    if d.local_rank >= torch.cuda.device_count():
        raise UserError(f"--distributed {d.mode}: LOCAL_RANK {d.local_rank} has no GPU here "
                        f"({torch.cuda.device_count()} visible); launch fewer processes per node")
    return torch.device("cuda", d.local_rank)


@contextlib.contextmanager
def process_group(d: Distributed, device: torch.device) -> Iterator[Distributed]:
    """The process group for the run (gloo on CPU, NCCL on CUDA), from torchrun's environment.
    A run that ends normally meets the others at a barrier (rank 0 writes the outputs while the
    others wait) before the group is destroyed; one that raises leaves at once (torchrun then
    stops the other processes)."""
    import torch.distributed as dist

    global _joined
    if device.type == "cuda":
        torch.cuda.set_device(device)
    _joined = True
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://", rank=d.rank,
                            world_size=d.world_size, device_id=device if device.type == "cuda" else None)
    ok = False
    try:
        yield d
        ok = True
    finally:
        if ok:
            dist.barrier()
        dist.destroy_process_group()


_joined = False  # whether this process joined a process group (process_group)


def joined() -> bool:
    """Whether this process joined a run's process group: it must then end with end_process."""
    return _joined


def end_process(code: int) -> NoReturn:
    """End this worker process with exit status `code`, skipping the interpreter's finalisation.

    Why: destroy_process_group does not stop gloo's worker threads while something still holds
    the process group, and under FSDP2 something does (the DeviceMesh, kept by DTensor's
    sharding caches). Such a thread drops its last reference to a finished collective a moment
    after the main thread saw it finish; when that collective holds Python tensors, the thread
    takes the GIL to release them, and during finalisation that aborts the process
    ("terminate called without an active exception", SIGABRT) after a run that succeeded:
    pytorch/pytorch#190489. Seen here in ~1 of 30 two-process FSDP runs under load. Everything
    this process writes is closed by now except what buffers hold, which is flushed first."""
    from nm_optim.record.stream import drain_all

    drain_all()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


# -- data, model, symmetries ---------------------------------------------------------------------------


def local_indices(idx: Tensor, d: Distributed) -> Tensor:
    """This rank's share of a global batch: the rank-th of WORLD_SIZE contiguous slices."""
    per = len(idx) // d.world_size
    return idx[d.rank * per : (d.rank + 1) * per]


def wrap(net: nn.Module, d: Distributed, device: torch.device) -> nn.Module:
    """DDP around `net`, or `net` itself sharded with fully_shard (in place: its params become
    DTensors, new Parameter objects under the same names, which nm_optim.SGD matches the
    symmetries' members to)."""
    if d.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (d.world_size,))
    # Every module that holds params directly is its own unit (one all-gather per layer in the
    # forward, as FSDP is meant to run); the root takes whatever is left.
    for module in list(net.modules()):
        if module is not net and any(True for _ in module.parameters(recurse=False)):
            fully_shard(module, mesh=mesh)
    fully_shard(net, mesh=mesh)
    return net


def rebind_symmetries(symmetries: list, names: dict[int, str], net: nn.Module) -> list:
    """The symmetries found on `net` before fully_shard replaced its params, on the params
    it holds now: `names` maps id(old param) -> its name in net.named_parameters(), which
    fully_shard keeps. nm_optim.SGD does this matching itself (by the members' names, through
    the model find_symmetries saw or the groups' param_names), so passing the symmetries found
    before fully_shard straight to it gives the same tracks; kept for callers that want the
    rebound symmetries themselves."""
    params = dict(net.named_parameters())
    out = []
    for sym in symmetries:
        new = copy.copy(sym)
        new.members = tuple(dataclasses.replace(m, param=params[names[id(m.param)]]) for m in sym.members)
        out.append(new)
    return out


def warn_batch_norm(net: nn.Module, d: Distributed) -> None:
    """BatchNorm normalises each process's batch, not the global one: say so, once."""
    if d.is_main and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules()):
        warnings.warn(f"--distributed {d.mode}: BatchNorm normalises each process's batch of --batch-size / "
                      f"{d.world_size} examples, so this run differs from a 1-process run with the same "
                      "--batch-size", stacklevel=2)


def mean_over_ranks(t: Tensor, d: Distributed) -> Tensor:
    """The mean of a scalar over the processes (a copy; each rank's loss is its local batch's
    mean, so this is the global batch's mean loss, up to rounding)."""
    import torch.distributed as dist

    t = t.detach().clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / d.world_size


# -- checkpoints: whole tensors on rank 0, shards again on resume --------------------------------------------
# Not torch.distributed.checkpoint's set_state_dict: for the optimizer it first initialises an
# empty state by calling step() with zero grads and lr 0, a step nm_optim.SGD would record. The
# gathering below gives exactly the 1-process checkpoint, so any world size can resume it.


def gather_full(obj: Any) -> Any:
    """`obj` (a state dict, nested) with every DTensor replaced by its whole tensor on the CPU.
    Collective under FSDP: every rank calls it, in the same order (the state dicts' order)."""
    from nm_optim.distributed import dtensor_type

    dt = dtensor_type()
    if isinstance(obj, dict):
        return {k: gather_full(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [gather_full(v) for v in obj]
    if dt is not None and isinstance(obj, dt):
        return obj.full_tensor().cpu()
    return obj


def _shard(full: Tensor, like: Any, dt: type) -> Any:
    from torch.distributed.tensor import distribute_tensor

    if not isinstance(like, dt) or not isinstance(full, Tensor) or full.shape != like.shape:
        return full
    # every rank holds the whole tensor (read from the checkpoint): each keeps its shard, no traffic
    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def shard_like(state: dict[str, Any], net: nn.Module, optimizer: Any) -> dict[str, Any]:
    """A checkpoint's whole-tensor "model" and "optimizer" states laid out like `net`'s and
    `optimizer`'s params (DTensor shards under FSDP), ready for their load_state_dict."""
    from nm_optim.distributed import dtensor_type

    dt = dtensor_type()
    if dt is None:
        return state
    reference = net.state_dict()
    model = {k: _shard(v, reference.get(k), dt) for k, v in state["model"].items()}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    opt = state["optimizer"]
    per_param = {}
    for k, st in opt.get("state", {}).items():
        p = params[k] if isinstance(k, int) and 0 <= k < len(params) else None
        per_param[k] = {n: _shard(v, p, dt) for n, v in st.items()} if isinstance(st, dict) else st
    return dict(state, model=model, optimizer=dict(opt, state=per_param))


def gather_rng(local: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rank's RNG states (rank order), on every rank (dropout draws per process)."""
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, local)
    return out
