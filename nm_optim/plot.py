"""Figures in the style of the Neural Mechanics paper: the measured quantity of every group as
solid coloured lines (one colour per layer, i.e. per symmetry), the theory over it as dashed
black lines (told apart by line style, so a greyscale print keeps them apart too); one panel each
for translation, scale and rescale, and one for the oscillation momentum causes. With
``residuals=True`` each panel gets a residual panel under it: (prediction - measured) / the
quantity's natural scale at each step (`theory.errors`), the quantity the reported errors are
the maximum of. Every axis is labelled: the quantity, and time in steps k or, where the
theory's continuous time is meant, t = η(1−δ)·k.

``layer_norms`` draws one panel per layer with per-neuron curves (the paper's VGG figure);
``translation_collapse`` draws runs at several learning rates and on shuffled labels collapsing
onto e^{-λt} at matched t = η·k (translation does not depend on the data or, to O(ηλ), on η).

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
_YLABELS = {
    "translation": "Σθ_A (sum over the group)",
    "scale": "|θ_A|²",
    "rescale": "|θ_A1|² − |θ_A2|²",
}
_RESIDUAL_LABEL = "{} − meas.\n/ natural scale"
_TIME_LABEL = "t = η(1 − δ)·k  (continuous time)"
# The theory: black, dashed; the measurement: coloured, solid and wider underneath.
THEORY_STYLE = {"color": "black", "lw": 0.9, "ls": (0, (4, 2))}
MEASURED_WIDTH = 1.6
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
        ax.plot(xs, meas, color=color, lw=MEASURED_WIDTH, alpha=0.85, solid_capstyle="butt",
                label=(label or pred.name) + " (measured)" if first else None)
        ax.plot(xs, th, **THEORY_STYLE, label=f"theory ({theory})" if first else None)
        if baseline:
            ax.plot(xs, pred.gradient_flow[:S, g] / scale, color="0.5", lw=0.9, ls=":",
                    label="conserved (gradient flow)" if first else None)
        first = False
    return ax


def plot_residual(pred: Prediction, ax: Any, *, theory: str = "exact", color: Any = None,
                  max_groups: int = 16, x: str = "step", label: str | None = None) -> Any:
    """Draw (prediction - measured) / the quantity's natural scale at each step, per group
    (`theory.Prediction.residual`): the residual whose maximum over steps is the reported error."""
    if theory not in ("exact", "paper", "gradient_flow"):
        raise ValueError(f"theory must be 'exact', 'paper' or 'gradient_flow', got {theory!r}")
    S = len(pred.steps)
    xs = pred.time[:S] if x == "time" else np.asarray(pred.steps)
    residual = pred.residual(theory)
    first = True
    for g in _groups(pred, max_groups):
        if not np.isfinite(residual[:, g]).any():
            continue
        ax.plot(xs, residual[:, g], color=color, lw=0.9, alpha=0.8, label=(label or pred.name) if first else None)
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
    natural scale under every panel. baseline: the conserved constant dotted grey. normalize:
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
                            normalize=True, label=f"{osc.name}, {osc.kind}")
            ax.set_title(_OSCILLATION_TITLES[osc.kind] + f"\nβ={seg.momentum:g}, λ={seg.weight_decay:g}: "
                         f"γ={seg.gamma:.3g}, ω={np.sqrt(seg.omega2):.3g} ({seg.regime})", fontsize=9)
            ax.set_ylabel("value / value at t = 0")
            ax.legend(fontsize=7, loc="upper right")
            bottom = ax
            if res is not None:
                plot_residual(osc, res, theory="paper", color="tab:red", max_groups=min(max_groups, 6), x="time")
                res.set_ylabel(_RESIDUAL_LABEL.format("paper"), fontsize=7)
                bottom = res
            bottom.set_xlabel(_TIME_LABEL)
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
        ax.set_ylabel(_YLABELS[panel] + (" / value at step 0" if normalize else ""))
        if res is not None:
            res.set_ylabel(_RESIDUAL_LABEL.format(theory), fontsize=7)
            res.set_xlabel("step k")
        else:
            ax.set_xlabel("step k")
    if path is not None:
        save(fig, path, dpi=dpi)
    return fig


def layer_norms(source: Any, *, theory: str = "paper", path: str | os.PathLike | None = None, dpi: int = 120,
                title: str | None = None, residuals: bool = True, neurons: int = 6, columns: int = 5,
                kind: str = "scale") -> Any:
    """Per-layer, per-neuron quantities over training, in the style of the paper's VGG figure: one
    panel per symmetry of `kind` (for scale, a conv or linear layer before BatchNorm), each on
    its own y scale, with up to `neurons` of its groups (evenly spread over the layer) measured
    in colour and the `theory` curve dashed black over each. With `residuals` every panel's
    title carries the layer's largest error against the natural scale (`Prediction.residual`)."""
    _, Figure = _matplotlib()
    preds = [p for p in _predictions(source) if p.kind == kind]
    n = max(len(preds), 1)
    cols = min(columns, n)
    rows = -(-n // cols)
    fig = Figure(figsize=(3.0 * cols, 2.3 * rows + 0.4), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    if not preds:
        _empty(axes[0][0], f"no {kind} symmetry")
    matplotlib, _ = _matplotlib()
    cmap = matplotlib.colormaps["viridis"]
    for i, ax in enumerate(axes.flat):
        if i >= len(preds):
            ax.set_visible(False)
            continue
        p = preds[i]
        groups = _groups(p, neurons)
        xs = np.asarray(p.steps)
        S = len(xs)
        curve = getattr(p, theory)[:S]
        for j, g in enumerate(groups):
            # viridis without its dark end: no measured curve looks like the black theory in greyscale
            colour = cmap(0.3 + 0.55 * j / max(len(groups) - 1, 1))
            ax.plot(xs, p.measured[:, g], color=colour, lw=MEASURED_WIDTH, alpha=0.9,
                    label="measured (per neuron)" if j == 0 else None)
            ax.plot(xs, curve[:, g], **THEORY_STYLE, label=f"theory ({theory})" if j == 0 else None)
        head = p.name
        if residuals:
            err = np.nanmax(np.abs(p.residual(theory)[:, groups])) if len(groups) else float("nan")
            head += f"  (max err {err:.1e})"
        ax.set_title(head, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        if i % cols == 0:
            ax.set_ylabel(_YLABELS[kind], fontsize=8)
        if i + cols >= len(preds):  # nothing under it: the bottom of its column
            ax.set_xlabel("step k", fontsize=8)
        if i == 0:
            ax.legend(fontsize=6, loc="best")
    if title:
        fig.suptitle(title, fontsize=9)
    if path is not None:
        save(fig, path, dpi=dpi)
    return fig


def translation_collapse(runs: Sequence[tuple[str, Any]], *, path: str | os.PathLike | None = None, dpi: int = 120,
                         title: str | None = None, max_groups: int = 8) -> Any:
    """Translation's independence of the learning rate and of the data (the paper, section 5):
    for each (label, source) in `runs` (a Record, Comparison or Prediction; plain SGD with the
    same weight decay λ) the translation groups' Σθ_A / Σθ_A(0) against t = η·k, which all
    collapse onto e^{-λt} (dashed black); under it, each run's gap to e^{-λt}, the O(ηλ²t)
    finite-learning-rate term of (1 − ηλ)^k. Runs are told apart by colour and marker."""
    _, Figure = _matplotlib()
    fig = Figure(figsize=(6.4, 5.4), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1.6]})
    markers = ("o", "s", "^", "D", "v", "x")
    colours = _colors(len(runs))
    t_max, lam = 0.0, None
    for i, (label, source) in enumerate(runs):
        preds = [p for p in _predictions(source) if p.kind == "translation"]
        if not preds:
            raise ValueError(f"translation_collapse: run {label!r} has no translation symmetry")
        p = preds[0]
        seg = p.segments[0]
        if seg.momentum != 0:
            raise ValueError(f"translation_collapse: run {label!r} has momentum {seg.momentum:g}; the collapse "
                             "onto e^(-λt) is for plain SGD")
        lam = seg.weight_decay if lam is None else lam
        S = len(p.steps)
        t = p.time[:S]
        t_max = max(t_max, float(t[-1]))
        pairs = _normalised_groups(p, max_groups, True)
        every = max(S // 12, 1)
        for j, (g, q0) in enumerate(pairs):
            ratio = p.measured[:, g] / q0
            ax_label = f"{label} (η={seg.lr:g})" if j == 0 else None
            top.plot(t, ratio, color=colours[i], lw=1.0, alpha=0.6, marker=markers[i % len(markers)],
                     markevery=(i * every // len(runs), every), ms=4, label=ax_label)
            bottom.plot(t, ratio - np.exp(-lam * t), color=colours[i], lw=0.9, alpha=0.7,
                        marker=markers[i % len(markers)], markevery=(i * every // len(runs), every), ms=3)
    ts = np.linspace(0, t_max, 200)
    top.plot(ts, np.exp(-(lam or 0.0) * ts), **{**THEORY_STYLE, "lw": 1.4}, label=f"theory e^(−λt), λ={lam:g}")
    top.set_ylabel("Σθ_A / Σθ_A(0)")
    top.legend(fontsize=7)
    bottom.axhline(0.0, color="black", lw=0.6)
    bottom.set_ylabel("measured − e^(−λt)", fontsize=8)
    bottom.set_xlabel("t = η·k  (continuous time)")
    bottom.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    import textwrap

    top.set_title(textwrap.fill(title or "translation: the same e^(−λt) at every learning rate and on shuffled labels",
                                80), fontsize=9)
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
    """n colours for measured curves; past ten, viridis without its dark end (which a greyscale
    print would not tell from the black theory)."""
    matplotlib, _ = _matplotlib()
    if n <= 10:
        return [matplotlib.colormaps["tab10"](i) for i in range(n)]
    cmap = matplotlib.colormaps["viridis"]
    return [cmap(0.3 + 0.55 * i / max(n - 1, 1)) for i in range(n)]


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
