"""`nm-optim demo`: the paper's theory-vs-experiment figures (Kunin et al., ICLR 2021: translation,
scale, rescale, and the damped oscillation under momentum) from small VGG-style nets trained on
scikit-learn's digits, which ship with scikit-learn (no download).

    OUT/<experiment>.png      one figure per DemoExperiment (theory over measurement, residuals under it)
    OUT/records/<run>.npz     the record of every DemoRun
    OUT/summary.json          report.summary_dict + "collapse" (the collapse runs' errors) + "runs" + "seconds"

    OUT/translation_collapse.png  plain SGD at several learning rates and on shuffled labels: the
                              translation sums collapse onto e^{-λt} at matched t = η·k

With ``full=True`` (``nm-optim demo --full``) it also trains, on the digits resized to 32x32 and
with every core torch is allowed: VGG-16-BN (FULL_STEPS steps) for the per-layer, per-neuron
norms of the paper's VGG figure (OUT/vgg16_bn_layers.png), and VGG-16 without BatchNorm under
momentum 0.99 (FULL_MOMENTUM_STEPS steps) for the paper's momentum figure, the final layer's
column sums oscillating (OUT/vgg16_momentum.png). Before it starts it times two steps of each
model here and prints its estimate; the defaults take about 13 minutes on 2 busy cores.
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
from nm_optim.models import get_model
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
# hundred steps. The underdamped settings (time t = lr * step; the period of a damped oscillator
# is 2 pi / sqrt(omega^2 - gamma^2), gamma = (1-b)/(h(1+b)), omega^2 = 4 wd/(h(1+b)) for scale
# and 2 wd/(h(1+b)) for translation, h = lr):
# - scale, momentum 0.995, lr 0.01, weight decay 0.02: gamma = 0.25, omega = 2.00, a period of
#   2 pi / 1.99 / lr = 316 steps, damped by e^{-gamma * 3.16} = 0.45 a period: three periods in
#   1000 steps;
# - translation (no BatchNorm, the paper's momentum figure), momentum 0.99, lr 0.01, weight decay
#   0.05: gamma = 0.50, omega = 2.24, a period of 2 pi / 2.18 / lr = 288 steps.
# Without weight decay and momentum the scale norms only grow, by exactly lr^2 |g|^2 a step: the
# finite learning rate alone. test_demo.py checks these numbers against theory.oscillator_parameters.
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
    DemoRun("underdamped", "small_vgg", lr=0.01, momentum=0.99, weight_decay=5e-2, experiments=(
        DemoExperiment("translation_oscillation", "translation",
                       "Translation under momentum 0.99 (no BatchNorm): the final layer's column sums oscillate",
                       oscillation=True),
    )),
    DemoRun("underdamped_bn", "small_vgg_bn", lr=0.01, momentum=0.995, weight_decay=2e-2, experiments=(
        DemoExperiment("momentum_oscillation", "scale", "Scale under momentum 0.995: a damped oscillation", oscillation=True),
    )),
)

# Translation's independence of the learning rate and of the data: plain SGD on an MLP (the law is
# the classifier's alone; an MLP step is cheap), weight decay COLLAPSE_WD, each run to the same
# continuous time t = lr * steps = COLLAPSE_TIME; one run on labels shuffled once (no signal).
COLLAPSE_WD = 0.02
COLLAPSE_TIME = 40.0
COLLAPSE_RUNS = ((0.1, False), (0.05, False), (0.02, False), (0.05, True))  # (lr, shuffled labels)


FULL_STEPS = 40
FULL_MOMENTUM_STEPS = 100
FULL_IMAGE_SIZE = 32
FULL_BATCH_SIZE = 16
FULL_RUN = DemoRun("vgg16_bn", "vgg16_bn", lr=0.01, momentum=0.9, weight_decay=5e-4, experiments=())
# The paper's momentum figure on a CPU budget: a period of 2 pi / sqrt(omega_T^2 - gamma^2) / lr
# steps is thousands of steps at weight decay 5e-4; at lr 0.002, momentum 0.99 and weight decay 4.5
# (gamma = 2.5, omega_T = 47.6, h·omega_T = 0.095: still inside the continuous form's validity) it
# is 66 steps, damped by 0.72 a period, so one and a half periods fit in FULL_MOMENTUM_STEPS: what
# 2 cores allow in the 15 minutes --full is given (about 5 s a VGG-16 step at batch 16). The
# column sums' law does not depend on the data: only the time scale is compressed.
FULL_MOMENTUM_RUN = DemoRun("vgg16_momentum", "vgg16", lr=0.002, momentum=0.99, weight_decay=4.5, experiments=(
    DemoExperiment("vgg16_momentum", "translation",
                   "VGG-16 without BatchNorm, momentum 0.99: the final layer's column sums oscillate",
                   oscillation=True),
))


def shuffled(digits: Split, seed: int = 0) -> Split:
    """The digits with their training labels permuted once (the test set kept): no signal left."""
    train_part = digits.train
    perm = torch.randperm(len(train_part.labels), generator=torch.Generator().manual_seed(seed))
    return Split(TensorData(f"{train_part.name}-shuffled", train_part.images, train_part.labels[perm],
                            train_part.classes, train_part.mean, train_part.std, train_part.scale), digits.test)


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
    full_momentum_steps: int = FULL_MOMENTUM_STEPS,
) -> dict[str, Any]:
    """Train every run of DEMO_RUNS for `steps` steps and write its figures, records and
    summary.json into `out`, then the translation-collapse runs (scaled by steps / DEMO_STEPS);
    with `full`, also VGG-16-BN's per-layer figure (`full_steps` steps) and VGG-16's momentum
    figure (`full_momentum_steps`), after printing an estimate of their time. Returns the summary."""
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
    collapse: list[dict[str, Any]] = []  # kept apart: "experiments" is one entry per DemoExperiment
    runs: list[dict[str, Any]] = []
    if full:  # before anything else: the user decides now whether to wait
        _print_estimate(full_steps, full_momentum_steps, device)
    # The demo's small nets have 16K parameters and batches of 64x8x8: intra-op threads only add
    # synchronisation, which on a loaded 2-core machine cost 10x (300 ms/step with 2 threads,
    # 27 ms with 1, measured side by side). VGG-16 (--full) is the opposite: it gets every core.
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
        runs += _collapse_runs(digits, out, collapse, scale=steps / DEMO_STEPS, backend=backend, device=device,
                               seed=seed, progress=progress)
    finally:
        torch.set_num_threads(threads)
    if full:
        runs.append(_full_run(digits, out, experiments, steps=full_steps, backend=backend, device=device,
                              seed=seed, progress=progress))
        runs.append(_full_momentum_run(digits, out, experiments, steps=full_momentum_steps, backend=backend,
                                       device=device, seed=seed, progress=progress))
    summary = summary_dict(runs[-1]["backend"], runs[-1]["device"], experiments)
    summary["collapse"] = collapse
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


def _collapse_runs(digits: Split, out: Path, experiments: list[dict[str, Any]], *, scale: float, backend: str,
                   device: str, seed: int, progress: bool) -> list[dict[str, Any]]:
    """COLLAPSE_RUNS, each to t = COLLAPSE_TIME (times `scale`), and their figure: the translation
    sums of every run over t = lr·k against e^{-λt}. One experiment entry per run."""
    from nm_optim import plot

    curves, entries = [], []
    for i, (lr, shuffle) in enumerate(COLLAPSE_RUNS, 1):
        steps = max(round(COLLAPSE_TIME * scale / lr), 2)
        name = f"collapse_lr{lr:g}" + ("_shuffled" if shuffle else "")
        config = TrainConfig(model="mlp", data="digits", lr=lr, weight_decay=COLLAPSE_WD, batch_size=DEMO_BATCH_SIZE,
                             steps=steps, backend=backend, device=device, seed=seed)
        result = train(config, None, data=shuffled(digits) if shuffle else digits, progress=progress,
                       desc=f"demo collapse {i}/{len(COLLAPSE_RUNS)} {name}", write_outputs=False)
        record_name = f"records/{name}.npz"
        result.record.save(out / record_name)
        comparison = compare_record(result.record)
        curves.append(("shuffled labels" if shuffle else "digits", comparison))
        errors = compare_by_kind(comparison)["translation"]
        experiments.append(experiment_entry(name, "translation", result.config.to_dict(), result.steps, errors,
                                            "translation_collapse.png", record=record_name))
        entries.append(run_entry(result, record_name, name=name, with_device=True))
    plot.translation_collapse(curves, path=out / "translation_collapse.png",
                              title=f"Translation, plain SGD, weight decay {COLLAPSE_WD:g}: the classifier's column "
                                    "sums at every lr and on shuffled labels follow e^(−λt), t = η·k")
    return entries


def _print_estimate(full_steps: int, momentum_steps: int, device: str) -> float:
    """Time two steps of VGG-16-BN and of VGG-16 here (forward, backward, nm_optim.SGD with
    their symmetries tracked; the second step counts) and print what --full will take."""
    import nm_optim

    dev = resolve_device(device)
    per_step = []
    for run in (FULL_RUN, FULL_MOMENTUM_RUN):
        batch = FULL_BATCH_SIZE
        torch.manual_seed(0)
        model = get_model(run.model, num_classes=10, in_channels=1, image_size=FULL_IMAGE_SIZE).to(dev)
        x = torch.randn(batch, 1, FULL_IMAGE_SIZE, FULL_IMAGE_SIZE, device=dev)
        y = torch.randint(0, 10, (batch,), device=dev)
        syms = nm_optim.find_symmetries(model, x[:2], loss=torch.nn.functional.cross_entropy)
        opt = nm_optim.SGD(model.named_parameters(), lr=run.lr, momentum=run.momentum, symmetries=syms)
        for _ in range(2):
            t0 = time.perf_counter()
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            dt = time.perf_counter() - t0
        per_step.append(dt)
    total = per_step[0] * full_steps + per_step[1] * momentum_steps
    print(f"demo --full: VGG-16-BN {full_steps} steps ({per_step[0]:.2f} s/step here) and VGG-16 {momentum_steps} "
          f"steps ({per_step[1]:.2f} s/step), batch {FULL_BATCH_SIZE}, {torch.get_num_threads()} threads: about "
          f"{total / 60:.0f} minutes after the small runs", flush=True)
    return total


def _full_run(digits: Split, out: Path, experiments: list[dict[str, Any]], *, steps: int, backend: str, device: str,
              seed: int, progress: bool) -> dict[str, Any]:
    """VGG-16-BN on the digits at 32x32: the per-layer, per-neuron norms (the paper's VGG figure)."""
    from nm_optim import plot

    run = FULL_RUN
    config = TrainConfig(
        model=run.model, data="digits", lr=run.lr, momentum=run.momentum, weight_decay=run.weight_decay,
        batch_size=FULL_BATCH_SIZE, steps=steps, backend=backend, device=device, seed=seed,
    )
    result = train(config, None, data=digits_resized(digits, FULL_IMAGE_SIZE), progress=progress,
                   desc=f"demo --full {run.name}", write_outputs=False)
    record_name = f"records/{run.name}.npz"
    result.record.save(out / record_name)
    comparison = compare_record(result.record)
    figure = out / f"{run.name}_layers.png"
    plot.layer_norms(comparison, path=figure, title=f"VGG-16-BN on digits at {FULL_IMAGE_SIZE}x{FULL_IMAGE_SIZE}: "
                     f"|θ_A|² of 6 channels per layer (each panel its own scale); lr {run.lr}, momentum "
                     f"{run.momentum}, weight decay {run.weight_decay}, batch {FULL_BATCH_SIZE}, {steps} steps")
    errors = compare_by_kind(comparison)
    if "scale" in errors:
        experiments.append(experiment_entry(f"{run.name}_layers", "scale", result.config.to_dict(), result.steps,
                                            errors["scale"], figure.name, record=record_name))
    entry = run_entry(result, record_name, name=run.name, with_device=True)
    entry["image_size"] = FULL_IMAGE_SIZE
    return entry


def _full_momentum_run(digits: Split, out: Path, experiments: list[dict[str, Any]], *, steps: int, backend: str,
                       device: str, seed: int, progress: bool) -> dict[str, Any]:
    """VGG-16 without BatchNorm under momentum 0.99: the final layer's column sums oscillating
    (the paper's momentum figure), theory over the measurement."""
    run = FULL_MOMENTUM_RUN
    config = TrainConfig(
        model=run.model, data="digits", lr=run.lr, momentum=run.momentum, weight_decay=run.weight_decay,
        batch_size=FULL_BATCH_SIZE, steps=steps, backend=backend, device=device, seed=seed,
    )
    result = train(config, None, data=digits_resized(digits, FULL_IMAGE_SIZE), progress=progress,
                   desc=f"demo --full {run.name}", write_outputs=False)
    entry = _report_run(run, result, out, experiments)
    entry["image_size"] = FULL_IMAGE_SIZE
    return entry
