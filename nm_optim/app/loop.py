"""The training loop behind `nm-optim demo|train`: deterministic, checkpointed, resumable.

A run is a :class:`~nm_optim.app.config.TrainConfig` (model, data, optimizer hyper-parameters,
steps, seed) and an output folder. :func:`train` builds the model from the zoo
(`nm_optim.models`), finds its symmetries (`nm_optim.symmetry.find_symmetries`), trains it with
`nm_optim.SGD` tracking them, and writes

    DIR/record/          the record, streamed while training (a record stream: append-only
                         chunks, nm_optim.load_record reads it memory-mapped); host memory stays
                         bounded whatever the run length, and a crash loses at most the last chunk
    DIR/record.npz       the same record as one file (Record.save, atomic), at the end of the run
    DIR/checkpoint.pt    the latest checkpoint (app.checkpoint, atomic), when checkpoint_every > 0;
                         it holds the stream's length, not the record: a resume cuts DIR/record/
                         back to it, so the record equals an uninterrupted run's. It is sealed
                         with a SHA-256 and its fields are checked before a resume touches DIR:
                         a damaged one is one error naming the file and the field
    DIR/summary.json     what ran and how well each symmetry's theory matched (app.report, atomic)
    DIR/<kind>.png       the theory-vs-measurement figure of every symmetry kind found

Determinism: the weights are initialised from `seed`; epoch e visits the training set in the
order of ``randperm(N)`` drawn from a generator seeded with (seed, e), so the data position is
just the global step (and batches decoded ahead by worker processes, app.data.batches, arrive
in that order); a checkpoint holds the model, the optimizer state, the recorder state (the
record stream's length), the torch RNG states (dropout) and that step. Resuming from it continues
bit-identically — the parameters and the record — on the same device, backend and thread count
(on CUDA, cuDNN is put in deterministic mode for that).

Several processes (`distributed`, launched by torchrun; app.distributed): the same global
batches, split over the processes; DDP or FSDP2; only rank 0 records and writes; the checkpoint
is the 1-process one (whole tensors), so a resume may use another number of processes.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import nm_optim
from nm_optim import models
from nm_optim.app import distributed as dist_app
from nm_optim.app.checkpoint import (
    CHECKPOINT_NAME,
    LOG_EVERY,
    STREAM_NAME,
    _rng_state,
    load_checkpoint,
    restore_checkpoint,
    save_checkpoint,
)
from nm_optim.app.config import (
    TrainConfig,
    TrainResult,
    UserError,
    check_resumable,
    check_writable,
    resolve_backend,
    resolve_device,
)
from nm_optim.app.data import DataError, Split, batches, default_workers, load
from nm_optim.app.report import RECORD_NAME, write_run_outputs
from nm_optim.symmetry import find_symmetries

# LOG_EVERY (app.checkpoint): steps per entry of the loss log (and per progress-bar update); a
# checkpoint's log is checked against it.


# -- building a run -------------------------------------------------------------------------------------


def load_data(config: TrainConfig) -> Split:
    """The data set `config.data` names, with its DataError as a UserError."""
    try:
        return load(config.data, image_size=config.image_size)
    except DataError as e:
        raise UserError(str(e)) from e


def check_model_name(name: str) -> None:
    if name not in models.MODELS:
        raise UserError(f"unknown model {name!r}; expected one of: {', '.join(models.MODELS)}")


def build_model(config: TrainConfig, shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """`config.model` from the zoo for images of `shape` (C, H, W), initialised from config.seed."""
    check_model_name(config.model)
    c, h, w = shape
    if h != w:
        raise UserError(f"the model zoo expects square images, the data has {h}x{w}")
    torch.manual_seed(config.seed)
    try:
        return models.get_model(config.model, num_classes=num_classes, in_channels=c, image_size=h)
    except ValueError as e:  # e.g. images too small for the model's poolings
        raise UserError(f"--model {config.model} on {config.data}: {e}") from e


def epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    """The order epoch `epoch` visits n examples: a function of (seed, epoch) only, so a
    resumed run needs no generator state, just the step."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63))
    return torch.randperm(n, generator=gen)


def step_indices(n: int, batch_size: int, seed: int, start: int, total: int,
                 d: dist_app.Distributed | None = None) -> Iterator[Tensor]:
    """The examples of steps start .. total-1, one index tensor per step (this process's share
    of the global batch in a distributed run): epoch e's epoch_order, batch after batch."""
    per_epoch = n // batch_size
    order, order_epoch = None, -1
    for step in range(start, total):
        epoch, pos = divmod(step, per_epoch)
        if epoch != order_epoch:
            order, order_epoch = epoch_order(n, seed, epoch), epoch
        idx = order[pos * batch_size : (pos + 1) * batch_size]
        yield idx if d is None else dist_app.local_indices(idx, d)  # this rank's share


def _progress(total: int, initial: int, desc: str, enabled: bool):
    """A tqdm bar on stderr when tqdm is installed and wanted; otherwise None."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: no bar
        return None
    return tqdm(total=total, initial=initial, desc=desc, unit="step", file=sys.stderr, leave=False, dynamic_ncols=True)


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
    record_dtype: str = "float64",
    tensorboard: str | os.PathLike | None = None,
    tensorboard_every: int = 10,
    distributed: dist_app.Distributed | None = None,
    workers: int | None = None,
) -> TrainResult:
    """Train `config` and write its outputs to `out` (see the module docstring).

    resume: continue from `out/checkpoint.pt`. `config` must be the checkpointed run's, up to
        the fields in config.RESUMABLE_CHANGES (e.g. more steps): see checkpoint.resume_config.
    data: a preloaded nm_optim.app.data.Split (else `config.data` is read).
    model_fn / symmetries_fn: replace the zoo and the symmetry detector (tests, custom models).
    on_step(step): called after every optimizer step with the number of steps done (a test
        raises from it to simulate a crash).
    track: more statistics to record besides the symmetries' (nm_optim.SGD's `track`).
    write_outputs: write record, summary and figures at the end (checkpoints are written
        whenever checkpoint_every > 0; the record stream whenever `out` is given).
    record_dtype: "float64" or "float32": how the record stream stores the sums (float32: half
        the disk, each sum rounded to ~6e-8 relative; see nm_optim.recorder). A resumed run
        keeps its stream's dtype.
    tensorboard: a TensorBoard log folder: every `tensorboard_every` steps the parameter,
        gradient and momentum norms, each symmetry's conserved quantity and the
        hyper-parameters, and the loss (nm_optim.integrations.tensorboard; needs tensorboard).
    distributed: this process's place in a run on several processes, inside
        app.distributed.process_group (see the module docstring there). Rank 0 writes `out`,
        the others only read its checkpoint on resume.
    workers: processes that decode batches ahead of the step (app.data.batches; the data order
        is the same with any number); None: app.data.default_workers (the cores available for
        an ImageFolder, shared by the processes of a distributed run on this machine; none for
        data held in memory).
    """
    started = time.perf_counter()
    d = distributed
    main = d is None or d.is_main
    if d is not None:
        dist_app.check_batch_size(config.batch_size, d)  # before anything is read or built
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
        raise UserError(f"--workers must be a non-negative integer, got {workers!r}")
    if out is None:
        out_dir = None
    else:
        out_dir = check_writable(out) if main else Path(out)  # the other ranks write nothing there
    ckpt_path = out_dir / CHECKPOINT_NAME if out_dir is not None else None
    ckpt_state = None
    if resume:
        if ckpt_path is None:
            raise UserError("--resume needs the output folder of the run to continue (--out DIR)")
        ckpt_state = load_checkpoint(ckpt_path)
        check_resumable(ckpt_state["config"], config, ckpt_path)

    device = resolve_device(config.device) if d is None else dist_app.process_device(config.device, d)
    backend = resolve_backend(config.backend, device)
    if device.type == "cuda":
        # Bit-identical resume needs deterministic convolution algorithms.
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False

    if model_fn is None:
        if ckpt_state is not None and config.model not in models.MODELS:
            # the user gave no --model: the checkpoint did
            raise UserError(f"checkpoint {ckpt_path}: config.model {config.model!r} is not a model of the zoo "
                            f"(expected one of: {', '.join(models.MODELS)})")
        check_model_name(config.model)  # before reading a data set that may take minutes
    if data is not None:
        split = data
    elif ckpt_state is not None:
        try:
            split = load_data(config)
        except UserError as e:  # the data set is the checkpoint's config.data, not an option given
            raise UserError(f"checkpoint {ckpt_path}: config.data {config.data!r}: {e}") from e
    else:
        split = load_data(config)
    train_set = split.train
    n = len(train_set)
    if config.batch_size > n:
        raise UserError(f"--batch-size {config.batch_size} is larger than the training set ({n} examples)")
    per_epoch = n // config.batch_size
    total = config.steps if config.steps is not None else (config.epochs or 1) * per_epoch

    # `net` is the model itself (its params are the optimizer's, its state dict the checkpoint's),
    # `model` what the batches go through: `net`, or DDP around it.
    net = (model_fn or build_model)(config, train_set.shape, train_set.num_classes).to(device)
    net.train()
    example = train_set.batch(torch.arange(min(2, n)))[0].to(device)
    if symmetries_fn is not None:
        symmetries = list(symmetries_fn(net, example))
    else:  # the loss the loop trains with: it decides whether the logits' translation law holds
        symmetries = find_symmetries(net, example, loss=F.cross_entropy)
    model = net
    if d is not None:
        dist_app.warn_batch_norm(net, d)
        names = {id(p): name for name, p in net.named_parameters()}
        model = dist_app.wrap(net, d, device)
        symmetries = dist_app.rebind_symmetries(symmetries, names, net)
    opt = nm_optim.SGD(
        net.named_parameters(),
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
    if not main:
        opt.recorder.enabled = False  # rank 0 records (the statistics are the same on every rank)

    step = 0
    losses: list[tuple[int, float]] = []
    pending: list[Tensor] = []
    if ckpt_state is not None:
        if d is not None:
            ckpt_state = dist_app.shard_like(ckpt_state, net, opt)
        step, losses, pending = restore_checkpoint(
            ckpt_state, ckpt_path, model=net, optimizer=opt, device=device, backend=config.backend,
            recorder=main, rank=d.rank if d else 0, world_size=d.world_size if d else 1,
        )
        if step > total:
            raise UserError(f"the checkpoint is at step {step}, past the {total} steps asked for (give more --steps)")
    else:
        torch.manual_seed(config.seed)  # whatever building the model and its symmetries drew
    resumed_from = step if ckpt_state is not None else None
    if out_dir is not None and main and opt.recorder.stream is None:
        # a new run (or one resumed from a checkpoint that holds its record): a new stream
        try:
            opt.recorder.stream_to(out_dir / STREAM_NAME, dtype=record_dtype, overwrite=True)
        except FileExistsError as e:
            raise UserError(f"cannot write the record: {e}") from e
    board = None
    if tensorboard is not None and main:
        from nm_optim.integrations.tensorboard import TensorBoardLogger

        board = TensorBoardLogger(opt, tensorboard, every=tensorboard_every, purge_step=resumed_from)
        # The purge drops everything the stopped run wrote at and after the resumed step: its
        # statistics there are redone, but the loss it logged at that step is of the steps before
        # it, which are not. The checkpoint's loss log has it: write it again.
        for logged_at, value in losses:
            if resumed_from is not None and logged_at >= resumed_from:
                board.add_scalar("train/loss", value, logged_at)

    bar = _progress(total, step, desc or f"{config.model} on {config.data}", progress and main)
    # torchrun's processes on this machine share its cores
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if d is not None else 1
    n_workers = default_workers(train_set, local_processes) if workers is None else workers
    loader = batches(train_set, step_indices(n, config.batch_size, config.seed, step, total, d), workers=n_workers,
                     pin_memory=device.type == "cuda" and n_workers > 0)
    try:
        while step < total:
            x, y = next(loader)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            step += 1
            # the global batch's loss on every rank: the log and checkpoints are the same everywhere
            pending.append(loss.detach() if d is None else dist_app.mean_over_ranks(loss, d))
            # The log holds whole intervals only (step % LOG_EVERY == 0): a run stopped at any
            # step and resumed logs exactly what an uninterrupted run logs.
            if step % LOG_EVERY == 0:
                value = torch.stack(pending).mean().item()
                pending.clear()
                losses.append((step, value))
                if board is not None:
                    board.add_scalar("train/loss", value, step)
                if bar is not None:
                    bar.set_postfix(loss=f"{value:.4f}", refresh=False)
                    bar.update(step - bar.n)
                if not math.isfinite(value):
                    raise UserError(
                        f"training diverged at step {step} (loss {value}); lower --lr or --momentum"
                    )
            if bar is not None and step == total:
                bar.update(step - bar.n)
            if ckpt_path is not None and config.checkpoint_every and (step % config.checkpoint_every == 0 or step == total):
                _checkpoint(ckpt_path, d, config=config, step=step, model=net, optimizer=opt, device=device,
                            losses=losses, pending_losses=pending)
            if on_step is not None:
                on_step(step)
    finally:
        loader = None  # the worker processes end now, not with a traceback that holds this frame
        if bar is not None:
            bar.close()
        if board is not None:
            board.close()

    # the mean loss of the last steps: those not yet in the log, else the last log entry
    final_loss = torch.stack(pending).mean().item() if pending else (losses[-1][1] if losses else None)
    # every rank evaluates (FSDP's forward is collective); DDP's module alone needs no peers
    accuracy = (evaluate(net, split.test, device, config.batch_size,
                         workers=default_workers(split.test, local_processes) if workers is None else workers)
                if split.test is not None else None)
    record = _finish_record(opt, config, losses, accuracy, step, d)
    result = TrainResult(
        config=config, record=record, model=model, optimizer=opt, symmetries=symmetries, steps=step,
        device=str(device), backend=backend, losses=losses, final_loss=final_loss, test_accuracy=accuracy,
        seconds=time.perf_counter() - started, resumed_from=resumed_from, out=out_dir,
        distributed=d.describe() if d is not None else None,
    )
    if opt.recorder.stream is not None:
        opt.recorder.stream.update_meta(training=record.meta["training"])
    if write_outputs and out_dir is not None and main:
        record.save(out_dir / RECORD_NAME)  # from the stream's memory maps: bounded memory
        write_run_outputs(result, out_dir)
    return result


def _checkpoint(path, d: dist_app.Distributed | None, *, model: nn.Module, optimizer, device: torch.device,
                **kwargs) -> None:
    """save_checkpoint, by rank 0 of a distributed run: every rank takes part in gathering the
    whole tensors (FSDP's shards) and the RNG states, rank 0 writes them."""
    if d is None:
        save_checkpoint(path, model=model, optimizer=optimizer, device=device, **kwargs)
        return
    model_state = dist_app.gather_full(model.state_dict())
    optimizer_state = dist_app.gather_full(optimizer.state_dict())
    rng_ranks = dist_app.gather_rng(_rng_state(device))
    if d.is_main:
        save_checkpoint(path, model=model, optimizer=optimizer, device=device, model_state=model_state,
                        optimizer_state=optimizer_state, rng_ranks=rng_ranks, **kwargs)


def _finish_record(opt, config: TrainConfig, losses: list[tuple[int, float]], accuracy: float | None, step: int,
                   d: dist_app.Distributed | None = None):
    """The recorder's snapshot, with what the run was and how it went in meta["training"]
    (and, for a run on several processes, "distributed": its mode and world size)."""
    record = opt.recorder.snapshot()
    record.meta["training"] = {
        "config": config.to_dict(),
        "steps_done": step,
        "loss": [list(x) for x in losses],
        "test_accuracy": accuracy,
    }
    if d is not None:
        record.meta["training"]["distributed"] = d.describe()
    return record


@torch.no_grad()
def evaluate(model: nn.Module, data, device: torch.device, batch_size: int, workers: int = 0) -> float:
    """Top-1 accuracy on `data`, in eval mode (BatchNorm running statistics); restores train mode.
    workers: processes decoding the batches ahead (app.data.batches)."""
    was_training = model.training
    model.eval()
    correct = 0
    chunks = (torch.arange(start, min(start + batch_size, len(data))) for start in range(0, len(data), batch_size))
    try:
        for x, y in batches(data, chunks, workers=workers):
            correct += int((model(x.to(device)).argmax(1).cpu() == y).sum())
    finally:
        model.train(was_training)
    return correct / max(len(data), 1)

