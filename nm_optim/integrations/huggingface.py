"""Hugging Face transformers: log nm_optim.SGD's norms, conserved quantities and
hyper-parameters through the Trainer's own logging (every `report_to` integration).

    from nm_optim.integrations.huggingface import NMOptimTrainerCallback
    trainer = Trainer(model, args, optimizers=(nm_optim.SGD(...), None), ...)
    NMOptimTrainerCallback.attach(trainer, every=10)   # or: cb = ...(); trainer.add_callback(cb); cb.trainer = trainer

Every `every` optimizer steps (TrainerCallback.on_step_end, which receives the optimizer) the
callback reads the latest record (Recorder.latest: O(1) whatever the run length) and hands the
scalars to ``trainer.log``, which sends them to every integration of ``args.report_to``
(TensorBoard, W&B, ...) and to the trainer's log history, on the main process only. Tags:
nm_optim.integrations.common, under `prefix`. A TrainerCallback is not given the Trainer, so the
callback needs it: `attach` sets it.

Needs `transformers`. Written against its documented TrainerCallback.on_step_end(args, state,
control, **kwargs) (kwargs include "optimizer", possibly wrapped by accelerate) and Trainer.log;
not exercised by nm_optim's test suite where transformers is not installed.
"""

from __future__ import annotations

from typing import Any

from nm_optim.integrations.common import ScalarSource, _unwrap

try:
    from transformers import TrainerCallback
except ImportError as e:
    raise ImportError("nm_optim.integrations.huggingface needs transformers: pip install transformers",
                      name="transformers") from e


class NMOptimTrainerCallback(TrainerCallback):
    """Logs the scalars of the Trainer's nm_optim.SGD every `every` optimizer steps."""

    def __init__(self, every: int = 10, trainer: Any = None, prefix: str = "nm_optim/") -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        self.every = every
        self.trainer = trainer
        self.prefix = prefix
        self._source: ScalarSource | None = None

    @classmethod
    def attach(cls, trainer: Any, every: int = 10, prefix: str = "nm_optim/") -> NMOptimTrainerCallback:
        """A callback added to `trainer` that logs through it."""
        cb = cls(every=every, trainer=trainer, prefix=prefix)
        trainer.add_callback(cb)
        return cb

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.trainer is None:
            raise RuntimeError("NMOptimTrainerCallback logs through the Trainer: create it with "
                               "NMOptimTrainerCallback.attach(trainer) or set callback.trainer = trainer")
        self._source = None

    def on_step_end(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        if self._source is None:
            opt = _unwrap(optimizer if optimizer is not None else getattr(self.trainer, "optimizer", None))
            if opt is None:
                return  # not an nm_optim.SGD: nothing to log
            self._source = ScalarSource(opt, self.every)
            self._source.start_at(opt.recorder.steps_done - 1)  # a resumed run logs from here on
        got = self._source.read()
        if got is None:
            return
        _, scalars = got
        self.trainer.log({self.prefix + k: v for k, v in scalars.items()})
