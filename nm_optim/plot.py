"""Figures in the style of the Neural Mechanics paper: the measured quantity of every group in
colour (one colour per layer, i.e. per symmetry), the theory over it as dashed black lines; one
panel each for translation, scale and rescale, and one for the oscillation momentum causes.

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


def plot_prediction(pred: Prediction, ax: Any, *, theory: str = "exact", color: Any = None,
                    max_groups: int = 16, x: str = "step", label: str | None = None,
                    normalize: bool = False) -> Any:
    """Draw one symmetry on `ax`: measured per group in `color`, the `theory` curve ("exact",
    "paper" or "gradient_flow") dashed black. x: "step" or "time" (the paper's t). With
    `normalize` every group is divided by its initial value (to compare shapes across groups)."""
    if theory not in ("exact", "paper", "gradient_flow"):
        raise ValueError(f"theory must be 'exact', 'paper' or 'gradient_flow', got {theory!r}")
    if x not in ("step", "time"):
        raise ValueError(f"x must be 'step' or 'time', got {x!r}")
    S = len(pred.steps)
    xs = pred.time[:S] if x == "time" else np.asarray(pred.steps)
    pred_curve = getattr(pred, theory)[:S]
    first = True
    for g in _groups(pred, max_groups):
        meas, th = pred.measured[:, g], pred_curve[:, g]
        if normalize:
            scale = meas[0] if meas[0] != 0 else 1.0
            meas, th = meas / scale, th / scale
        ax.plot(xs, meas, color=color, lw=1.2, alpha=0.8, label=(label or pred.name) if first else None)
        ax.plot(xs, th, color="black", lw=0.9, ls="--", label=f"theory ({theory})" if first else None)
        first = False
    return ax


def _oscillating(preds: Sequence[Prediction]) -> Prediction | None:
    """The prediction that best shows momentum's oscillation: underdamped first, scale first."""
    order = {"scale": 0, "rescale": 1, "translation": 2}
    momentum = [p for p in preds if any(s.model == "oscillator" for s in p.segments)]
    momentum.sort(key=lambda p: (not any(s.regime == "underdamped" for s in p.segments), order[p.kind]))
    return momentum[0] if momentum else None


def figure(source: Any, *, oscillation: Any = None, theory: str = "exact", max_groups: int = 16,
           path: str | os.PathLike | None = None, dpi: int = 120, panels: Sequence[str] = PANELS) -> Any:
    """The paper-style figure of a run: one panel per symmetry kind (every layer of that kind in its
    own colour, theory dashed black) and one for the momentum oscillation (the paper's closed
    form against the measured norm over continuous time, normalised by the initial value).

    source: a Record (compared with the symmetries it describes), a theory.Comparison or a list
    of Predictions. oscillation: the same for the oscillation panel (e.g. an underdamped run),
    default `source`. Saves a PNG to `path` when given; returns the Figure."""
    _, Figure = _matplotlib()
    for p in panels:
        if p not in PANELS:
            raise ValueError(f"panels must be among {PANELS}, got {p!r}")
    preds = _predictions(source)
    fig = Figure(figsize=(4.2 * len(panels), 3.6), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    colors = _colors(len(preds))
    for ax, panel in zip(axes, panels):
        ax.set_title(_TITLES[panel], fontsize=10)
        if panel == "oscillation":
            osc = _oscillating(_predictions(oscillation) if oscillation is not None else preds)
            if osc is None:
                _empty(ax, "no momentum in this run")
                continue
            seg = next(s for s in osc.segments if s.model == "oscillator")
            plot_prediction(osc, ax, theory="paper", color="tab:red", max_groups=min(max_groups, 6), x="time",
                            normalize=True, label=f"{osc.name} ({osc.kind})")
            ax.set_xlabel("t = lr·(1 − dampening)·k")
            ax.text(0.02, 0.98, f"β={seg.momentum:g}, λ={seg.weight_decay:g}\nγ={seg.gamma:.3g}, "
                    f"ω²={seg.omega2:.3g} ({seg.regime})", transform=ax.transAxes, ha="left", va="top",
                    fontsize=8)
            ax.legend(fontsize=7, loc="upper right")
            continue
        mine = [(p, c) for p, c in zip(preds, colors) if p.kind == panel]
        if not mine:
            _empty(ax, f"no {panel} symmetry")
            continue
        for p, c in mine:
            plot_prediction(p, ax, theory=theory, color=c, max_groups=max_groups, label=p.name)
        ax.set_xlabel("step")
        _dedupe_legend(ax)
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
