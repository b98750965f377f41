"""`nm-optim demo`: the paper's theory-vs-experiment figures (Kunin et al., ICLR 2021: translation,
scale, rescale, and the damped oscillation under momentum) from small VGG-style nets trained on
scikit-learn's digits, which ship with scikit-learn (no download).

    OUT/<experiment>.png      one figure per DemoExperiment (theory over measurement, residuals under it)
    OUT/records/<run>.npz     the record of every DemoRun
    OUT/summary.json          report.summary_dict + "runs" + "seconds"

With ``full=True`` (``nm-optim demo --full``) it also trains VGG-16-BN on the digits resized to
32x32 (FULL_STEPS steps, lr 0.01, momentum 0.9, weight decay 5e-4) and draws the per-layer norms
over training in the style of the paper's first figure (OUT/vgg16_bn_layers.png, its record in
OUT/records/vgg16_bn.npz and its errors as one more experiment); minutes on a CPU.
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
from nm_optim.app.data import DataError, Split, TensorData, load_digits
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
    oscillation: bool = False  # the momentum-oscillation panel of `symmetry` next to it
    baseline: bool = False  # the conserved constant (gradient flow) dotted
    normalize: bool = False  # every group divided by its initial value


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
# a period of 2 pi / omega / lr = 443 steps; translation's omega_T = 1.00 > gamma: a period of about
# 724 steps, the column sums swing through zero once. Without weight decay and momentum the scale
# norms only grow, by exactly lr^2 |g|^2 a step: the finite learning rate alone.
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
    DemoRun("no_wd_bn", "small_vgg_bn", lr=0.3, momentum=0.0, weight_decay=0.0, experiments=(
        DemoExperiment("norm_growth", "scale", "Scale without weight decay: |θ_A|² grows by lr²|g_A|² a step "
                       "(the finite learning rate alone; dotted: conserved under gradient flow)", baseline=True,
                       normalize=True),
    )),
    DemoRun("underdamped_bn", "small_vgg_bn", lr=0.01, momentum=0.99, weight_decay=1e-2, experiments=(
        DemoExperiment("momentum_oscillation", "scale", "Scale under momentum 0.99: a damped oscillation", oscillation=True),
        DemoExperiment("translation_oscillation", "translation",
                       "Translation under momentum 0.99: the column sums oscillate (underdamped)", oscillation=True),
    )),
)


FULL_STEPS = 300
FULL_IMAGE_SIZE = 32
FULL_RUN = DemoRun("vgg16_bn", "vgg16_bn", lr=0.01, momentum=0.9, weight_decay=5e-4, experiments=())


def digits_resized(digits: Split, size: int) -> Split:
    """The digits upsampled (bilinear) to size x size, for models that pool down five times."""
    def resize(part):
        if part is None:
            return None
        images = torch.nn.functional.interpolate(part.images.to(torch.float32), size=(size, size), mode="bilinear",
                                                 align_corners=False)
        return TensorData(f"{part.name}@{size}", images, part.labels, part.classes, part.mean, part.std, part.scale)

    return Split(resize(digits.train), resize(digits.test))


def run_demo(
    out: str | os.PathLike,
    *,
    steps: int = DEMO_STEPS,
    backend: str = "auto",
    device: str = "auto",
    seed: int = 0,
    progress: bool = True,
    full: bool = False,
    full_steps: int = FULL_STEPS,
) -> dict[str, Any]:
    """Train every run of DEMO_RUNS for `steps` steps and write its figures, records and
    summary.json into `out`; with `full`, also VGG-16-BN's per-layer figure (`full_steps`
    steps). Returns the summary."""
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
        if full:
            runs.append(_full_run(digits, out, experiments, steps=full_steps, backend=backend, device=device,
                                  seed=seed, progress=progress))
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
                             oscillation=exp.oscillation, baseline=exp.baseline, normalize=exp.normalize)
        experiments.append(experiment_entry(exp.name, exp.symmetry, result.config.to_dict(), result.steps,
                                            errors[exp.symmetry], figure.name, record=record_name))
    return run_entry(result, record_name, name=run.name, with_device=True)


def _full_run(digits: Split, out: Path, experiments: list[dict[str, Any]], *, steps: int, backend: str, device: str,
              seed: int, progress: bool) -> dict[str, Any]:
    """VGG-16-BN on the digits at 32x32: the per-layer norms figure (the paper's first figure)."""
    from nm_optim import plot

    run = FULL_RUN
    config = TrainConfig(
        model=run.model, data="digits", lr=run.lr, momentum=run.momentum, weight_decay=run.weight_decay,
        batch_size=DEMO_BATCH_SIZE, steps=steps, backend=backend, device=device, seed=seed,
    )
    result = train(config, None, data=digits_resized(digits, FULL_IMAGE_SIZE), progress=progress,
                   desc=f"demo --full {run.name}", write_outputs=False)
    record_name = f"records/{run.name}.npz"
    result.record.save(out / record_name)
    comparison = compare_record(result.record)
    figure = out / f"{run.name}_layers.png"
    plot.layer_norms(comparison, path=figure, title=f"VGG-16-BN on digits at {FULL_IMAGE_SIZE}x{FULL_IMAGE_SIZE}: "
                     f"lr {run.lr}, momentum {run.momentum}, weight decay {run.weight_decay}, {steps} steps")
    errors = compare_by_kind(comparison)
    if "scale" in errors:
        experiments.append(experiment_entry(f"{run.name}_layers", "scale", result.config.to_dict(), result.steps,
                                            errors["scale"], figure.name, record=record_name))
    entry = run_entry(result, record_name, name=run.name, with_device=True)
    entry["image_size"] = FULL_IMAGE_SIZE
    return entry
