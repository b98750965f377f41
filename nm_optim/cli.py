"""The `nm-optim` command line: `demo`, `train` and `plot`.

    nm-optim demo [--out DIR] [--steps N] [--backend B] [--device D]
    nm-optim train --model vgg16_bn --data imagefolder:~/tiny-imagenet-200 --lr 0.1 --epochs 10 --out runs/vgg
    nm-optim train --out runs/vgg --resume            # continue from runs/vgg/checkpoint.pt
    nm-optim plot runs/vgg/record.npz --out figures/

A user mistake (a missing or malformed data folder, an unknown model, an unwritable output
folder, a bad option) ends with one line on stderr, ``nm-optim: error: ...``, and exit status 1
(2 for malformed options, as argparse does); never with a traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nm_optim.train import TrainConfig, UserError

PROG = "nm-optim"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the usage is one --help away)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# -- demo ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoExperiment:
    name: str  # also the figure's file name
    symmetry: str
    title: str
    oscillation: bool = False


@dataclass(frozen=True)
class DemoRun:
    """One training run of the demo and the figures drawn from its record."""

    name: str
    model: str
    lr: float
    momentum: float
    weight_decay: float
    experiments: tuple[DemoExperiment, ...]


# Digits: 1437 training images of 8x8, batches of 64 (22 steps an epoch). Weight decay is large
# next to what one would train with, so the decay the theory predicts is visible within a few
# hundred steps. The underdamped setting: momentum 0.99 at h = lr = 0.01, weight decay 0.01 gives
# gamma = (1-b)/(h(1+b)) = 0.50 < omega_scale = sqrt(4 wd / (h(1+b))) = 1.42 (time t = lr * step):
# a period of 2 pi / omega / lr = 443 steps.
DEMO_BATCH_SIZE = 64
DEMO_STEPS = 1000
DEMO_RUNS = (
    DemoRun("sgd", "small_vgg", lr=0.1, momentum=0.0, weight_decay=5e-3, experiments=(
        DemoExperiment("translation", "translation", "Translation (SGD + weight decay, no BatchNorm)"),
        DemoExperiment("rescale", "rescale", "Rescale (SGD + weight decay, no BatchNorm)"),
    )),
    DemoRun("sgd_bn", "small_vgg_bn", lr=0.1, momentum=0.0, weight_decay=5e-3, experiments=(
        DemoExperiment("scale", "scale", "Scale (SGD + weight decay, BatchNorm)"),
    )),
    DemoRun("momentum", "small_vgg", lr=0.01, momentum=0.9, weight_decay=5e-3, experiments=(
        DemoExperiment("rescale_momentum", "rescale", "Rescale (momentum 0.9, no BatchNorm)"),
    )),
    DemoRun("momentum_bn", "small_vgg_bn", lr=0.01, momentum=0.9, weight_decay=5e-3, experiments=(
        DemoExperiment("translation_momentum", "translation", "Translation (momentum 0.9, BatchNorm)"),
        DemoExperiment("scale_momentum", "scale", "Scale (momentum 0.9, BatchNorm)"),
    )),
    DemoRun("underdamped_bn", "small_vgg_bn", lr=0.01, momentum=0.99, weight_decay=1e-2, experiments=(
        DemoExperiment("momentum_oscillation", "scale", "Scale under momentum 0.99: a damped oscillation", oscillation=True),
    )),
)


def _demo(args: argparse.Namespace) -> int:
    from nm_optim import train as T
    from nm_optim.data import DataError, load_digits

    out = T.check_writable(args.out)
    _require_demo_modules()
    try:
        digits = load_digits()
    except DataError as e:
        raise UserError(str(e)) from e
    started = time.perf_counter()
    experiments: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    device = backend = ""
    # The demo's nets have 16K parameters and batches of 64x8x8: intra-op threads only add
    # synchronisation, which on a loaded 2-core machine cost 10x (300 ms/step with 2 threads,
    # 27 ms with 1, measured side by side).
    threads = torch.get_num_threads()
    if T.resolve_device(args.device).type == "cpu":
        torch.set_num_threads(1)
    try:
        for i, run in enumerate(DEMO_RUNS, 1):
            _demo_run(args, out, digits, i, run, experiments, runs)
    finally:
        torch.set_num_threads(threads)
    device, backend = runs[-1]["device"], runs[-1]["backend"]
    summary = T.summary_dict(backend, device, experiments)
    summary["runs"] = runs
    summary["seconds"] = round(time.perf_counter() - started, 3)
    T.write_json(out / T.SUMMARY_NAME, summary)
    if not args.quiet:
        print(T.format_table(experiments))
        print(f"\n{len(experiments)} experiments in {summary['seconds']:.1f} s on {device} (backend {backend}); "
              f"figures, records and summary.json in {out}")
    return 0


def _demo_run(args, out, digits, i: int, run: DemoRun, experiments: list, runs: list) -> None:
    from nm_optim import train as T

    config = TrainConfig(
        model=run.model, data="digits", lr=run.lr, momentum=run.momentum, weight_decay=run.weight_decay,
        batch_size=DEMO_BATCH_SIZE, steps=args.steps, backend=args.backend, device=args.device, seed=args.seed,
    )
    result = T.train(config, None, data=digits, progress=not args.no_progress,
                     desc=f"demo {i}/{len(DEMO_RUNS)} {run.name}", write_outputs=False)
    record_name = f"records/{run.name}.npz"
    result.record.save(out / record_name)
    comparison = T.compare_record(result.record)
    errors = T.compare_by_kind(comparison)
    for exp in run.experiments:
        if exp.symmetry not in errors:
            raise RuntimeError(f"demo: model {run.model} shows no {exp.symmetry} symmetry (found: {sorted(errors)})")
        figure = T.draw_figure(comparison, exp.symmetry, out / f"{exp.name}.png", title=exp.title, oscillation=exp.oscillation)
        entry = T.experiment_entry(exp.name, exp.symmetry, config, result.steps, errors[exp.symmetry], figure.name)
        entry["record"] = record_name
        experiments.append(entry)
    runs.append({"name": run.name, **T.run_entry(result, record_name), "device": result.device,
                 "backend": result.backend})


def _require_demo_modules() -> None:
    """The demo needs the symmetry detector, the model zoo and the theory; say so plainly when
    this build lacks one, or when an optional dependency is missing."""
    import importlib

    for module, what in (("nm_optim.symmetry", "symmetry detection"), ("nm_optim.models", "the model zoo"),
                         ("nm_optim.theory", "the theory"), ("nm_optim.plot", "the figures")):
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise UserError(f"{what} ({module}) is not available: {e}") from e
    for dist, module in (("scikit-learn", "sklearn"), ("matplotlib", "matplotlib")):
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise UserError(f"the demo needs {dist}: pip install 'nm_optim[demo]'") from e


# -- train ---------------------------------------------------------------------------------------------

_TRAIN_OPTIONS = ("model", "data", "lr", "momentum", "dampening", "weight_decay", "nesterov", "batch_size",
                  "steps", "epochs", "image_size", "backend", "device", "seed", "record_every", "checkpoint_every")


def _train(args: argparse.Namespace) -> int:
    from nm_optim import train as T

    given = {k: getattr(args, k) for k in _TRAIN_OPTIONS if hasattr(args, k)}
    if args.resume:
        T.check_writable(args.out)
        config = T.resume_config(args.out, given)
    else:
        missing = [f"--{k}" for k in ("model", "data") if k not in given]
        if missing:
            raise UserError(f"train needs {' and '.join(missing)} (or --resume to continue a run in --out)")
        given.setdefault("checkpoint_every", DEFAULT_CHECKPOINT_EVERY)
        config = TrainConfig(**given)
        if config.steps is None and config.epochs is None:
            config.epochs = 1
    result = T.train(config, args.out, resume=args.resume, progress=not args.no_progress)
    if not args.quiet:
        import json

        summary = json.loads((result.out / T.SUMMARY_NAME).read_text())
        print(summary["note"] if "note" in summary else T.format_table(summary["experiments"]))
        acc = f", test accuracy {result.test_accuracy:.4f}" if result.test_accuracy is not None else ""
        loss = f"final loss {result.final_loss:.4f}" if result.final_loss is not None else "no steps"
        start = f" (resumed at step {result.resumed_from})" if result.resumed_from is not None else ""
        print(f"\n{result.steps} steps{start} in {result.seconds:.1f} s on {result.device} (backend {result.backend}): "
              f"{loss}{acc}; outputs in {result.out}")
    return 0


DEFAULT_CHECKPOINT_EVERY = 1000


# -- plot ----------------------------------------------------------------------------------------------


def _plot(args: argparse.Namespace) -> int:
    import nm_optim
    from nm_optim import train as T

    path = Path(args.record)
    if not path.is_file():
        raise UserError(f"record {path} does not exist" if not path.exists() else f"record {path} is not a file")
    try:
        record = nm_optim.load_record(path)
    except Exception as e:
        raise UserError(f"cannot read record {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    if not record.meta.get("symmetries"):
        raise UserError(f"record {path} holds no symmetries (it was not recorded with nm_optim.SGD(..., symmetries=...))")
    out = T.check_writable(args.out)
    _require_demo_modules()
    comparison = T.compare_record(record)
    errors = T.compare_by_kind(comparison)
    cfg = record.meta.get("training", {}).get("config", {})
    experiments = []
    figures = [(kind, kind, False) for kind in errors]
    oscillating = [k for k in ("scale", "rescale") if k in errors and _underdamped(comparison, k)]
    if oscillating:
        figures.append(("momentum_oscillation", oscillating[0], True))
    for name, kind, oscillation in figures:
        figure = T.draw_figure(comparison, kind, out / f"{path.stem}-{name}.png", title=f"{path.stem}: {name}",
                               oscillation=oscillation)
        e = errors[kind]
        experiments.append({
            "name": f"{path.stem}/{name}", "symmetry": kind, "model": cfg.get("model"),
            "optimizer": {k: cfg.get(k) for k in T.OPTIMIZER_KEYS} if cfg else None,
            "steps": len(record), "num_groups": e["num_groups"],
            "exact_max_rel_err": e["exact_max_rel_err"], "paper_max_rel_err": e["paper_max_rel_err"],
            "figure": figure.name,
        })
    if not args.quiet:
        print(T.format_table(experiments))
        print(f"\n{len(experiments)} figures in {out}")
    return 0


def _underdamped(comparison, kind: str) -> bool:
    """Whether the theory of `kind` oscillates (gamma < omega: theory.Segment.regime) anywhere."""
    return any(seg.regime == "underdamped" for p in comparison.predictions if p.kind == kind for seg in p.segments)


# -- the parser ------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from nm_optim import __version__

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
    demo.add_argument("--steps", type=int, default=DEMO_STEPS, help=f"steps per training run (default: {DEMO_STEPS})")
    common(demo, suppress=False)
    quiet(demo)
    demo.set_defaults(func=_demo)

    defaults = TrainConfig()
    tr = sub.add_parser("train", help="train a model of the zoo on your data, record its symmetries",
                        description="Train with nm_optim.SGD, record every symmetry's statistics, checkpoint, and "
                                    "write the record, summary.json and figures to --out. --resume continues bit-identically.")
    S = argparse.SUPPRESS
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
    tr.add_argument("--out", required=True, help="output folder: record.npz, checkpoint.pt, summary.json, figures")
    tr.add_argument("--resume", action="store_true", help="continue the run checkpointed in --out")
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
    130 interrupted)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error already printed
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    try:
        return args.func(args)
    except UserError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        out = getattr(args, "out", None)
        hint = f"; continue from the last checkpoint with: {PROG} train --out {out} --resume" if args.command == "train" else ""
        print(f"{PROG}: interrupted{hint}", file=sys.stderr)
        return 130
    except ImportError as e:
        # An optional dependency the user has not installed; anything else is a bug to show.
        root = (e.name or "").partition(".")[0]
        if root not in _OPTIONAL:
            raise
        print(f"{PROG}: error: this needs {_OPTIONAL[root]}, which is not installed: "
              f"pip install 'nm_optim[demo]'", file=sys.stderr)
        return 1


_OPTIONAL = {"matplotlib": "matplotlib", "sklearn": "scikit-learn", "PIL": "Pillow", "tqdm": "tqdm"}


if __name__ == "__main__":
    sys.exit(main())
