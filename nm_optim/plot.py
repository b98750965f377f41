"""Figures in the style of the Neural Mechanics paper: the measured quantity of every group in
colour (one colour per layer, i.e. per symmetry), the theory over it as dashed black lines; one
panel each for translation, scale and rescale, and one for the oscillation momentum causes. With
``residuals=True`` each panel gets a residual panel under it: (prediction - measured) / max
|measured| per group, the quantity the reported errors are the maximum of.

    from nm_optim import plot, theory
    fig = plot.figure(theory.compare(record), path="theory.png")

matplotlib is optional (``pip install nm_optim[demo]``) and imported only when a function here is
called. Figures are built as ``matplotlib.figure.Figure`` objects, not through pyplot, so nothing
needs a display or touches pyplot's global state: saving works headless (Agg canvas), and a
notebook shows the returned Figure as usual.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from nm_optim.theory import Comparison, Prediction, compare

PANELS = ("translation", "scale", "rescale", "oscillation")
_TITLES = {
    "translation": "translation: Σθ_A",
    "scale": "scale: |θ_A|²",
    "rescale": "rescale: |θ_A1|² − |θ_A2|²",
    "oscillation": "momentum: |θ_A|² / |θ_A(0)|²",
}
_OSCILLATION_TITLES = {
    "translation": "momentum: Σθ_A / Σθ_A(0)",
    "scale": "momentum: |θ_A|² / |θ_A(0)|²",
    "rescale": "momentum: (|θ_A1|² − |θ_A2|²) / value at 0",
}


def _matplotlib():
    try:
        import matplotlib
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "nm_optim.plot needs matplotlib, an optional dependency: pip install nm_optim[demo]"
        ) from e
    return matplotlib, Figure


def _predictions(source: Any) -> list[Prediction]:
    if isinstance(source, Comparison):
        return list(source.predictions)
    if isinstance(source, Prediction):
        return [source]
    if hasattr(source, "stats") and hasattr(source, "tracks"):  # a Record
        return list(compare(source).predictions)
    preds = list(source)
    if not all(isinstance(p, Prediction) for p in preds):
        raise TypeError("plot: expected a Record, a theory.Comparison, a theory.Prediction or a list of Predictions")
    return preds


def _groups(pred: Prediction, max_groups: int) -> np.ndarray:
    """Up to max_groups group indices, spread over the layer (largest |measured| first would hide
    the small ones; evenly spaced indices show the spread)."""
    n = pred.num_groups
    return np.unique(np.linspace(0, n - 1, min(n, max_groups)).round().astype(int))


def _normalised_groups(pred: Prediction, max_groups: int, normalize: bool) -> list[tuple[int, float]]:
    """(group, divisor) pairs: with `normalize`, groups whose initial value is < 10% of their
    largest are left out (a curve divided by ~0 says nothing)."""
    out = []
    for g in _groups(pred, max_groups):
        meas = pred.measured[:, g]
        if not normalize:
            out.append((g, 1.0))
            continue
        finite = meas[np.isfinite(meas)]
        if not finite.size:
            continue
        first, big = finite[0], np.max(np.abs(finite))
        if abs(first) >= 0.1 * big and first != 0:
            out.append((g, float(first)))
    return out


def plot_prediction(pred: Prediction, ax: Any, *, theory: str = "exact", color: Any = None,
                    max_groups: int = 16, x: str = "step", label: str | None = None,
                    normalize: bool = False, baseline: bool = False) -> Any:
    """Draw one symmetry on `ax`: measured per group in `color`, the `theory` curve ("exact",
    "paper" or "gradient_flow") dashed black. x: "step" or "time" (the paper's t). With
    `normalize` every group is divided by its initial value (to compare shapes across groups).
    `baseline`: the conserved constant (gradient flow) dotted grey as well."""
    if theory not in ("exact", "paper", "gradient_flow"):
        raise ValueError(f"theory must be 'exact', 'paper' or 'gradient_flow', got {theory!r}")
    if x not in ("step", "time"):
        raise ValueError(f"x must be 'step' or 'time', got {x!r}")
    S = len(pred.steps)
    xs = pred.time[:S] if x == "time" else np.asarray(pred.steps)
    pred_curve = getattr(pred, theory)[:S]
    first = True
    for g, scale in _normalised_groups(pred, max_groups, normalize):
        meas, th = pred.measured[:, g] / scale, pred_curve[:, g] / scale
        ax.plot(xs, meas, color=color, lw=1.2, alpha=0.8, label=(label or pred.name) if first else None)
        ax.plot(xs, th, color="black", lw=0.9, ls="--", label=f"theory ({theory})" if first else None)
        if baseline:
            ax.plot(xs, pred.gradient_flow[:S, g] / scale, color="0.5", lw=0.9, ls=":",
                    label="conserved (gradient flow)" if first else None)
        first = False
    return ax


def plot_residual(pred: Prediction, ax: Any, *, theory: str = "exact", color: Any = None,
                  max_groups: int = 16, x: str = "step", label: str | None = None) -> Any:
    """Draw (prediction - measured) / max_k max(|measured|, floor) per group: the residual whose
    maximum over steps is the reported relative error."""
    if theory not in ("exact", "paper", "gradient_flow"):
        raise ValueError(f"theory must be 'exact', 'paper' or 'gradient_flow', got {theory!r}")
    S = len(pred.steps)
    xs = pred.time[:S] if x == "time" else np.asarray(pred.steps)
    curve = getattr(pred, theory)[:S]
    floor = np.broadcast_to(np.asarray(pred.floor, dtype=np.float64), (pred.num_groups,))
    first = True
    for g in _groups(pred, max_groups):
        meas = pred.measured[:, g]
        if not np.isfinite(meas).any():
            continue
        scale = max(float(np.nanmax(np.abs(meas))), float(floor[g]))
        ax.plot(xs, (curve[:, g] - meas) / (scale or 1.0), color=color, lw=0.9, alpha=0.8,
                label=(label or pred.name) if first else None)
        first = False
    ax.axhline(0.0, color="black", lw=0.6)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    return ax


def _oscillating(preds: Sequence[Prediction], kind: str | None = None) -> Prediction | None:
    """The prediction that best shows momentum's oscillation: underdamped first, scale first (or
    only `kind`)."""
    order = {"scale": 0, "rescale": 1, "translation": 2}
    momentum = [p for p in preds if any(s.model == "oscillator" for s in p.segments) and (kind is None or p.kind == kind)]
    momentum.sort(key=lambda p: (not any(s.regime == "underdamped" for s in p.segments), order[p.kind]))
    return momentum[0] if momentum else None


def figure(source: Any, *, oscillation: Any = None, theory: str = "exact", max_groups: int = 16,
           path: str | os.PathLike | None = None, dpi: int = 120, panels: Sequence[str] = PANELS,
           residuals: bool = False, oscillation_kind: str | None = None, baseline: bool = False,
           normalize: bool = False) -> Any:
    """The paper-style figure of a run: one panel per symmetry kind (every layer of that kind in its
    own colour, theory dashed black) and one for the momentum oscillation (the paper's closed
    form against the measured quantity over continuous time, normalised by the initial value).

    source: a Record (compared with the symmetries it describes), a theory.Comparison or a list
    of Predictions. oscillation: the same for the oscillation panel (e.g. an underdamped run),
    default `source`; oscillation_kind: the symmetry kind it shows (default: the best
    underdamped one, scale first). residuals: a second row with (prediction - measured) /
    max |measured| under every panel. baseline: the conserved constant dotted grey. normalize:
    the symmetry panels divide every group by its initial value. Saves a PNG
    to `path` when given; returns the Figure."""
    _, Figure = _matplotlib()
    for p in panels:
        if p not in PANELS:
            raise ValueError(f"panels must be among {PANELS}, got {p!r}")
    preds = _predictions(source)
    rows = 2 if residuals else 1
    fig = Figure(figsize=(4.2 * len(panels), 3.6 + 2.0 * (rows - 1)), layout="constrained")
    grid = fig.subplots(rows, len(panels), squeeze=False, sharex="col",
                        gridspec_kw={"height_ratios": [3, 1.6][:rows]})
    axes = grid[0]
    colors = _colors(len(preds))
    for i, (ax, panel) in enumerate(zip(axes, panels)):
        res = grid[1][i] if residuals else None
        ax.set_title(_TITLES[panel] + (" / value at step 0" if normalize and panel != "oscillation" else ""),
                     fontsize=10)
        if panel == "oscillation":
            osc = _oscillating(_predictions(oscillation) if oscillation is not None else preds, oscillation_kind)
            if osc is None:
                _empty(ax, "no momentum in this run")
                if res is not None:
                    _empty(res, "")
                continue
            ax.set_title(_OSCILLATION_TITLES[osc.kind], fontsize=10)
            seg = next(s for s in osc.segments if s.model == "oscillator")
            plot_prediction(osc, ax, theory="paper", color="tab:red", max_groups=min(max_groups, 6), x="time",
                            normalize=True, label=f"{osc.name} ({osc.kind})")
            ax.text(0.02, 0.02 if osc.kind == "translation" else 0.98,
                    f"β={seg.momentum:g}, λ={seg.weight_decay:g}\nγ={seg.gamma:.3g}, "
                    f"ω²={seg.omega2:.3g} ({seg.regime})", transform=ax.transAxes, ha="left",
                    va="bottom" if osc.kind == "translation" else "top", fontsize=8)
            ax.legend(fontsize=7, loc="upper right")
            bottom = ax
            if res is not None:
                plot_residual(osc, res, theory="paper", color="tab:red", max_groups=min(max_groups, 6), x="time")
                res.set_ylabel("(paper − meas.) / max|meas.|", fontsize=7)
                bottom = res
            bottom.set_xlabel("t = lr·(1 − dampening)·k")
            continue
        mine = [(p, c) for p, c in zip(preds, colors) if p.kind == panel]
        if not mine:
            _empty(ax, f"no {panel} symmetry")
            if res is not None:
                _empty(res, "")
            continue
        for p, c in mine:
            plot_prediction(p, ax, theory=theory, color=c, max_groups=max_groups, label=p.name, baseline=baseline,
                            normalize=normalize)
            if res is not None:
                plot_residual(p, res, theory=theory, color=c, max_groups=max_groups, label=p.name)
        _dedupe_legend(ax)
        if res is not None:
            res.set_ylabel(f"({theory} − meas.) / max|meas.|", fontsize=7)
            res.set_xlabel("step")
        else:
            ax.set_xlabel("step")
    if path is not None:
        save(fig, path, dpi=dpi)
    return fig


def layer_norms(source: Any, *, theory: str = "paper", path: str | os.PathLike | None = None, dpi: int = 120,
                title: str | None = None, residuals: bool = True) -> Any:
    """Per-layer squared norms over training, in the style of the paper's first figure: for every
    scale symmetry (a conv or linear layer before BatchNorm) the sum of |θ_A|² over its groups,
    divided by its value at the first step, one colour per layer, the `theory` curve dashed
    black; under it the residual (prediction - measured) / measured of each layer's norm."""
    _, Figure = _matplotlib()
    preds = [p for p in _predictions(source) if p.kind == "scale"]
    rows = 2 if residuals else 1
    fig = Figure(figsize=(6.4, 3.8 + 2.0 * (rows - 1)), layout="constrained")
    axes = fig.subplots(rows, 1, squeeze=False, sharex="col", gridspec_kw={"height_ratios": [3, 1.6][:rows]})[:, 0]
    ax = axes[0]
    ax.set_title("per-layer |θ|² / value at step 0 (scale symmetries)", fontsize=10)
    ax.set_yscale("log")
    if not preds:
        _empty(ax, "no scale symmetry")
    colors = _colors(len(preds))
    for i, (p, c) in enumerate(zip(preds, colors)):
        S = len(p.steps)
        meas = np.nansum(p.measured, axis=1)
        th = np.nansum(getattr(p, theory)[:S], axis=1)
        scale = meas[0] if meas[0] else 1.0
        ax.plot(p.steps, meas / scale, color=c, lw=1.3, label=p.name)
        ax.plot(p.steps, th / scale, color="black", lw=0.8, ls="--", label=f"theory ({theory})" if i == 0 else None)
        if residuals:
            axes[1].plot(p.steps, (th - meas) / np.where(meas != 0, meas, 1.0), color=c, lw=0.9)
    ax.legend(fontsize=6, ncol=2)
    if residuals:
        axes[1].axhline(0.0, color="black", lw=0.6)
        axes[1].set_ylabel(f"({theory} − meas.) / meas.", fontsize=7)
        axes[1].ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    axes[-1].set_xlabel("step")
    if title:
        fig.suptitle(title, fontsize=9)
    if path is not None:
        save(fig, path, dpi=dpi)
    return fig


def save(fig: Any, path: str | os.PathLike, dpi: int = 120) -> str:
    """Write `fig` as PNG (Agg canvas, no display needed); returns the path."""
    _matplotlib()
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    return path


def _colors(n: int) -> list[Any]:
    matplotlib, _ = _matplotlib()
    cmap = matplotlib.colormaps["viridis" if n > 10 else "tab10"]
    return [cmap(i / max(n - 1, 1)) if n > 10 else cmap(i) for i in range(n)]


def _empty(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _dedupe_legend(ax: Any) -> None:
    handles, labels = ax.get_legend_handles_labels()
    seen: dict[str, Any] = {}
    for handle, label in zip(handles, labels):
        seen.setdefault(label, handle)
    ax.legend(seen.values(), seen.keys(), fontsize=7)
