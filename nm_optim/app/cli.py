"""The `nm-optim` command line: `demo`, `train` and `plot`.

    nm-optim demo [--out DIR] [--steps N] [--backend B] [--device D] [--full [--full-steps N]] [--transformer]
    nm-optim train --model vgg16_bn --data imagefolder:~/tiny-imagenet-200 --lr 0.1 --epochs 10 --out runs/vgg
    nm-optim train --out runs/vgg --resume            # continue from runs/vgg/checkpoint.pt
    nm-optim plot runs/vgg/record.npz --out figures/
    torchrun --nproc-per-node 4 -m nm_optim train ... --distributed ddp   # or fsdp (app.distributed)

A user mistake (a missing or malformed data folder, an unknown model, an unwritable output
folder, a bad option) ends with one line on stderr, ``nm-optim: error: ...``, and exit status 1
(2 for malformed options, as argparse does); never with a traceback. So does a missing optional
dependency: the line names ``pip install 'nm_optim[demo]'``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from nm_optim._version import __version__
from nm_optim.app import distributed as dist_app
from nm_optim.app.checkpoint import resume_config
from nm_optim.app.config import TrainConfig, UserError, check_writable
from nm_optim.app.demo import DEMO_STEPS, FULL_STEPS, run_demo
from nm_optim.app.loop import train
from nm_optim.app.report import SUMMARY_NAME, format_table, plot_record
from nm_optim.record import RecordError

PROG = "nm-optim"
DEFAULT_CHECKPOINT_EVERY = 1000
# The options of `train` that are TrainConfig fields (all but --out, --resume and the output ones).
_TRAIN_OPTIONS = ("model", "data", "lr", "momentum", "dampening", "weight_decay", "nesterov", "batch_size",
                  "steps", "epochs", "image_size", "backend", "device", "seed", "record_every", "checkpoint_every")
# The optional dependencies, by import name: a missing one is a one-line error, not a traceback.
_OPTIONAL = {"matplotlib": "matplotlib", "sklearn": "scikit-learn", "PIL": "Pillow", "tqdm": "tqdm",
             "tensorboard": "tensorboard"}
_EXTRA = {"tensorboard": "tensorboard"}  # the extra that installs it, where not 'demo'


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the usage is one --help away)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# -- the commands -----------------------------------------------------------------------------------------


def _demo(args: argparse.Namespace) -> int:
    if args.transformer:
        return _demo_transformer(args)
    summary = run_demo(args.out, steps=DEMO_STEPS if args.steps is None else args.steps, backend=args.backend, device=args.device, seed=args.seed,
                       progress=not args.no_progress, full=args.full, full_steps=args.full_steps)
    if not args.quiet:
        experiments = summary["experiments"]
        print(format_table(experiments))
        print(f"\n{len(experiments)} experiments in {summary['seconds']:.1f} s on {summary['device']} "
              f"(backend {summary['backend']}); figures, records and summary.json in {Path(args.out)}")
    return 0


def _demo_transformer(args: argparse.Namespace) -> int:
    from nm_optim.app.demo_transformer import TRANSFORMER_STEPS, format_rows, run_transformer_demo

    steps = TRANSFORMER_STEPS if args.steps is None else args.steps
    summary = run_transformer_demo(args.out, steps=steps, backend=args.backend, device=args.device, seed=args.seed,
                                   progress=not args.no_progress)
    if not args.quiet:
        print(format_rows(summary["symmetries"]))
        print(f"\n{len(summary['symmetries'])} symmetries in {summary['seconds']:.1f} s; figure, record and "
              f"summary.json in {Path(args.out)}")
    return 0


def _train(args: argparse.Namespace) -> int:
    given = {k: getattr(args, k) for k in _TRAIN_OPTIONS if hasattr(args, k)}
    # torchrun's environment first: a launch that cannot work fails before reading any data
    if args.distributed is None:
        dist_app.check_not_launched_by_torchrun()
        d = None
    else:
        d = dist_app.from_env(args.distributed)
    if args.resume:
        if d is None or d.is_main:  # the other ranks write nothing into --out
            check_writable(args.out)
        config = resume_config(args.out, given)
    else:
        missing = [f"--{k}" for k in ("model", "data") if k not in given]
        if missing:
            raise UserError(f"train needs {' and '.join(missing)} (or --resume to continue a run in --out)")
        given.setdefault("checkpoint_every", DEFAULT_CHECKPOINT_EVERY)
        config = TrainConfig(**given)
        if config.steps is None and config.epochs is None:
            config.epochs = 1
    run = {"resume": args.resume, "progress": not args.no_progress, "record_dtype": args.record_dtype,
           "tensorboard": args.tensorboard, "tensorboard_every": args.tensorboard_every, "workers": args.workers}
    if d is None:
        result = train(config, args.out, **run)
    else:
        # what can be checked alone is checked before the processes wait for each other
        dist_app.check_batch_size(config.batch_size, d)
        device = dist_app.process_device(config.device, d)
        with dist_app.process_group(d, device):
            result = train(config, args.out, distributed=d, **run)
    if not args.quiet and (d is None or d.is_main):
        import json

        summary = json.loads((result.out / SUMMARY_NAME).read_text())
        print(summary["note"] if "note" in summary else format_table(summary["experiments"]))
        acc = f", test accuracy {result.test_accuracy:.4f}" if result.test_accuracy is not None else ""
        loss = f"final loss {result.final_loss:.4f}" if result.final_loss is not None else "no steps"
        start = f" (resumed at step {result.resumed_from})" if result.resumed_from is not None else ""
        procs = f" x {d.world_size} processes ({d.mode})" if d is not None else ""
        print(f"\n{result.steps} steps{start} in {result.seconds:.1f} s on {result.device}{procs} (backend "
              f"{result.backend}): {loss}{acc}; outputs in {result.out}")
    return 0


def _plot(args: argparse.Namespace) -> int:
    experiments = plot_record(args.record, args.out)
    if not args.quiet:
        print(format_table(experiments))
        print(f"\n{len(experiments)} figures in {Path(args.out)}")
    return 0


# -- the parser ------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Neural Mechanics with a fused SGD: train, record, compare with theory.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{demo,train,plot}", parser_class=_Parser)
    sub.required = True

    def common(p: argparse.ArgumentParser, suppress: bool) -> None:
        d = (lambda v: argparse.SUPPRESS) if suppress else (lambda v: v)
        p.add_argument("--backend", default=d("auto"), help="nm_optim.SGD backend: auto, reference, cpu, cuda (default: auto)")
        p.add_argument("--device", default=d("auto"), help="auto (cuda when present), cpu, cuda, cuda:N (default: auto)")
        p.add_argument("--seed", type=int, default=d(0), help="initialisation and data order (default: 0)")

    def quiet(p: argparse.ArgumentParser) -> None:
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        p.add_argument("--quiet", "-q", action="store_true", help="print nothing on success")

    demo = sub.add_parser("demo", help="the paper's theory-vs-experiment figures on scikit-learn's digits",
                          description="Train small VGG-style nets on scikit-learn's digits and draw the paper's "
                                      "theory-vs-experiment figures (translation, scale, rescale, momentum oscillation).")
    demo.add_argument("--out", default="nm_optim_demo", help="output folder (default: nm_optim_demo)")
    demo.add_argument("--steps", type=int, default=None, help=f"steps per training run (default: {DEMO_STEPS})")
    demo.add_argument("--full", action="store_true",
                      help="also VGG-16-BN on the digits at 32x32: per-layer norms over training, the paper's "
                           "first figure (minutes on a CPU)")
    demo.add_argument("--transformer", action="store_true",
                      help="instead: a char-level transformer on the standard library's source, the laws of its "
                           "attention, MLP, norm and head symmetries (about a minute on a CPU)")
    demo.add_argument("--full-steps", type=int, default=FULL_STEPS, help=f"steps of the --full run (default: {FULL_STEPS})")
    common(demo, suppress=False)
    quiet(demo)
    demo.set_defaults(func=_demo)

    defaults = TrainConfig()
    tr = sub.add_parser("train", help="train a model of the zoo on your data, record its symmetries",
                        description="Train with nm_optim.SGD, record every symmetry's statistics, checkpoint, and "
                                    "write the record, summary.json and figures to --out. --resume continues bit-identically.")
    S = argparse.SUPPRESS  # an option not given is absent, so --resume can tell it from a default
    tr.add_argument("--model", default=S, help="vgg16, vgg16_bn, resnet18, mlp, small_vgg, small_vgg_bn")
    tr.add_argument("--data", default=S, help="digits, cifar10:DIR (python pickle batches), imagefolder:DIR (class subfolders)")
    tr.add_argument("--lr", type=float, default=S, help=f"learning rate (default: {defaults.lr})")
    tr.add_argument("--momentum", type=float, default=S, help=f"default: {defaults.momentum}")
    tr.add_argument("--dampening", type=float, default=S, help=f"default: {defaults.dampening}")
    tr.add_argument("--weight-decay", type=float, default=S, help=f"default: {defaults.weight_decay}")
    tr.add_argument("--nesterov", action="store_const", const=True, default=S, help="Nesterov momentum")
    tr.add_argument("--batch-size", type=int, default=S, help=f"default: {defaults.batch_size}")
    length = tr.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, default=S, help="epochs (the last partial batch dropped; default: 1)")
    length.add_argument("--steps", type=int, default=S, help="optimizer steps (instead of --epochs)")
    tr.add_argument("--image-size", type=int, default=S, help="ImageFolder images are resized to this (default: 64)")
    tr.add_argument("--record-every", type=int, default=S, help=f"record every N-th step (default: {defaults.record_every})")
    tr.add_argument("--checkpoint-every", type=int, default=S,
                    help=f"checkpoint every N steps, and at the end; 0: never (default: {DEFAULT_CHECKPOINT_EVERY})")
    tr.add_argument("--out", required=True,
                    help="output folder: record/ (streamed), record.npz, checkpoint.pt, summary.json, figures")
    tr.add_argument("--resume", action="store_true", help="continue the run checkpointed in --out")
    tr.add_argument("--record-dtype", choices=("float64", "float32"), default="float64",
                    help="how OUT/record/ stores the sums; float32 halves it, each sum rounded to ~6e-8 relative "
                         "(default: float64; a resumed run keeps its record's)")
    tr.add_argument("--workers", type=int, default=None, metavar="N",
                    help="processes decoding batches ahead of the step (default: the cores available for "
                         "imagefolder:DIR, 0 for data held in memory); the data order is the same with any N")
    tr.add_argument("--tensorboard", metavar="DIR", default=None,
                    help="write TensorBoard scalars to DIR: norms of params, gradients and momentum, each "
                         "symmetry's conserved quantity, hyper-parameters, loss (pip install 'nm_optim[tensorboard]')")
    tr.add_argument("--tensorboard-every", type=int, default=10, metavar="N",
                    help="steps between TensorBoard entries (default: 10)")
    tr.add_argument("--distributed", choices=dist_app.MODES, default=None,
                    help="train on the processes torchrun launched (torchrun --nproc-per-node N -m nm_optim train "
                         "... --distributed ddp): ddp (DistributedDataParallel) or fsdp (FSDP2 fully_shard); gloo "
                         "on CPU, NCCL on GPU. --batch-size is the global batch (a multiple of the process count); "
                         "rank 0 writes --out; a checkpoint resumes on any number of processes")
    common(tr, suppress=True)
    quiet(tr)
    tr.set_defaults(func=_train)

    pl = sub.add_parser("plot", help="redraw the figures of a saved record",
                        description="Redraw the theory-vs-experiment figures of a record written by nm-optim or Record.save.")
    pl.add_argument("record", help="a record file (.npz)")
    pl.add_argument("--out", required=True, help="output folder for the figures")
    quiet(pl)
    pl.set_defaults(func=_plot)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 user error, 2 bad options,
    130 interrupted). A torchrun worker that joined the run's process group does not return:
    it ends with that status through app.distributed.end_process (see there why)."""
    code = _main(argv)
    if dist_app.joined():
        dist_app.end_process(code)
    return code


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error already printed
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    try:
        return args.func(args)
    except (UserError, RecordError) as e:
        # one line whatever the message quotes (a value read from a file may print on several)
        print(f"{PROG}: error: {' '.join(str(e).splitlines())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        out = getattr(args, "out", None)
        hint = f"; continue from the last checkpoint with: {PROG} train --out {out} --resume" if args.command == "train" else ""
        print(f"{PROG}: interrupted{hint}", file=sys.stderr)
        return 130
    except ImportError as e:
        # An optional dependency the user has not installed (nm_optim.plot re-raises matplotlib's
        # ImportError with a hint: the module's name is on the cause); anything else is a bug to show.
        root = (e.name or getattr(e.__cause__, "name", None) or "").partition(".")[0]
        if root not in _OPTIONAL:
            raise
        print(f"{PROG}: error: this needs {_OPTIONAL[root]}, which is not installed: "
              f"pip install 'nm_optim[{_EXTRA.get(root, 'demo')}]'", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
