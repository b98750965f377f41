"""The application on top of nm_optim: the `nm-optim` command line (`demo`, `train`, `plot`) and
the deterministic, checkpointed, resumable training loop behind it, with its data readers and
its reports (theory-vs-measurement figures, summary.json).

    config       TrainConfig, UserError, device / backend resolution, what a resume may change
    data         digits, CIFAR-10 and ImageFolder readers (DataError for a bad folder)
    checkpoint   the checkpoint format: save, load, restore, resume_config
    loop         train(), evaluate(), epoch_order()
    distributed  `train --distributed ddp|fsdp` under torchrun: process group, batch shares, wrapping
    report       comparison with the theory, figures, summary.json entries, the printed table
    demo         the paper's figures on digits (`nm-optim demo`)
    cli          the argparse command line and main()

It is the top layer (docs/architecture.md, "Layers"): the library (nm_optim.SGD, the record, the
symmetries, the theory) never imports it.
"""

from nm_optim.app.checkpoint import load_checkpoint, resume_config
from nm_optim.app.cli import main
from nm_optim.app.config import TrainConfig, TrainResult, UserError
from nm_optim.app.data import DataError
from nm_optim.app.demo import DEMO_RUNS, run_demo
from nm_optim.app.loop import train
from nm_optim.app.report import plot_record

__all__ = [
    "DEMO_RUNS",
    "DataError",
    "TrainConfig",
    "TrainResult",
    "UserError",
    "load_checkpoint",
    "main",
    "plot_record",
    "resume_config",
    "run_demo",
    "train",
]
