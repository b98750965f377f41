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

The file is sealed with a SHA-256 of all its bytes, kept in the zip archive's comment (the end
of the file): torch.load checks no CRC, so without it a flipped byte in a tensor resumes a
different run silently. load_checkpoint verifies the digest before torch.load reads anything,
then checks every field for type, shape, range and consistency (the loss log against the step,
the optimizer's hyper-parameters against the config, the RNG states on a scratch generator);
restore_checkpoint checks that the weights and momentum buffers fit the model (names, shapes,
dtypes) before it changes anything, so a bad checkpoint leaves the run's folder as it was. Every
problem is one UserError naming the file and the field. A version-1 checkpoint (before the
digest) is verified through its zip members' CRC-32s instead.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from nm_optim._io import atomic_write
from nm_optim._version import __version__
from nm_optim.app.config import TrainConfig, UserError, apply_resume_overrides, saved_config
from nm_optim.record import RecordError

CHECKPOINT_FORMAT = "nm_optim.checkpoint"
CHECKPOINT_VERSION = 2  # 2: sealed with a SHA-256 digest (see above)
CHECKPOINT_NAME = "checkpoint.pt"
STREAM_NAME = "record"  # the record stream folder next to the checkpoint (nm_optim.recorder)
# What save_checkpoint writes; a checkpoint without one of these cannot resume a run exactly.
PARTS = ("config", "step", "model", "optimizer", "recorder", "rng", "losses", "pending_losses")
LOG_EVERY = 10  # steps per entry of the loss log (loop.py): len(losses) == step // LOG_EVERY

# The seal: the zip end-of-central-directory record (22 bytes, an empty comment as torch.save
# writes it) gets this comment; the digest is of every byte before the comment.
_EOCD = b"PK\x05\x06"
_EOCD_SIZE = 22
_SEAL = b"nm_optim.checkpoint sha256:"
_SEAL_SIZE = len(_SEAL) + 64
_BLOCK = 1 << 22


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
    write_checkpoint(path, state)


def write_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """torch.save `state` to `path` atomically, sealed with the SHA-256 of the file's bytes."""

    def write(f) -> None:
        sealed = _Sealing(f)
        torch.save(state, sealed)
        sealed.seal()

    atomic_write(path, write)


class _Sealing:
    """The file torch.save writes to: bytes pass through and are hashed as they come, all but
    the last 22, the end-of-central-directory record, whose comment length `seal` sets before
    hashing it and appending the comment (one pass: a VGG-sized checkpoint is not read back)."""

    def __init__(self, f) -> None:
        self.f, self.hash, self.tail = f, hashlib.sha256(), b""

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        n = len(view)
        if n >= _EOCD_SIZE:  # no copy of a tensor's bytes: pass them through as they are
            self._out(self.tail)
            self._out(view[:-_EOCD_SIZE])
            self.tail = bytes(view[-_EOCD_SIZE:])
        else:
            joined = self.tail + bytes(view)
            self._out(joined[:-_EOCD_SIZE])
            self.tail = joined[-_EOCD_SIZE:]
        return n

    def _out(self, data) -> None:
        if len(data):
            self.f.write(data)
            self.hash.update(data)

    def flush(self) -> None:
        self.f.flush()

    def seal(self) -> None:
        if len(self.tail) != _EOCD_SIZE or not self.tail.startswith(_EOCD) or self.tail[20:] != b"\0\0":
            raise RuntimeError("torch.save wrote a zip archive that does not end with an empty-comment "
                               "end-of-central-directory record; nm_optim cannot seal it")
        eocd = self.tail[:20] + struct.pack("<H", _SEAL_SIZE)
        self._out(eocd)
        self.f.write(_SEAL + self.hash.hexdigest().encode("ascii"))


def verify_checksum(path: Path) -> bool:
    """Check the seal of the checkpoint at `path`: True when it is intact, False when the file
    has none (a version-1 checkpoint: its zip members' CRC-32s are checked instead); a mismatch
    raises UserError naming the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(max(0, size - _EOCD_SIZE - _SEAL_SIZE))
        tail = f.read()
        sealed = (len(tail) == _EOCD_SIZE + _SEAL_SIZE and tail.startswith(_EOCD)
                  and tail[20:22] == struct.pack("<H", _SEAL_SIZE) and tail[_EOCD_SIZE:].startswith(_SEAL))
        if not sealed:
            f.seek(max(0, size - (1 << 16)))
            if _SEAL in f.read():  # the seal is there but its record is not: damaged
                raise UserError(f"checkpoint {path} is damaged: its checksum record is malformed; it cannot be resumed")
            _verify_zip_crcs(path)
            return False
        digest = hashlib.sha256()
        f.seek(0)
        left = size - _SEAL_SIZE  # every byte before the comment
        while left > 0:
            block = f.read(min(_BLOCK, left))
            if not block:
                break
            digest.update(block)
            left -= len(block)
    if digest.hexdigest().encode("ascii") != tail[_EOCD_SIZE + len(_SEAL):]:
        raise UserError(f"checkpoint {path} is damaged: its bytes do not match the SHA-256 it was written with; "
                        f"it cannot be resumed")
    return True


def _verify_zip_crcs(path: Path) -> None:
    """An unsealed checkpoint: every zip member's CRC-32 (torch.load checks none)."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError, EOFError) as e:
        raise UserError(f"checkpoint {path} is damaged or not a checkpoint (not a readable zip archive: {e})") from e
    if bad is not None:
        raise UserError(f"checkpoint {path} is damaged: its member {bad} fails its CRC-32; it cannot be resumed")


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`, verify its checksum and check its
    fields (see the module docstring), or raise UserError naming the file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint to resume from: {path} does not exist")
    if path.stat().st_size == 0:
        raise UserError(f"checkpoint {path} is empty (a save that was interrupted?); it cannot be resumed")
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":  # torch.save writes a zip archive
            raise UserError(f"checkpoint {path} is damaged or not a checkpoint (not a torch.save file)")
    sealed = verify_checksum(path)
    try:
        # mmap: reading the config for --resume must not load a VGG-sized checkpoint twice
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch's message is about its file format, not about the run
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"checkpoint {path} is damaged or not a checkpoint ({type(e).__name__}: {first[:120]})") from e
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not an nm_optim checkpoint")
    version = state.get("version")
    if not _is_int(version) or version < 1:
        raise UserError(f"checkpoint {path}: version is {version!r}, expected an integer >= 1")
    if version > CHECKPOINT_VERSION:
        raise UserError(f"{path} was written by a newer nm_optim (checkpoint version {version}); upgrade nm_optim")
    if version >= 2 and not sealed:
        raise UserError(f"checkpoint {path} is damaged: it has lost the checksum every version-{version} "
                        f"checkpoint is written with; it cannot be resumed")
    missing = [k for k in PARTS if k not in state]
    if missing:
        raise UserError(f"checkpoint {path} is incomplete: it has no {', '.join(repr(k) for k in missing)}")
    _check_fields(state, path)
    return state


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _show(x: Any) -> str:
    """A value in an error message: a tensor by its shape and dtype, anything else by a short repr."""
    if isinstance(x, Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    text = " ".join(repr(x).split())  # one line: a tensor's repr inside a dict spans several
    return text if len(text) <= 60 else text[:57] + "..."


def _check_fields(state: dict[str, Any], path: Path) -> None:
    """Every field of a checkpoint, alone and against the others; what needs the model is
    checked by restore_checkpoint (_check_fits)."""

    def bad(field: str, what: str) -> UserError:
        return UserError(f"checkpoint {path}: {field} {what}")

    if not isinstance(state.get("nm_optim"), str):
        raise bad("nm_optim", f"is {_show(state.get('nm_optim'))}, expected the version string that wrote it")
    config = saved_config(state["config"], path)
    step = state["step"]
    if not _is_int(step) or step < 0:
        raise bad("step", f"is {_show(step)}, expected an integer >= 0")

    model = state["model"]
    if not isinstance(model, dict) or not model:
        raise bad("model", f"is {_show(model)}, expected a state_dict of named tensors")
    for name, t in model.items():
        if not isinstance(name, str) or not isinstance(t, Tensor):
            raise bad(f"model[{name!r}]", f"is {_show(t)}, expected a tensor")

    _check_optimizer_fields(state["optimizer"], config, bad)

    rec = state["recorder"]
    if not isinstance(rec, dict):
        raise bad("recorder", f"is {_show(rec)}, expected the recorder's state_dict")
    if "step" in rec and rec["step"] != step:
        raise bad("recorder.step", f"is {_show(rec['step'])} but the checkpoint is at step {step}")

    _check_rng(state["rng"], "rng", bad)
    if "rng_ranks" in state:
        ranks = state["rng_ranks"]
        if not isinstance(ranks, list) or not ranks:
            raise bad("rng_ranks", f"is {_show(ranks)}, expected a list of every rank's RNG states")
        for i, r in enumerate(ranks):
            _check_rng(r, f"rng_ranks[{i}]", bad)

    losses = state["losses"]
    if not isinstance(losses, list) or len(losses) != step // LOG_EVERY:
        n = len(losses) if isinstance(losses, list) else None
        raise bad("losses", f"is {_show(losses) if n is None else f'a list of {n} entries'}, expected a list of "
                            f"{step // LOG_EVERY} [step, mean loss] entries at step {step} (one per {LOG_EVERY} steps)")
    for i, entry in enumerate(losses):
        ok = (isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[0] == LOG_EVERY * (i + 1)
              and _is_int(entry[0]) and _is_number(entry[1]) and math.isfinite(entry[1]))
        if not ok:
            raise bad(f"losses[{i}]", f"is {_show(entry)}, expected [{LOG_EVERY * (i + 1)}, a finite mean loss]")

    pending = state["pending_losses"]
    want = step - LOG_EVERY * (step // LOG_EVERY)
    if not isinstance(pending, list) or len(pending) != want:
        raise bad("pending_losses", f"is {_show(pending) if not isinstance(pending, list) else f'a list of {len(pending)}'}, "
                                    f"expected a list of the {want} losses since the last log entry")
    for i, t in enumerate(pending):
        if not isinstance(t, Tensor) or t.dim() != 0 or not t.is_floating_point():
            raise bad(f"pending_losses[{i}]", f"is {_show(t)}, expected a 0-d floating-point tensor")


def _check_optimizer_fields(opt: Any, config: TrainConfig, bad) -> None:
    """The optimizer's state_dict: its layout, and hyper-parameters equal to the config's (they
    are what the run was built with: another lr here would resume a different run)."""
    if not isinstance(opt, dict) or not isinstance(opt.get("state"), dict) or not isinstance(opt.get("param_groups"), list):
        raise bad("optimizer", f"is {_show(opt)}, expected a state_dict with 'state' and 'param_groups'")
    indices: set[int] = set()
    for i, group in enumerate(opt["param_groups"]):
        where = f"optimizer.param_groups[{i}]"
        if not isinstance(group, dict) or not isinstance(group.get("params"), list) \
                or not all(_is_int(k) for k in group["params"]):
            raise bad(where, f"is {_show(group)}, expected a dict with 'params', a list of param indices")
        indices.update(group["params"])
        for name, expected in config.optimizer.items():
            value = group.get(name)
            if isinstance(expected, bool):
                ok = value is expected
            else:
                ok = _is_number(value) and float(value) == float(expected)
            if not ok:
                raise bad(f"{where}.{name}", f"is {_show(value)} but the run's config has {name} {expected!r}")
    for key, st in opt["state"].items():
        where = f"optimizer.state[{key!r}]"
        if not _is_int(key) or key not in indices:
            raise bad("optimizer.state", f"has an entry for {key!r}, which is no param of its param_groups")
        if not isinstance(st, dict):
            raise bad(where, f"is {_show(st)}, expected a dict")
        buf = st.get("momentum_buffer")
        if buf is not None and (not isinstance(buf, Tensor) or not buf.is_floating_point()):
            raise bad(f"{where}.momentum_buffer", f"is {_show(buf)}, expected a floating-point tensor")


def _check_rng(rng: Any, field: str, bad) -> None:
    """RNG states as _rng_state writes them; the CPU one is tried on a scratch generator, so a
    malformed one fails here, before the run's folder is touched, not in torch.set_rng_state."""
    if not isinstance(rng, dict) or not isinstance(rng.get("torch"), Tensor):
        raise bad(field, f"is {_show(rng)}, expected {{'torch': the CPU generator's state (a uint8 tensor)}}")
    cpu = rng["torch"]
    if cpu.dtype != torch.uint8 or cpu.shape != torch.get_rng_state().shape:
        raise bad(f"{field}['torch']", f"is {_show(cpu)}, expected a torch.uint8 tensor of shape "
                                       f"{tuple(torch.get_rng_state().shape)}")
    try:
        torch.Generator().set_state(cpu.clone())
    except (RuntimeError, ValueError, TypeError) as e:
        raise bad(f"{field}['torch']", f"is not a valid CPU generator state ({str(e).strip().splitlines()[0][:100]})") from e
    if "cuda" in rng:
        cuda = rng["cuda"]
        if not isinstance(cuda, (list, tuple)) or not all(isinstance(t, Tensor) and t.dtype == torch.uint8 and t.dim() == 1
                                                          for t in cuda):
            raise bad(f"{field}['cuda']", f"is {_show(cuda)}, expected a list of uint8 tensors, one per GPU")


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
    _check_fits(state, path, model, optimizer)  # before anything is loaded or the stream is cut
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


def _check_fits(state: dict[str, Any], path: Path, model: nn.Module, optimizer: Any) -> None:
    """The weights and the momentum buffers have the model's names, shapes and dtypes
    (load_state_dict would cast another dtype silently, and a buffer of another shape would
    fail only in the first step, after the record stream was cut back)."""
    own = model.state_dict()
    saved = state["model"]
    missing, unexpected = [k for k in own if k not in saved], [k for k in saved if k not in own]
    if missing or unexpected:
        detail = "; ".join(x for x in (f"model has no {', '.join(map(repr, missing[:3]))}" if missing else "",
                                       f"model has {', '.join(map(repr, unexpected[:3]))}, which this model has not"
                                       if unexpected else "") if x)
        raise UserError(f"the weights in {path} do not fit this model: {detail}")
    for name, t in own.items():
        s = saved[name]
        if s.shape != t.shape or s.dtype != t.dtype:
            raise UserError(f"the weights in {path} do not fit this model: model[{name!r}] is {_show(s)}, "
                            f"the model's is {_show(t)}")
    groups = state["optimizer"]["param_groups"]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    indices = [k for g in groups for k in g["params"]]
    if len(indices) != len(set(indices)):  # two params would share one momentum buffer
        raise UserError(f"the optimizer state in {path} does not fit this model: optimizer.param_groups lists a "
                        f"param index twice")
    if len(groups) != len(optimizer.param_groups) or len(indices) != len(params):
        raise UserError(f"the optimizer state in {path} does not fit this model: optimizer.param_groups holds "
                        f"{len(indices)} params in {len(groups)} groups, the model's optimizer {len(params)} in "
                        f"{len(optimizer.param_groups)}")
    for i, (saved_group, group) in enumerate(zip(groups, optimizer.param_groups)):
        # what the config does not set (maximize, foreach, the param names) must be this
        # optimizer's too: load_state_dict would take the checkpoint's silently
        for name, value in group.items():
            if name in ("params", "backend"):  # the backend is how, not what (see below)
                continue
            if name not in saved_group or not _same(saved_group[name], value):
                raise UserError(f"the optimizer state in {path} does not fit this model: optimizer.param_groups[{i}]."
                                f"{name} is {_show(saved_group.get(name, '(absent)'))}, this run's is {_show(value)}")
    for key, p in zip(indices, params):
        buf = state["optimizer"]["state"].get(key, {}).get("momentum_buffer")
        if buf is not None and (buf.shape != p.shape or buf.dtype != p.dtype):
            raise UserError(f"the optimizer state in {path} does not fit this model: "
                            f"optimizer.state[{key}].momentum_buffer is {_show(buf)}, its param is {_show(p.detach())}")


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and bool(torch.equal(a.cpu(), b.cpu()))
    return type(a) is type(b) and a == b if isinstance(a, bool) or isinstance(b, bool) else a == b


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
