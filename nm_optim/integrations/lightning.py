"""Lightning: log nm_optim.SGD's norms, conserved quantities and hyper-parameters with the
trainer's own loggers (TensorBoard, CSV, W&B, ...).

    from nm_optim.integrations.lightning import NMOptimCallback
    trainer = lightning.Trainer(callbacks=[NMOptimCallback(every=10)], logger=...)

`configure_optimizers` returns an nm_optim.SGD (with tracks or symmetries). Every `every`
optimizer steps the callback reads the latest record (Recorder.latest: O(1) whatever the run
length) and calls ``logger.log_metrics(scalars, step=...)`` on every logger of the trainer, on
global rank 0 only. Tags: nm_optim.integrations.common, under `prefix`.

Needs `lightning` (or the older `pytorch_lightning`). Written against Lightning 2.x's
documented Callback.on_train_batch_end and Logger.log_metrics; not exercised by nm_optim's
test suite where Lightning is not installed.
"""

from __future__ import annotations

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


class NMOptimCallback(Callback):
    """Logs the scalars of every nm_optim.SGD of the trainer every `every` optimizer steps."""

    def __init__(self, every: int = 10, prefix: str = "nm_optim/") -> None:
        super().__init__()
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        self.every = every
        self.prefix = prefix
        self._sources: dict[int, ScalarSource] = {}

    def _source(self, optimizer: Any, step: int) -> ScalarSource | None:
        opt = _unwrap(optimizer)
        if opt is None:
            return None
        source = self._sources.get(id(opt))
        if source is None or source.optimizer is not opt:
            source = self._sources[id(opt)] = ScalarSource(opt, self.every)
            source.start_at(step)  # a run resumed from a Lightning checkpoint logs from there on
        return source

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not trainer.is_global_zero:
            return
        optimizers = list(trainer.optimizers)
        for i, optimizer in enumerate(optimizers):
            source = self._source(optimizer, 0)
            if source is None:
                continue
            got = source.read()
            if got is None:
                continue
            step, scalars = got
            tag = self.prefix if len(optimizers) == 1 else f"{self.prefix}opt{i}/"
            metrics = {tag + k: v for k, v in scalars.items()}
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
