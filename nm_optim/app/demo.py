"""`nm-optim demo`: the paper's theory-vs-experiment figures (Kunin et al., ICLR 2021: translation,
scale, rescale, and the damped oscillation under momentum) from small VGG-style nets trained on
scikit-learn's digits, which ship with scikit-learn (no download).

    OUT/<experiment>.png      one figure per DemoExperiment
    OUT/records/<run>.npz     the record of every DemoRun
    OUT/summary.json          report.summary_dict + "runs" + "seconds"
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nm_optim.app.config import (
    TrainConfig,
    TrainResult,
    UserError,
    check_writable,
    resolve_device,
)
from nm_optim.app.data import DataError, load_digits
from nm_optim.app.loop import train
from nm_optim.app.report import (
    SUMMARY_NAME,
    compare_by_kind,
    compare_record,
    draw_figure,
    experiment_entry,
    run_entry,
    summary_dict,
    write_json,
)


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


def run_demo(
    out: str | os.PathLike,
    *,
    steps: int = DEMO_STEPS,
    backend: str = "auto",
    device: str = "auto",
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Train every run of DEMO_RUNS for `steps` steps and write its figures, records and
    summary.json into `out`; returns the summary."""
    out = check_writable(out)
    # The figures need matplotlib (an optional extra): fail now, not after minutes of training.
    # The command line turns this ImportError into one line naming `pip install 'nm_optim[demo]'`.
    import matplotlib  # noqa: F401

    try:
        digits = load_digits()
    except DataError as e:
        raise UserError(str(e)) from e
    started = time.perf_counter()
    experiments: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    # The demo's nets have 16K parameters and batches of 64x8x8: intra-op threads only add
    # synchronisation, which on a loaded 2-core machine cost 10x (300 ms/step with 2 threads,
    # 27 ms with 1, measured side by side).
    threads = torch.get_num_threads()
    if resolve_device(device).type == "cpu":
        torch.set_num_threads(1)
    try:
        for i, run in enumerate(DEMO_RUNS, 1):
            config = TrainConfig(
                model=run.model, data="digits", lr=run.lr, momentum=run.momentum, weight_decay=run.weight_decay,
                batch_size=DEMO_BATCH_SIZE, steps=steps, backend=backend, device=device, seed=seed,
            )
            result = train(config, None, data=digits, progress=progress, desc=f"demo {i}/{len(DEMO_RUNS)} {run.name}",
                           write_outputs=False)
            runs.append(_report_run(run, result, out, experiments))
    finally:
        torch.set_num_threads(threads)
    summary = summary_dict(runs[-1]["backend"], runs[-1]["device"], experiments)
    summary["runs"] = runs
    summary["seconds"] = round(time.perf_counter() - started, 3)
    write_json(out / SUMMARY_NAME, summary)
    return summary


def _report_run(run: DemoRun, result: TrainResult, out: Path, experiments: list[dict[str, Any]]) -> dict[str, Any]:
    """Save a trained run's record and draw its figures (appending their entries to
    `experiments`); returns its run entry."""
    record_name = f"records/{run.name}.npz"
    result.record.save(out / record_name)
    comparison = compare_record(result.record)
    errors = compare_by_kind(comparison)
    for exp in run.experiments:
        if exp.symmetry not in errors:
            raise RuntimeError(f"demo: model {run.model} shows no {exp.symmetry} symmetry (found: {sorted(errors)})")
        figure = draw_figure(comparison, exp.symmetry, out / f"{exp.name}.png", title=exp.title,
                             oscillation=exp.oscillation)
        experiments.append(experiment_entry(exp.name, exp.symmetry, result.config.to_dict(), result.steps,
                                            errors[exp.symmetry], figure.name, record=record_name))
    return run_entry(result, record_name, name=run.name, with_device=True)
