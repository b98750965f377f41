"""The checkpoint format of `nm-optim train`: one torch.save'd dict, written atomically, that
holds everything a resumed run needs to continue bit-identically.

    format, version      CHECKPOINT_FORMAT, CHECKPOINT_VERSION (a newer version is refused)
    nm_optim             the version that wrote it
    config               TrainConfig.to_dict() of the run
    step                 optimizer steps done; with config.seed it fixes the data position
                         (loop.epoch_order), so no data-loader state is kept
    model, optimizer     their state_dicts
    recorder             the recorder's state_dict: where the record stands. `train` streams the
                         record to OUT/record/ (STREAM_NAME), so this is the stream's length, not
                         the history: a checkpoint stays small and is not rewritten with the whole
                         record; resuming cuts the stream back to that length. (A recorder kept
                         in memory puts its records here instead; both load.)
    rng                  the torch RNG states (dropout): "torch", and "cuda" on a GPU
    rng_ranks            (distributed runs only) every rank's "rng", in rank order: a resume on
                         as many processes restores each its own; on another number, every
                         process takes "rng" (rank 0's), so dropout masks then differ from an
                         uninterrupted run's
    losses               the loss log, [[steps done, mean loss], ...]
    pending_losses       the per-step losses since the last log entry (0-d tensors)

Only tensors and plain values: it loads with torch.load(weights_only=True).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from nm_optim._io import atomic_write
from nm_optim._version import __version__
from nm_optim.app.config import TrainConfig, UserError, apply_resume_overrides
from nm_optim.record import RecordError

CHECKPOINT_FORMAT = "nm_optim.checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"
STREAM_NAME = "record"  # the record stream folder next to the checkpoint (nm_optim.recorder)
# What save_checkpoint writes; a checkpoint without one of these cannot resume a run exactly.
PARTS = ("config", "step", "model", "optimizer", "recorder", "rng", "losses", "pending_losses")


def save_checkpoint(
    path: Path,
    *,
    config: TrainConfig,
    step: int,
    model: nn.Module,
    optimizer: Any,
    device: torch.device,
    losses: list[tuple[int, float]],
    pending_losses: list[Tensor],
    model_state: dict[str, Any] | None = None,
    optimizer_state: dict[str, Any] | None = None,
    rng_ranks: list[dict[str, Any]] | None = None,
) -> None:
    """Write the checkpoint of a run at `step` to `path`, atomically (a crash while writing
    leaves the previous checkpoint). A distributed run passes the whole-tensor `model_state` and
    `optimizer_state` it gathered (app.distributed.gather_full) and every rank's RNG states."""
    state = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "nm_optim": __version__,
        "config": config.to_dict(),
        "step": step,
        "model": model.state_dict() if model_state is None else model_state,
        "optimizer": optimizer.state_dict() if optimizer_state is None else optimizer_state,
        "recorder": optimizer.recorder.state_dict(),
        "rng": _rng_state(device),
        "losses": [list(x) for x in losses],
        "pending_losses": [t.detach().cpu() for t in pending_losses],
    }
    if rng_ranks is not None:
        state["rng_ranks"] = rng_ranks
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`, or raise UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint to resume from: {path} does not exist")
    if path.stat().st_size == 0:
        raise UserError(f"checkpoint {path} is empty (a save that was interrupted?); it cannot be resumed")
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":  # torch.save writes a zip archive
            raise UserError(f"checkpoint {path} is damaged or not a checkpoint (not a torch.save file)")
    try:
        # mmap: reading the config for --resume must not load a VGG-sized checkpoint twice
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch's message is about its file format, not about the run
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"checkpoint {path} is damaged or not a checkpoint ({type(e).__name__}: {first[:120]})") from e
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not an nm_optim checkpoint")
    if state.get("version", 0) > CHECKPOINT_VERSION:
        raise UserError(f"{path} was written by a newer nm_optim (checkpoint version {state['version']}); upgrade nm_optim")
    missing = [k for k in PARTS if k not in state]
    if missing:
        raise UserError(f"checkpoint {path} is incomplete: it has no {', '.join(repr(k) for k in missing)}")
    return state


def restore_checkpoint(
    state: dict[str, Any], path: Path, *, model: nn.Module, optimizer: Any, device: torch.device, backend: str,
    recorder: bool = True, rank: int = 0, world_size: int = 1,
) -> tuple[int, list[tuple[int, float]], list[Tensor]]:
    """Load a checkpoint's `state` (read from `path`) into a freshly built model and optimizer,
    run with `backend` from now on and restore the RNG states. Returns (step, the loss log, the
    pending losses on `device`). A checkpoint that does not fit raises UserError.

    recorder: restore the recorder too, continuing the record stream next to `path` (False on
        the ranks of a distributed run that record nothing: the stream is rank 0's).
    rank, world_size: a distributed process takes its own RNG states when the checkpoint was
        written by as many processes (see "rng_ranks" above)."""
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:3])[:300]
        raise UserError(f"the weights in {path} do not fit this model: {detail}") from e
    _check_momentum_state(state, path)
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"the optimizer state in {path} does not fit this model: {e}") from e
    for group in optimizer.param_groups:  # the backend is how, not what: it may change on resume
        group["backend"] = backend
    try:
        # the stream next to the checkpoint, wherever the run folder was when it was written
        if recorder:
            optimizer.recorder.load_state_dict(state["recorder"], stream=path.parent / STREAM_NAME)
    except RecordError as e:
        raise UserError(f"the record stream of checkpoint {path} cannot be continued: {e}") from e
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"the recorder state in checkpoint {path} is damaged or does not fit this model: "
                        f"{type(e).__name__}: {e}") from e
    losses = [(int(s), float(v)) for s, v in state["losses"]]
    pending = [t.to(device) for t in state["pending_losses"]]
    ranks = state.get("rng_ranks")
    _set_rng_state(ranks[rank] if isinstance(ranks, list) and len(ranks) == world_size else state["rng"], device)
    return int(state["step"]), losses, pending


def _check_momentum_state(state: dict[str, Any], path: Path) -> None:
    """A run with momentum that has stepped has a momentum buffer per param: a checkpoint
    without any would resume with momentum silently reset, a different run."""
    opt = state["optimizer"]
    groups = opt.get("param_groups", []) if isinstance(opt, dict) else []
    momentum = any(float(g.get("momentum", 0)) != 0 for g in groups)
    if momentum and int(state["step"]) > 0 and not opt.get("state"):
        raise UserError(f"checkpoint {path} has no momentum buffers although the run used momentum and "
                        f"took {int(state['step'])} steps: resuming would reset momentum")


def resume_config(out: str | os.PathLike, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """The config of the run checkpointed in `out`, with `overrides` (the options the user gave
    again) applied by config.apply_resume_overrides: only RESUMABLE_CHANGES may differ."""
    path = Path(out) / CHECKPOINT_NAME
    return apply_resume_overrides(load_checkpoint(path)["config"], overrides, path)


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    # a checkpoint from another GPU count (or from the CPU) keeps this machine's CUDA states
    if device.type == "cuda" and "cuda" in state and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
