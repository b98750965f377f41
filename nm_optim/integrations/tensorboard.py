"""TensorBoard: nm_optim.SGD's norms, conserved quantities and hyper-parameters, live.

    from nm_optim.integrations.tensorboard import TensorBoardLogger
    opt = nm_optim.SGD(model.named_parameters(), lr=0.1, momentum=0.9, symmetries=syms)
    board = TensorBoardLogger(opt, "runs/tb", every=10)   # logs after every 10th step by itself
    ...train...
    board.close()

Tags and values: nm_optim.integrations.common. Needs the tensorboard package
(pip install 'nm_optim[tensorboard]'); writing goes through torch.utils.tensorboard.SummaryWriter.
`nm-optim train --tensorboard DIR` uses this. `read_scalars` reads an event folder back (tests,
figures), with tensorboard's EventAccumulator.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from nm_optim.integrations.common import ScalarSource, group_values


def _summary_writer():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:  # torch.utils.tensorboard raises this without the tensorboard package
        raise ImportError("nm_optim.integrations.tensorboard needs tensorboard: pip install 'nm_optim[tensorboard]'",
                          name="tensorboard") from e
    return SummaryWriter


class TensorBoardLogger:
    """Writes the scalars of `optimizer` (an nm_optim.SGD, or a wrapper of one) every `every`
    optimizer steps to a TensorBoard log.

    log_dir: the event folder (or give `writer`, a SummaryWriter of your own).
    attach: register a step post-hook, so each ``optimizer.step()`` logs when due (False: call
        :meth:`update` yourself after the step).
    purge_step: a resumed run's first step: TensorBoard drops the events a crashed run wrote at
        and after it (SummaryWriter's purge_step), and logging resumes at that step. Values of
        your own that the crashed run logged at that step from earlier steps (a loss averaged
        over the steps before it) are dropped too: log them again (`nm-optim train` does, from
        its checkpoint's loss log)."""

    def __init__(self, optimizer: Any, log_dir: str | os.PathLike | None = None, *, every: int = 10,
                 writer: Any = None, attach: bool = True, purge_step: int | None = None) -> None:
        self.source = ScalarSource(optimizer, every)
        if writer is None:
            writer = _summary_writer()(log_dir=None if log_dir is None else str(log_dir), purge_step=purge_step)
        self.writer = writer
        if purge_step is not None:
            self.source.start_at(purge_step)
        self._handle = None
        if attach:
            self._handle = self.source.optimizer.register_step_post_hook(lambda opt, args, kwargs: self.update())

    def update(self) -> bool:
        """Log the latest record if it is due; whether something was written."""
        got = self.source.read()
        if got is None:
            return False
        step, scalars = got
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        # Across each symmetry's groups: how the law holds neuron by neuron, not only in the sum.
        for tag, values in group_values(self.source.last_record, -1, self.source.symmetries).items():
            finite = values[np.isfinite(values)]
            if finite.size:
                self.writer.add_histogram(f"groups/{tag}", finite, step)
        return True

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        """Log a value of your own (the loss, say) in the same event file."""
        self.writer.add_scalar(tag, value, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        """Detach from the optimizer and close the writer (flushing it)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.writer.close()

    def __enter__(self) -> TensorBoardLogger:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_scalars(log_dir: str | os.PathLike) -> dict[str, tuple[list[int], list[float]]]:
    """Every scalar in a TensorBoard log folder: tag -> (steps, values), in step order (the
    newest event wins where a resumed run rewrote a step)."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import (
            EventAccumulator,
        )
    except ImportError as e:
        raise ImportError("reading TensorBoard logs needs tensorboard: pip install 'nm_optim[tensorboard]'",
                          name="tensorboard") from e
    out: dict[str, dict[int, float]] = {}
    folders = sorted({p.parent for p in Path(log_dir).rglob("events.out.tfevents.*")})
    for folder in folders:
        acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            series = out.setdefault(tag, {})
            for e in acc.Scalars(tag):
                series[e.step] = e.value
    return {tag: (sorted(s), [s[k] for k in sorted(s)]) for tag, s in out.items()}


def plot_scalars(log_dir: str | os.PathLike, path: str | os.PathLike | None = None, *, title: str | None = None):
    """A figure of a TensorBoard log written by TensorBoardLogger, drawn from the event files
    (read_scalars): the loss, the parameter and gradient norms per layer, and each symmetry's
    conserved quantity relative to its first value. Saved to `path` when given (PNG); returns the
    matplotlib Figure. Needs matplotlib."""
    import matplotlib

    if path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    scalars = read_scalars(log_dir)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), constrained_layout=True)
    panels = [
        (axes[0, 0], "train/", "loss (mean of 10 steps)", False, "linear"),
        (axes[0, 1], "norm/theta/", "|θ| per parameter", False, "log"),
        (axes[1, 0], "norm/grad/", "|g| per parameter", False, "log"),
        (axes[1, 1], "conserved/", "conserved quantity / its first value", True, "linear"),
    ]
    for ax, prefix, label, relative, scale in panels:
        tags = sorted(t for t in scalars if t.startswith(prefix))
        for tag in tags:
            steps, values = scalars[tag]
            values = list(values)
            if relative:
                v0 = values[0] if values and values[0] != 0 else 1.0
                values = [v / v0 for v in values]
            short = tag[len(prefix):]
            ax.plot(steps, values, lw=1.2, label=short if len(tags) <= 12 else None)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("step")
        ax.set_yscale(scale)
        ax.grid(alpha=0.3)
        if tags and len(tags) <= 12:
            ax.legend(fontsize=7, ncol=2 if len(tags) > 6 else 1)
    import textwrap

    fig.suptitle(textwrap.fill(title or f"TensorBoard scalars of {Path(log_dir).name} (read back from the event files)",
                               110), fontsize=10)
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig
