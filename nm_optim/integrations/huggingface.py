"""Hugging Face transformers: log nm_optim.SGD's norms, conserved quantities and
hyper-parameters to the Trainer's `report_to` integrations, and keep its record in the Trainer's
checkpoints.

    from nm_optim.integrations.huggingface import NMOptimTrainerCallback
    trainer = Trainer(model, args, optimizers=(nm_optim.SGD(...), None), ...)
    NMOptimTrainerCallback.attach(trainer)        # or: trainer.add_callback(NMOptimTrainerCallback(trainer))
    trainer.train()                               # later: trainer.train(resume_from_checkpoint=True)

Logging: when the Trainer logs (``control.should_log``: ``logging_steps``, ``logging_first_step``,
``logging_strategy``), the callback reads the latest record (Recorder.latest: O(1) whatever the
length of the run) and hands its scalars to the ``on_log`` of the Trainer's `report_to`
integration callbacks (TensorBoard, W&B, MLflow, ...: those of transformers'
INTEGRATION_TO_CALLBACK), at ``state.global_step`` as they log the loss, on the main process only.
Not through ``Trainer.log``: that would also print every scalar on the console (the printer and
progress callbacks) and store them in ``state.log_history`` (trainer_state.json, in every
checkpoint). With no `report_to` integration nothing is logged (a warning says so; write a
TensorBoard log of your own with nm_optim.integrations.tensorboard.TensorBoardLogger). Tags:
nm_optim.integrations.common, under `prefix` (which the integrations may prefix again, e.g.
TensorBoard's "train/").

Checkpoints: each checkpoint folder the Trainer writes (``checkpoint-<step>``, next to
optimizer.pt) gets RECORDER_NAME, the optimizer's ``Recorder.state_dict()``. A resumed train()
(state.global_step > 0 at ``on_train_begin``) loads it from ``<output_dir>/checkpoint-<step>``,
the folder ``resume_from_checkpoint`` names in the usual case (True, or a checkpoint of this
output_dir); a checkpoint resumed from elsewhere is named with `resume_from`. The record then
equals an uninterrupted run's.

A TrainerCallback is not given the Trainer, and the callback needs it (its integrations): `attach`
sets it. Needs `transformers` (TrainerCallback.on_train_begin / on_step_end / on_epoch_end /
on_save).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch

from nm_optim._io import atomic_write
from nm_optim.integrations.common import ScalarSource, _unwrap

try:
    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
except ImportError as e:
    raise ImportError("nm_optim.integrations.huggingface needs transformers: pip install transformers",
                      name="transformers") from e

RECORDER_NAME = "nm_optim_recorder.pt"  # in each checkpoint folder, next to optimizer.pt


def _integration_classes() -> tuple[type, ...]:
    """The callback classes of transformers' `report_to` integrations."""
    try:
        from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK
    except ImportError:  # the older layout
        from transformers.integrations import INTEGRATION_TO_CALLBACK
    return tuple(INTEGRATION_TO_CALLBACK.values())


class NMOptimTrainerCallback(TrainerCallback):
    """Logs the scalars of the Trainer's nm_optim.SGD when the Trainer logs, to its `report_to`
    integrations, and keeps the recorder's state in each checkpoint folder.

    resume_from: the checkpoint folder (or its RECORDER_NAME file) to take the recorder's state
        from when train() resumes, where it is not ``<output_dir>/checkpoint-<global step>``."""

    def __init__(self, trainer: Any = None, prefix: str = "nm_optim/",
                 resume_from: str | os.PathLike | None = None) -> None:
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
        self.trainer = trainer
        self.prefix = prefix
        self.resume_from = resume_from
        self._source: ScalarSource | None = None

    @classmethod
    def attach(cls, trainer: Any, prefix: str = "nm_optim/",
               resume_from: str | os.PathLike | None = None) -> NMOptimTrainerCallback:
        """A callback added to `trainer`."""
        cb = cls(trainer=trainer, prefix=prefix, resume_from=resume_from)
        trainer.add_callback(cb)
        return cb

    def _optimizer(self, optimizer: Any) -> Any:
        return _unwrap(optimizer if optimizer is not None else getattr(self.trainer, "optimizer", None))

    def on_train_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        if self.trainer is None:
            raise RuntimeError("NMOptimTrainerCallback logs to the Trainer's integrations: create it with "
                               "NMOptimTrainerCallback.attach(trainer) or NMOptimTrainerCallback(trainer)")
        self._source = None
        opt = self._optimizer(optimizer)
        if opt is None:
            return  # not an nm_optim.SGD: nothing to record or log
        if state.global_step > 0:
            self._restore(opt, args, state)
        if state.is_world_process_zero and not self._integrations():
            warnings.warn("NMOptimTrainerCallback: the Trainer has no report_to integration (report_to='none'?), "
                          "so nm_optim's scalars go nowhere; see nm_optim.integrations.tensorboard", stacklevel=2)

    def _restore(self, opt: Any, args: Any, state: Any) -> None:
        """Load the recorder's state of the checkpoint train() resumed from."""
        if self.resume_from is not None:
            path = Path(self.resume_from)
            path = path / RECORDER_NAME if path.is_dir() else path
        else:
            path = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}" / RECORDER_NAME
        if not path.is_file():
            raise FileNotFoundError(
                f"train() resumed at global step {state.global_step}, but there is no nm_optim recorder state "
                f"at {path}: the record cannot continue. Resume from a checkpoint written with "
                "NMOptimTrainerCallback, or name its folder with NMOptimTrainerCallback(resume_from=...)")
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("global_step") != state.global_step:
            raise ValueError(f"{path} is the recorder state at global step {saved.get('global_step')}, "
                             f"train() resumed at step {state.global_step}")
        try:
            opt.recorder.load_state_dict(saved["recorder"])
        except ValueError as e:
            raise ValueError(f"the recorder state in {path} does not fit this optimizer: {e}") from e

    def on_save(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        opt = self._optimizer(optimizer)
        if opt is None:
            return
        recorder = opt.recorder.state_dict()  # on every process: it waits for the device like a collective would
        if not args.should_save:
            return
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if not folder.is_dir():
            raise FileNotFoundError(f"the Trainer saved a checkpoint, but its folder {folder} does not exist "
                                    "(a hyper-parameter search run? its checkpoints are not supported)")
        saved = {"global_step": int(state.global_step), "recorder": recorder}
        atomic_write(folder / RECORDER_NAME, lambda f: torch.save(saved, f))

    def _integrations(self) -> list[Any]:
        handler = getattr(self.trainer, "callback_handler", None)
        kinds = _integration_classes()
        return [cb for cb in getattr(handler, "callbacks", []) if isinstance(cb, kinds)]

    def _log(self, args: Any, state: Any, control: Any, optimizer: Any) -> None:
        if not control.should_log or not state.is_world_process_zero:
            return
        if self._source is None:
            opt = self._optimizer(optimizer)
            if opt is None:
                return
            # every=1: each time the Trainer logs, the newest record not logged yet
            self._source = ScalarSource(opt, 1)
            self._source.start_at(opt.recorder.steps_done - 1)
        got = self._source.read()
        if got is None:
            return
        logs = {self.prefix + k: v for k, v in got[1].items()}
        for cb in self._integrations():
            cb.on_log(args, state, control, logs=dict(logs))

    def on_step_end(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        self._log(args, state, control, optimizer)

    def on_epoch_end(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        self._log(args, state, control, optimizer)  # logging_strategy="epoch" logs here
