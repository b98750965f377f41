"""What a run is: :class:`TrainConfig` and its validation, the device and backend it resolves to,
the rules for what a resumed run may change, and :class:`TrainResult`, what a finished run hands
back.

User mistakes raise :class:`UserError`, whose message is one line that the command line prints
without a traceback.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nm_optim.names import BACKENDS, HYPER_NAMES
from nm_optim.ops import available_backends, default_backend

# The config fields a resumed run may change: how long it runs and how it reports (device and
# backend are how, not what). Everything else decides the trajectory.
RESUMABLE_CHANGES = ("steps", "epochs", "checkpoint_every", "device", "backend")


class UserError(Exception):
    """A mistake in what the user asked for; the message is one line, printed without a
    traceback by the command line."""


class ConfigError(UserError):
    """A bad value of one TrainConfig field; `field` names it, `problem` says what is wrong
    ("must be ..."), so a config read from a checkpoint can name the file and the field
    instead of a command-line option the user never gave."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{_option(field)} {problem}")
        self.field, self.problem = field, problem


def _brief(value: Any) -> str:
    """A value in a one-line message: its repr on one line, at most 60 characters (a value read
    from a checkpoint may be a tensor, whose repr spans lines)."""
    text = " ".join(repr(value).split())
    return text if len(text) <= 60 else text[:57] + "..."


def _option(name: str) -> str:
    """The command-line spelling of a config field: weight_decay -> --weight-decay."""
    return "--" + name.replace("_", "-")


@dataclass
class TrainConfig:
    """What a run trains, on what, and how. `steps` or `epochs` (epochs drop the last partial
    batch, so every step sees `batch_size` examples)."""

    model: str = "mlp"
    data: str = "digits"
    lr: float = 0.1
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 5e-4
    nesterov: bool = False
    batch_size: int = 128
    steps: int | None = None
    epochs: int | None = None
    image_size: int | None = None
    backend: str = "auto"
    device: str = "auto"
    seed: int = 0
    record_every: int = 1
    checkpoint_every: int = 0

    def __post_init__(self) -> None:
        def positive(name: str, value: Any, allow_zero: bool = False) -> None:
            ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
            if not ok:
                raise ConfigError(name, f"must be a {'non-negative' if allow_zero else 'positive'} integer, got {_brief(value)}")

        for name in ("model", "data", "backend", "device"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ConfigError(name, f"must be a non-empty string, got {_brief(getattr(self, name))}")
        for name in ("lr", "momentum", "dampening", "weight_decay"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ConfigError(name, f"must be a finite number >= 0, got {_brief(v)}")
        if not isinstance(self.nesterov, bool):
            raise ConfigError("nesterov", f"must be true or false, got {_brief(self.nesterov)}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError("seed", f"must be an integer, got {_brief(self.seed)}")
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ConfigError("nesterov", "needs --momentum > 0 and --dampening 0")
        positive("batch_size", self.batch_size)
        positive("record_every", self.record_every)
        positive("checkpoint_every", self.checkpoint_every, allow_zero=True)
        if self.steps is not None and self.epochs is not None:
            raise ConfigError("epochs", f"and --steps exclude each other: give --steps or --epochs, not both "
                                        f"(got {_brief(self.epochs)} and {_brief(self.steps)})")
        if self.steps is not None:
            positive("steps", self.steps)
        if self.epochs is not None:
            positive("epochs", self.epochs)
        if self.image_size is not None:
            positive("image_size", self.image_size)

    @property
    def optimizer(self) -> dict[str, Any]:
        """The SGD hyper-parameters, keyed by nm_optim.names.HYPER_NAMES."""
        return {k: getattr(self, k) for k in HYPER_NAMES}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrainResult:
    """A finished (or resumed-and-finished) run."""

    config: TrainConfig
    record: Any  # nm_optim.Record
    model: nn.Module
    optimizer: Any  # nm_optim.SGD
    symmetries: list
    steps: int
    device: str
    backend: str
    losses: list[tuple[int, float]]  # (steps done, mean training loss over the last loop.LOG_EVERY steps)
    final_loss: float | None  # mean training loss over the last (up to LOG_EVERY) steps
    test_accuracy: float | None
    seconds: float
    resumed_from: int | None = None
    out: Path | None = None
    distributed: dict[str, Any] | None = None  # {"mode", "world_size"} of a run on several processes


# -- where a run runs and writes ---------------------------------------------------------------------------


def resolve_device(device: str) -> torch.device:
    """"auto" -> cuda when a GPU is present, else cpu; anything else must exist here."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        d = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise UserError(f"--device {device!r} is not a device (expected auto, cpu, cuda or cuda:N)") from e
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: no CUDA device is available here (use --device cpu)")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif d.type != "cpu":
        raise UserError(f"--device {device}: only cpu and cuda are supported")
    return d


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend nm_optim.SGD will run for `device` ("auto" resolved), or a UserError that
    lists the ones available here."""
    if backend == "auto":
        return default_backend(device)  # the rule nm_optim.SGD applies (nm_optim/ops/registry.py)
    available = available_backends(device.type)
    if backend not in BACKENDS:
        raise UserError(f"--backend {backend!r} is unknown; expected auto or one of {', '.join(BACKENDS)}")
    if backend not in available:
        raise UserError(f"--backend {backend} cannot run on {device.type} here; available: auto, {', '.join(available)}")
    return backend


def check_writable(folder: str | os.PathLike) -> Path:
    """Create `folder` and prove a file can be written there, or raise UserError."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".nm_optim_write_test.", dir=folder)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise UserError(f"cannot write to output folder {folder}: {e.strerror or e}") from e
    return folder


# -- what a resumed run may change -------------------------------------------------------------------------


def apply_resume_overrides(saved: dict[str, Any], overrides: dict[str, Any] | None, where: Path) -> TrainConfig:
    """The checkpointed config `saved` (read from `where`) with `overrides` (the options the user
    gave again) applied: those in RESUMABLE_CHANGES replace the saved ones (more --steps, another
    --device); any other that differs is a UserError naming the option."""
    overrides = overrides or {}
    merged = dict(saved)
    for name, new in overrides.items():
        if name not in merged:
            raise UserError(f"{where}: unknown option {name!r}")
        if new == saved[name]:
            continue
        if name not in RESUMABLE_CHANGES:
            raise UserError(
                f"{_option(name)} {new} differs from the checkpointed run in {where} "
                f"({saved[name]}); a resumed run keeps its settings (only {', '.join(RESUMABLE_CHANGES)} may change)"
            )
        merged[name] = new
    # --steps and --epochs exclude each other: the one given again replaces the saved length
    if overrides.get("steps") is not None:
        merged["epochs"] = None
    elif overrides.get("epochs") is not None:
        merged["steps"] = None
    try:
        return TrainConfig(**merged)
    except TypeError as e:
        raise UserError(f"{where} holds a config this nm_optim does not understand: {e}") from e


def saved_config(saved: Any, where: Path) -> TrainConfig:
    """The config a checkpoint (read from `where`) holds, checked field by field: exactly
    TrainConfig's fields, each valid. A bad one is a UserError naming the file and the field,
    never the command-line option (the user did not give it)."""
    if not isinstance(saved, dict):
        raise UserError(f"checkpoint {where}: config is {_brief(saved)}, expected a dict of the run's settings")
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    missing = [k for k in fields if k not in saved]
    unknown = [k for k in saved if k not in fields]
    if missing:
        raise UserError(f"checkpoint {where}: config has no {', '.join(map(repr, missing))}")
    if unknown:
        raise UserError(f"checkpoint {where}: config has {', '.join(map(repr, unknown))}, unknown to this nm_optim")
    try:
        return TrainConfig(**saved)
    except ConfigError as e:
        raise UserError(f"checkpoint {where}: config.{e.field} {e.problem}") from e


def check_resumable(saved: dict[str, Any], config: TrainConfig, where: Path) -> None:
    """UserError unless `config` is the checkpointed config `saved` (read from `where`) up to
    RESUMABLE_CHANGES."""
    for name, value in config.to_dict().items():
        if name not in RESUMABLE_CHANGES and saved.get(name) != value:
            raise UserError(
                f"{_option(name)} {value} differs from the checkpointed run in {where} ({saved.get(name)}); "
                f"only {', '.join(RESUMABLE_CHANGES)} may change on --resume"
            )
