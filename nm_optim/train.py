"""The training loop behind `nm-optim demo|train`: deterministic, checkpointed, resumable.

A run is a :class:`TrainConfig` (model, data, optimizer hyper-parameters, steps, seed) and an
output folder. :func:`train` builds the model from the zoo (`nm_optim.models`), finds its
symmetries (`nm_optim.find_symmetries`), trains it with `nm_optim.SGD` tracking them, and writes

    DIR/record.npz       the recorded statistics (Record.save, atomic), at the end of the run
    DIR/checkpoint.pt    the latest checkpoint (atomic), when checkpoint_every > 0; it holds the
                         record so far (the recorder's state_dict), so it is not also written
                         as record.npz: the record grows by 72 bytes per group and step
    DIR/summary.json     what ran and how well each symmetry's theory matched (atomic)
    DIR/<kind>.png       the theory-vs-measurement figure of every symmetry kind found

Determinism: the weights are initialised from `seed`; epoch e visits the training set in the
order of ``randperm(N)`` drawn from a generator seeded with (seed, e), so the data position is
just the global step; a checkpoint holds the model, the optimizer state, the recorder state, the
torch RNG states (dropout) and that step. Resuming from it continues bit-identically — the
parameters and the record — on the same device, backend and thread count (on CUDA, cuDNN is
put in deterministic mode for that).

User mistakes (a missing data folder, an unknown model, an unwritable output folder, a
checkpoint that does not belong to this run) raise :class:`UserError` with one line to print.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nm_optim._io import atomic_write

CHECKPOINT_FORMAT = "nm_optim.checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"
RECORD_NAME = "record.npz"
SUMMARY_NAME = "summary.json"
LOG_EVERY = 10  # steps per entry of the loss log (and per progress-bar update)
OPTIMIZER_KEYS = ("lr", "momentum", "dampening", "weight_decay", "nesterov")
# The config fields a resumed run may change: how long it runs and how it reports. Everything
# else decides the trajectory.
RESUMABLE_CHANGES = ("steps", "epochs", "checkpoint_every", "device", "backend")


class UserError(Exception):
    """A mistake in what the user asked for; the message is one line, printed without a
    traceback by the command line."""


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
                raise UserError(f"--{name.replace('_', '-')} must be a {'non-negative' if allow_zero else 'positive'} integer, got {value!r}")

        for name in ("lr", "momentum", "dampening", "weight_decay"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise UserError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {v!r}")
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise UserError("--nesterov needs --momentum > 0 and --dampening 0")
        positive("batch_size", self.batch_size)
        positive("record_every", self.record_every)
        positive("checkpoint_every", self.checkpoint_every, allow_zero=True)
        if self.steps is not None and self.epochs is not None:
            raise UserError("give --steps or --epochs, not both")
        if self.steps is not None:
            positive("steps", self.steps)
        if self.epochs is not None:
            positive("epochs", self.epochs)
        if self.image_size is not None:
            positive("image_size", self.image_size)

    @property
    def optimizer(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in OPTIMIZER_KEYS}

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
    losses: list[tuple[int, float]]  # (steps done, mean training loss over the last LOG_EVERY steps)
    final_loss: float | None  # mean training loss over the last (up to LOG_EVERY) steps
    test_accuracy: float | None
    seconds: float
    resumed_from: int | None = None
    out: Path | None = None


# -- small helpers ----------------------------------------------------------------------------------


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
    import nm_optim
    from nm_optim._extension import BACKENDS, default_backend

    if backend == "auto":
        return default_backend(device)
    available = nm_optim.available_backends(device.type)
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


def atomic_write_text(path: Path, text: str) -> Path:
    """Write `text` to `path` atomically (nm_optim._io.atomic_write)."""
    return atomic_write(path, lambda f: f.write(text), binary=False)


def write_json(path: Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(_jsonable(obj), indent=2, allow_nan=False) + "\n")


def _jsonable(x: Any) -> Any:
    """NaN / inf (a diverged run, a symmetry with no data) become null: JSON has neither."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, Path):
        return str(x)
    return x


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by :func:`train` (tensors and plain values only)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint to resume from: {path} does not exist")
    try:
        # mmap: reading the config for --resume must not load a VGG-sized checkpoint twice
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise UserError(f"cannot read checkpoint {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not an nm_optim checkpoint")
    if state.get("version", 0) > CHECKPOINT_VERSION:
        raise UserError(f"{path} was written by a newer nm_optim (checkpoint version {state['version']}); upgrade nm_optim")
    return state


def epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    """The order epoch `epoch` visits n examples: a function of (seed, epoch) only, so a
    resumed run needs no generator state, just the step."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63))
    return torch.randperm(n, generator=gen)


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _progress(total: int, initial: int, desc: str, enabled: bool):
    """A tqdm bar on stderr when tqdm is installed and wanted; otherwise None."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc=desc, unit="step", file=sys.stderr, leave=False, dynamic_ncols=True)


# -- building a run -------------------------------------------------------------------------------------


def load_data(config: TrainConfig):
    from nm_optim import data as data_mod

    try:
        return data_mod.load(config.data, image_size=config.image_size)
    except data_mod.DataError as e:
        raise UserError(str(e)) from e


def check_model_name(name: str) -> None:
    from nm_optim import models

    if name not in models.MODELS:
        raise UserError(f"unknown model {name!r}; expected one of: {', '.join(models.MODELS)}")


def build_model(config: TrainConfig, shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    from nm_optim import models

    check_model_name(config.model)
    c, h, w = shape
    if h != w:
        raise UserError(f"the model zoo expects square images, the data has {h}x{w}")
    torch.manual_seed(config.seed)
    try:
        return models.get_model(config.model, num_classes=num_classes, in_channels=c, image_size=h)
    except ValueError as e:  # e.g. images too small for the model's poolings
        raise UserError(f"--model {config.model} on {config.data}: {e}") from e


def find_symmetries(model: nn.Module, example: Tensor) -> list:
    import nm_optim

    finder = getattr(nm_optim, "find_symmetries", None)
    if finder is None:
        raise UserError("symmetry detection (nm_optim.find_symmetries) is not available in this build")
    return list(finder(model, example))


# -- the loop ------------------------------------------------------------------------------------------


def train(
    config: TrainConfig,
    out: str | os.PathLike | None,
    *,
    resume: bool = False,
    progress: bool = True,
    desc: str | None = None,
    data: Any = None,
    model_fn: Callable[[TrainConfig, tuple[int, int, int], int], nn.Module] | None = None,
    symmetries_fn: Callable[[nn.Module, Tensor], list] | None = None,
    on_step: Callable[[int], None] | None = None,
    track: Any = None,
    write_outputs: bool = True,
) -> TrainResult:
    """Train `config` and write its outputs to `out` (see the module docstring).

    resume: continue from `out/checkpoint.pt`. `config` must be the checkpointed run's, up to
        the fields in RESUMABLE_CHANGES (e.g. more steps): see :func:`resume_config`.
    data: a preloaded nm_optim.data.Split (else `config.data` is read).
    model_fn / symmetries_fn: replace the zoo and the symmetry detector (tests, custom models).
    on_step(step): called after every optimizer step with the number of steps done (a test
        raises from it to simulate a crash).
    track: more statistics to record besides the symmetries' (nm_optim.SGD's `track`).
    write_outputs: write record, summary and figures at the end (checkpoints are written
        whenever checkpoint_every > 0).
    """
    import nm_optim

    started = time.perf_counter()
    out_dir = check_writable(out) if out is not None else None
    ckpt_state = None
    if resume:
        if out_dir is None:
            raise UserError("--resume needs the output folder of the run to continue (--out DIR)")
        ckpt_state = load_checkpoint(out_dir / CHECKPOINT_NAME)
        _check_resumable(ckpt_state["config"], config, out_dir / CHECKPOINT_NAME)

    device = resolve_device(config.device)
    backend = resolve_backend(config.backend, device)
    if device.type == "cuda":
        # Bit-identical resume needs deterministic convolution algorithms.
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False

    if model_fn is None:
        check_model_name(config.model)  # before reading a data set that may take minutes
    split = data if data is not None else load_data(config)
    train_set = split.train
    n = len(train_set)
    if config.batch_size > n:
        raise UserError(f"--batch-size {config.batch_size} is larger than the training set ({n} examples)")
    per_epoch = n // config.batch_size
    total = config.steps if config.steps is not None else (config.epochs or 1) * per_epoch

    model = (model_fn or build_model)(config, train_set.shape, train_set.num_classes).to(device)
    model.train()
    example = train_set.batch(torch.arange(min(2, n)))[0].to(device)
    symmetries = (symmetries_fn or find_symmetries)(model, example)
    opt = nm_optim.SGD(
        model.named_parameters(),
        lr=config.lr,
        momentum=config.momentum,
        dampening=config.dampening,
        weight_decay=config.weight_decay,
        nesterov=config.nesterov,
        backend=config.backend,
        track=track,
        symmetries=symmetries,
        record_every=config.record_every,
    )

    step = 0
    losses: list[tuple[int, float]] = []
    pending: list[Tensor] = []
    if ckpt_state is not None:
        step = int(ckpt_state["step"])
        model.load_state_dict(ckpt_state["model"])
        opt.load_state_dict(ckpt_state["optimizer"])
        for group in opt.param_groups:  # the backend is how, not what: it may change on resume
            group["backend"] = config.backend
        try:
            opt.recorder.load_state_dict(ckpt_state["recorder"])
        except ValueError as e:
            raise UserError(f"checkpoint {out_dir / CHECKPOINT_NAME} does not fit this model: {e}") from e
        losses = [(int(s), float(v)) for s, v in ckpt_state["losses"]]
        pending = [t.to(device) for t in ckpt_state["pending_losses"]]
        _set_rng_state(ckpt_state["rng"], device)
        if step > total:
            raise UserError(f"the checkpoint is at step {step}, past the {total} steps asked for (give more --steps)")
    else:
        torch.manual_seed(config.seed)  # whatever building the model and its symmetries drew
    resumed_from = step if ckpt_state is not None else None

    def checkpoint() -> None:
        assert out_dir is not None
        _save_checkpoint(
            out_dir / CHECKPOINT_NAME,
            {
                "format": CHECKPOINT_FORMAT,
                "version": CHECKPOINT_VERSION,
                "nm_optim": nm_optim.__version__,
                "config": config.to_dict(),
                "step": step,
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "recorder": opt.recorder.state_dict(),
                "rng": _rng_state(device),
                "losses": [list(x) for x in losses],
                "pending_losses": [t.detach().cpu() for t in pending],
            },
        )

    bar = _progress(total, step, desc or f"{config.model} on {config.data}", progress)
    order, order_epoch = None, -1
    try:
        while step < total:
            epoch, pos = divmod(step, per_epoch)
            if epoch != order_epoch:
                order, order_epoch = epoch_order(n, config.seed, epoch), epoch
            idx = order[pos * config.batch_size : (pos + 1) * config.batch_size]
            x, y = train_set.batch(idx)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            step += 1
            pending.append(loss.detach())
            # The log holds whole intervals only (step % LOG_EVERY == 0): a run stopped at any
            # step and resumed logs exactly what an uninterrupted run logs.
            if step % LOG_EVERY == 0:
                value = torch.stack(pending).mean().item()
                pending.clear()
                losses.append((step, value))
                if bar is not None:
                    bar.set_postfix(loss=f"{value:.4f}", refresh=False)
                    bar.update(step - bar.n)
                if not math.isfinite(value):
                    raise UserError(
                        f"training diverged at step {step} (loss {value}); lower --lr or --momentum"
                    )
            if bar is not None and step == total:
                bar.update(step - bar.n)
            if out_dir is not None and config.checkpoint_every and (step % config.checkpoint_every == 0 or step == total):
                checkpoint()
            if on_step is not None:
                on_step(step)
    finally:
        if bar is not None:
            bar.close()

    # the mean loss of the last steps: those not yet in the log, else the last log entry
    final_loss = torch.stack(pending).mean().item() if pending else (losses[-1][1] if losses else None)
    accuracy = evaluate(model, split.test, device, config.batch_size) if split.test is not None else None
    record = _finish_record(opt, config, losses, accuracy, step)
    result = TrainResult(
        config=config, record=record, model=model, optimizer=opt, symmetries=symmetries, steps=step,
        device=str(device), backend=backend, losses=losses, final_loss=final_loss, test_accuracy=accuracy,
        seconds=time.perf_counter() - started, resumed_from=resumed_from, out=out_dir,
    )
    if write_outputs and out_dir is not None:
        record.save(out_dir / RECORD_NAME)
        write_run_outputs(result, out_dir)
    return result


def _finish_record(opt, config: TrainConfig, losses, accuracy, step: int):
    record = opt.recorder.snapshot()
    record.meta["training"] = {
        "config": config.to_dict(),
        "steps_done": step,
        "loss": [list(x) for x in losses],
        "test_accuracy": accuracy,
    }
    return record


def resume_config(out: str | os.PathLike, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """The config of the run checkpointed in `out`, with `overrides` (the options the user gave
    again) applied: those in RESUMABLE_CHANGES replace the saved ones (more --steps, another
    --device); any other that differs is a UserError naming the option."""
    path = Path(out) / CHECKPOINT_NAME
    saved = load_checkpoint(path)["config"]
    merged = dict(saved)
    for name, new in (overrides or {}).items():
        if name not in merged:
            raise UserError(f"{path}: unknown option {name!r}")
        if new == saved[name]:
            continue
        if name not in RESUMABLE_CHANGES:
            raise UserError(
                f"--{name.replace('_', '-')} {new} differs from the checkpointed run in {path} "
                f"({saved[name]}); a resumed run keeps its settings (only {', '.join(RESUMABLE_CHANGES)} may change)"
            )
        merged[name] = new
    overrides = overrides or {}
    if overrides.get("steps") is not None:
        merged["epochs"] = None
    elif overrides.get("epochs") is not None:
        merged["steps"] = None
    try:
        return TrainConfig(**merged)
    except TypeError as e:
        raise UserError(f"{path} holds a config this nm_optim does not understand: {e}") from e


def _check_resumable(saved: dict[str, Any], config: TrainConfig, path: Path) -> None:
    for name, value in config.to_dict().items():
        if name not in RESUMABLE_CHANGES and saved.get(name) != value:
            raise UserError(
                f"--{name.replace('_', '-')} {value} differs from the checkpointed run in {path} ({saved.get(name)}); "
                f"only {', '.join(RESUMABLE_CHANGES)} may change on --resume"
            )


@torch.no_grad()
def evaluate(model: nn.Module, data, device: torch.device, batch_size: int) -> float:
    """Top-1 accuracy on `data`, in eval mode (BatchNorm running statistics); restores train mode."""
    was_training = model.training
    model.eval()
    correct = 0
    try:
        for start in range(0, len(data), batch_size):
            x, y = data.batch(torch.arange(start, min(start + batch_size, len(data))))
            correct += int((model(x.to(device)).argmax(1).cpu() == y).sum())
    finally:
        model.train(was_training)
    return correct / max(len(data), 1)


# -- outputs ---------------------------------------------------------------------------------------------


def compare_record(record, symmetries=None):
    """nm_optim.theory.compare(record), with a record the theory cannot use (one that skipped
    steps, say) turned into a UserError."""
    from nm_optim import theory

    try:
        return theory.compare(record, symmetries)
    except ValueError as e:
        raise UserError(f"cannot compare with the theory: {e}") from e


def compare_by_kind(comparison) -> dict[str, dict[str, Any]]:
    """For each symmetry kind of a theory.Comparison: its groups and the largest relative errors
    of the exact and the paper's predictions against the measurement (per group, max over steps
    |prediction - measured| / max over steps |measured|; see nm_optim.theory.relative_error),
    maxed over the kind's symmetries and groups. NaN where the paper's closed form does not apply."""
    return theory_errors_by_kind(comparison.rows())


def theory_errors_by_kind(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Fold theory.Comparison.rows() (one per symmetry) into one entry per kind."""
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        e = out.setdefault(row["kind"], {"num_groups": 0, "exact_max_rel_err": 0.0, "paper_max_rel_err": 0.0,
                                         "symmetries": []})
        e["num_groups"] += int(row["groups"])
        for key, src in (("exact_max_rel_err", "max_exact_error"), ("paper_max_rel_err", "max_paper_error")):
            v = row.get(src)
            v = float("nan") if v is None else float(v)
            # NaN (no prediction) wins over any number: a maximum must not hide a missing group.
            e[key] = float("nan") if (math.isnan(v) or math.isnan(e[key])) else max(e[key], v)
        if not row.get("paper_applies", True):
            e["paper_max_rel_err"] = float("nan")
        e["symmetries"].append(row["symmetry"])
    return out


def draw_figure(comparison, kind: str, path: Path, *, title: str | None = None, oscillation: bool = False) -> Path:
    """One panel of nm_optim.plot.figure as a PNG: the `kind` symmetries' measured groups in
    colour with the paper's closed form dashed over them (the exact recursion where the closed
    form does not apply), or, with `oscillation`, the momentum-oscillation panel."""
    from nm_optim import plot

    preds = [p for p in comparison.predictions if p.kind == kind]
    theory = "paper" if preds and all(p.paper_applies for p in preds) else "exact"
    fig = plot.figure(comparison, panels=(kind, "oscillation") if oscillation else (kind,), theory=theory)
    if title:  # the legend says which theory is dashed
        import textwrap

        fig.suptitle(textwrap.fill(title, 50 if not oscillation else 100), fontsize=9)
    plot.save(fig, path)
    return Path(path)


def write_run_outputs(result: TrainResult, out_dir: Path) -> dict[str, Any]:
    """summary.json and one figure per symmetry kind for a `train` run. A run recorded with
    record_every > 1 (or with no symmetry found) gets no comparison: summary["note"] says why;
    its record is still written."""
    cfg = result.config
    experiments = []
    note = None
    if not result.symmetries:
        note = "no symmetry found in this model: nothing to compare with the theory"
    elif cfg.record_every != 1:
        note = f"recorded every {cfg.record_every} steps: the theory needs every step (--record-every 1)"
    else:
        comparison = compare_record(result.record)
        for kind, e in compare_by_kind(comparison).items():
            figure = draw_figure(comparison, kind, out_dir / f"{kind}.png", title=f"{cfg.model} on {cfg.data}: {kind}")
            experiments.append(experiment_entry(kind, kind, cfg, result.steps, e, figure.name))
    summary = summary_dict(result.backend, result.device, experiments)
    if note:
        summary["note"] = note
    summary["runs"] = [run_entry(result, RECORD_NAME)]
    write_json(out_dir / SUMMARY_NAME, summary)
    return summary


def experiment_entry(name: str, kind: str, cfg: TrainConfig, steps: int, errors: dict[str, Any], figure: str) -> dict[str, Any]:
    return {
        "name": name,
        "symmetry": kind,
        "model": cfg.model,
        "optimizer": cfg.optimizer,
        "steps": steps,
        "num_groups": errors["num_groups"],
        "exact_max_rel_err": errors["exact_max_rel_err"],
        "paper_max_rel_err": errors["paper_max_rel_err"],
        "figure": figure,
    }


def run_entry(result: TrainResult, record_name: str) -> dict[str, Any]:
    return {
        "config": result.config.to_dict(),
        "record": record_name,
        "steps": result.steps,
        "final_loss": result.final_loss,
        "test_accuracy": result.test_accuracy,
        "seconds": round(result.seconds, 3),
        "resumed_from": result.resumed_from,
        "symmetries": [s.describe() for s in result.symmetries],
    }


def summary_dict(backend: str, device: str, experiments: list[dict[str, Any]]) -> dict[str, Any]:
    import nm_optim

    return {"version": nm_optim.__version__, "backend": backend, "device": device, "experiments": experiments}


def format_table(experiments: list[dict[str, Any]]) -> str:
    """The short table the commands print: experiment, groups, exact error, paper error."""
    header = ("experiment", "groups", "exact max rel err", "paper max rel err")
    rows = [
        (e["name"], str(e["num_groups"]), _fmt(e["exact_max_rel_err"]), _fmt(e["paper_max_rel_err"]))
        for e in experiments
    ]
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(4)]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(r, widths))) for r in (header, *rows)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.2e}"
