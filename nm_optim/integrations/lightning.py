"""Lightning: log nm_optim.SGD's norms, conserved quantities and hyper-parameters with the
trainer's own logging, and keep its record in the trainer's checkpoints.

    from nm_optim.integrations.lightning import NMOptimCallback
    trainer = lightning.Trainer(callbacks=[NMOptimCallback()], logger=..., log_every_n_steps=10)
    trainer.fit(module)                                   # later: trainer.fit(module, ckpt_path=...)

`configure_optimizers` returns an nm_optim.SGD (with tracks or symmetries).

Logging: on the batches whose metrics Lightning sends to its loggers (``log_every_n_steps``),
the callback reads the latest record (Recorder.latest: O(1) whatever the length of the run) and
hands its scalars to ``pl_module.log_dict``: every logger of the trainer gets them at the
trainer's step, with the module's own metrics, and nothing goes to the progress bar. Other
batches cost nothing (no read, no device sync). Tags: nm_optim.integrations.common, under
`prefix` (and ``opt<i>/`` with several optimizers). Only global rank 0 reads and logs (the
statistics are the same on every rank).

Checkpoints: the callback's ``state_dict`` holds each optimizer's ``Recorder.state_dict()``, so
every Lightning checkpoint carries where the record stands (the records themselves, or a record
stream's length: see nm_optim.recorder), and ``fit(ckpt_path=...)`` puts it back before training
resumes: the record then equals an uninterrupted run's, and Lightning's steps, which the loggers
see, continue from the checkpoint's.

Needs `lightning` (or the older `pytorch_lightning`): Lightning 2.x's Callback (setup,
state_dict / load_state_dict, on_train_start, on_train_batch_end) and LightningModule.log_dict.
"""

from __future__ import annotations

import warnings
from typing import Any

from nm_optim.integrations.common import ScalarSource, _unwrap

try:
    from lightning.pytorch import Callback
except ImportError:  # the package's older name
    try:
        from pytorch_lightning import Callback
    except ImportError as e:
        raise ImportError("nm_optim.integrations.lightning needs Lightning: pip install lightning",
                          name="lightning") from e


def _logs_now(trainer: Any) -> bool:
    """Whether Lightning sends this batch's step metrics to its loggers: the logger connector's
    own test (log_every_n_steps, and the last batch before a stop). Without it (another
    Lightning), every batch: log_dict's values then wait for Lightning's next flush."""
    connector = getattr(trainer, "_logger_connector", None)
    return bool(getattr(connector, "should_update_logs", True))


class NMOptimCallback(Callback):
    """Logs the scalars of every nm_optim.SGD of the trainer when the trainer logs, and keeps
    their recorders' state in its checkpoints."""

    def __init__(self, prefix: str = "nm_optim/") -> None:
        super().__init__()
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
        self.prefix = prefix
        self._trainer: Any = None
        self._sources: dict[int, ScalarSource] = {}
        self._restored: list[dict[str, Any] | None] | None = None  # a checkpoint's, until training starts

    def _recorders(self, trainer: Any) -> list[Any]:
        """The recorder of each of the trainer's optimizers (None where it is no nm_optim.SGD)."""
        out = []
        for optimizer in getattr(trainer, "optimizers", None) or []:
            opt = _unwrap(optimizer)
            out.append(opt.recorder if opt is not None else None)
        return out

    # -- checkpoints --------------------------------------------------------------------------
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._trainer = trainer  # state_dict() is given no trainer

    def state_dict(self) -> dict[str, Any]:
        recorders = self._recorders(self._trainer) if self._trainer is not None else []
        return {"recorders": [r.state_dict() if r is not None else None for r in recorders]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callbacks before it builds the optimizers: applied in on_train_start
        recorders = state_dict.get("recorders")
        if not isinstance(recorders, list):
            raise ValueError("the NMOptimCallback state of this checkpoint has no list of recorder states")
        self._restored = recorders

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._sources = {}
        recorders = self._recorders(trainer)
        restored, self._restored = self._restored, None
        where = getattr(trainer, "ckpt_path", None) or "the checkpoint"
        if restored is None:
            if trainer.global_step > 0 and any(r is not None for r in recorders):
                warnings.warn(f"resumed at global step {trainer.global_step} from {where}, which holds no nm_optim "
                              "recorder state (written without NMOptimCallback?): the record starts at step 0 here",
                              stacklevel=2)
            return
        if len(restored) != len(recorders):
            raise ValueError(f"{where} holds the recorder states of {len(restored)} optimizers, "
                             f"this trainer has {len(recorders)}")
        for i, (recorder, state) in enumerate(zip(recorders, restored)):
            if (recorder is None) != (state is None):
                raise ValueError(f"optimizer {i}: {where} holds " + ("a recorder state for an optimizer that is not an "
                                 "nm_optim.SGD" if recorder is None else "no recorder state for this nm_optim.SGD"))
            if recorder is not None:
                try:
                    recorder.load_state_dict(state)
                except ValueError as e:
                    raise ValueError(f"optimizer {i}: the recorder state in {where} does not fit: {e}") from e

    # -- logging ------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not trainer.is_global_zero or not _logs_now(trainer):
            return
        optimizers = list(trainer.optimizers)
        metrics: dict[str, float] = {}
        for i, optimizer in enumerate(optimizers):
            opt = _unwrap(optimizer)
            if opt is None:
                continue
            source = self._sources.get(id(opt))
            if source is None or source.optimizer is not opt:
                # every=1: each time Lightning logs, the newest record not logged yet
                source = self._sources[id(opt)] = ScalarSource(opt, 1)
                source.start_at(opt.recorder.steps_done - 1)
            got = source.read()
            if got is None:
                continue
            tag = self.prefix if len(optimizers) == 1 else f"{self.prefix}opt{i}/"
            metrics.update({tag + k: v for k, v in got[1].items()})
        if metrics:
            # batch_size: nothing is averaged over the epoch, so Lightning need not infer one
            pl_module.log_dict(metrics, on_step=True, on_epoch=False, prog_bar=False, logger=True,
                               rank_zero_only=True, batch_size=1)
