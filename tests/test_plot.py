"""The figures (nm_optim.plot): every axis labelled, theory and measurement told apart without
colour, residuals against the natural scale, the per-layer panels of the paper's VGG figure and
translation's collapse onto e^{-λt} (docs/theory.md; docs/architecture.md, "The theory")."""

from __future__ import annotations

import numpy as np
import pytest
from theory_helpers import run_sgd, scale_invariant_loss, softmax_loss

from nm_optim import theory

matplotlib = pytest.importorskip("matplotlib")
from matplotlib.colors import to_rgb  # noqa: E402

from nm_optim import plot  # noqa: E402


def _luminance(colour) -> float:
    r, g, b = to_rgb(colour)
    return 0.299 * r + 0.587 * g + 0.114 * b


def _toy(kind, steps=120, **hyper):
    loss = softmax_loss(4, 7) if kind == "translation" else scale_invariant_loss(4, 7)
    hyper = hyper or {"lr": 0.02, "momentum": 0.99, "weight_decay": 0.05}
    stats, sched = run_sgd(loss, (4, 7), steps, **hyper)
    return theory.predict_arrays(kind, stats, sched, name=f"toy {kind}", group_size=7)


@pytest.fixture(scope="module")
def preds():
    return [_toy("translation"), _toy("scale")]


def test_every_axis_is_labelled_with_steps_or_the_theorys_time(preds):
    fig = plot.figure(preds, residuals=True)
    for ax in fig.get_axes():
        if not ax.get_lines():  # the empty rescale panel says so in its text
            continue
        assert ax.get_ylabel(), ax.get_title()
    bottoms = [ax for ax in fig.get_axes() if ax.get_xlabel()]
    labels = {ax.get_xlabel() for ax in bottoms}
    assert "step k" in labels and any(label.startswith("t = η") for label in labels)


def test_theory_and_measurement_are_apart_in_greyscale(preds):
    """Theory: black and dashed; measured: solid and never dark enough to pass for black."""
    fig = plot.figure(preds)
    for ax in fig.get_axes():
        for line in ax.get_lines():
            label = line.get_label()
            if label.startswith("theory") or (line.get_color() == "black" and line.get_linestyle() == "--"):
                assert line.get_color() == "black" and line.get_linestyle() == "--"
            elif line.get_linestyle() == "-":
                assert _luminance(line.get_color()) > 0.2, (label, line.get_color())
    for colours in (plot._colors(5), plot._colors(40)):
        assert min(_luminance(c) for c in colours) > 0.2


def test_the_residual_panel_draws_the_error_against_the_natural_scale(preds):
    p = preds[1]
    fig = plot.figure([p], panels=("scale",), residuals=True, theory="paper")
    res = fig.get_axes()[1]
    assert "natural scale" in res.get_ylabel()
    drawn = max(np.nanmax(np.abs(line.get_ydata())) for line in res.get_lines() if len(line.get_ydata()) > 2)
    groups = plot._groups(p, 16)
    assert drawn == pytest.approx(np.nanmax(p.paper_error[groups]), rel=1e-12)


def test_per_layer_figure_has_a_panel_per_layer_on_its_own_scale():
    small = _toy("scale", lr=0.05, momentum=0.9, weight_decay=0.01)
    big = _toy("scale", lr=0.05, momentum=0.9, weight_decay=0.01)
    big.measured = big.measured * 100
    big.paper = big.paper * 100
    big.name = "big layer"
    fig = plot.layer_norms([small, big], neurons=3)
    axes = [ax for ax in fig.get_axes() if ax.get_visible()]
    assert len(axes) == 2
    for ax in axes:
        solid = [line for line in ax.get_lines() if line.get_linestyle() == "-"]
        dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
        assert len(solid) == len(dashed) == 3  # three neurons, each with its theory
    lo, hi = axes[0].get_ylim(), axes[1].get_ylim()
    assert hi[1] > 50 * lo[1]  # each panel on its own scale
    assert axes[0].get_ylabel() == "|θ_A|²" and "max err" in axes[0].get_title()


def test_translation_collapse_draws_every_run_over_one_exponential():
    runs = [(f"lr {lr}", _toy("translation", steps=round(4 / lr), lr=lr, weight_decay=0.1)) for lr in (0.1, 0.05)]
    fig = plot.translation_collapse(runs)
    top, bottom = fig.get_axes()
    theory_lines = [line for line in top.get_lines() if line.get_label().startswith("theory")]
    assert len(theory_lines) == 1 and "λ=0.1" in theory_lines[0].get_label()
    x, y = theory_lines[0].get_data()
    assert np.allclose(y, np.exp(-0.1 * x))
    # every run's column sums sit on it to O(ηλ²t)
    gaps = [np.nanmax(np.abs(line.get_ydata())) for line in bottom.get_lines() if len(line.get_ydata()) > 2]
    assert gaps and max(gaps) < 0.1 * 0.1**2 * 4
    assert bottom.get_xlabel().startswith("t = η·k")
    with pytest.raises(ValueError, match="momentum"):
        plot.translation_collapse([("m", _toy("translation", steps=20))])
