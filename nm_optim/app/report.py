"""What the commands write and print about a run: its comparison with the theory, one figure per
symmetry kind, the summary.json entries and the short table.

    summary.json = {"version", "backend", "device", "experiments": [experiment_entry...],
                    "runs": [run_entry...], and "note" when nothing was compared}

Every summary.json entry is built here, by one function each, so the demo, `train` and `plot`
write the same schema. JSON has no NaN or inf: they are written as null.
"""

from __future__ import annotations

import json
import math
import os
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

import nm_optim
from nm_optim import theory
from nm_optim._io import atomic_write
from nm_optim._version import __version__
from nm_optim.app.config import TrainResult, UserError, check_writable
from nm_optim.names import HYPER_NAMES

RECORD_NAME = "record.npz"
SUMMARY_NAME = "summary.json"


# -- comparing with the theory -------------------------------------------------------------------------------


def compare_record(record, symmetries=None):
    """nm_optim.theory.compare(record), with a record the theory cannot use (one that skipped
    steps, say) turned into a UserError."""
    try:
        return theory.compare(record, symmetries)
    except ValueError as e:
        raise UserError(f"cannot compare with the theory: {e}") from e


def compare_by_kind(comparison) -> dict[str, dict[str, Any]]:
    """For each symmetry kind of a theory.Comparison: its groups and the largest errors of the
    predictions against the measurement (per group, max over steps |prediction - measured| /
    the quantity's natural scale at that step; see nm_optim.theory.errors), maxed over the
    kind's symmetries and groups: the exact recursion over the run and its last tenth, the same
    with the measured symmetry breaking kept, the paper's closed form (NaN where it does not
    apply) over the run and its last tenth, and the conserved constant (gradient flow: no
    forcing, no decay). Also whether the closed form's assumptions hold and the non-finite steps."""
    return theory_errors_by_kind(comparison.rows())


# What every *_rel_err of summary.json measures (written into it, next to the numbers).
ERROR_MEASURE = ("per group: max over steps |prediction - measured| / the quantity's natural scale at that step "
                 "(translation sqrt(n)|theta_A|, scale |theta_A|^2, rescale |theta_A1|^2 + |theta_A2|^2); "
                 "late: over the last 10% of the steps")

# summary.json key -> theory.Comparison.rows() key
ERROR_KEYS = {
    "exact_max_rel_err": "max_exact_error",
    "exact_late_max_rel_err": "max_exact_late_error",
    "exact_with_breaking_max_rel_err": "max_exact_breaking_error",
    "paper_max_rel_err": "max_paper_error",
    "paper_late_max_rel_err": "max_paper_late_error",
    "gradient_flow_max_rel_err": "max_gradient_flow_error",
}


def theory_errors_by_kind(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Fold theory.Comparison.rows() (one per symmetry) into one entry per kind."""
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        e = out.setdefault(row["kind"], {"num_groups": 0, **{k: 0.0 for k in ERROR_KEYS}, "paper_valid": True,
                                         "paper_caveats": [], "nonfinite_steps": 0, "symmetries": []})
        e["num_groups"] += int(row["groups"])
        for key, src in ERROR_KEYS.items():
            v = row.get(src)
            v = float("nan") if v is None else float(v)
            # NaN (no prediction) wins over any number: a maximum must not hide a missing group.
            e[key] = float("nan") if (math.isnan(v) or math.isnan(e[key])) else max(e[key], v)
        if not row.get("paper_applies", True):
            e["paper_max_rel_err"] = e["paper_late_max_rel_err"] = float("nan")
        e["paper_valid"] = e["paper_valid"] and bool(row.get("paper_valid", True))
        e["paper_caveats"] += [f"{row['symmetry']}: {c}" for c in row.get("paper_caveats", [])]
        e["nonfinite_steps"] = max(e["nonfinite_steps"], int(row.get("nonfinite_steps", 0)))
        e["symmetries"].append(row["symmetry"])
    return out


def underdamped(comparison, kind: str) -> bool:
    """Whether the theory of `kind` oscillates (gamma < omega: theory.Segment.regime) anywhere."""
    return any(seg.regime == "underdamped" for p in comparison.predictions if p.kind == kind for seg in p.segments)


def draw_figure(comparison, kind: str, path: Path, *, title: str | None = None, oscillation: bool = False,
                residuals: bool = True, baseline: bool = False, normalize: bool = False) -> Path:
    """One panel of nm_optim.plot.figure as a PNG: the `kind` symmetries' measured groups in
    colour with the paper's closed form dashed over them (the exact recursion where the closed
    form does not apply), or, with `oscillation`, the momentum-oscillation panel of `kind`;
    with `residuals` (prediction - measured) / max |measured| under it; with `baseline` the
    conserved constant dotted; with `normalize` every group divided by its initial value."""
    from nm_optim import (
        plot,  # matplotlib: an optional dependency, imported when drawing
    )

    preds = [p for p in comparison.predictions if p.kind == kind]
    which = "paper" if preds and all(p.paper_applies for p in preds) else "exact"
    fig = plot.figure(comparison, panels=(kind, "oscillation") if oscillation else (kind,), theory=which,
                      residuals=residuals, oscillation_kind=kind if oscillation else None, baseline=baseline,
                      normalize=normalize)
    if title:  # the legend says which theory is dashed
        fig.suptitle(textwrap.fill(title, 50 if not oscillation else 100), fontsize=9)
    plot.save(fig, path)
    return Path(path)


# -- summary.json entries ------------------------------------------------------------------------------------


def experiment_entry(
    name: str,
    kind: str,
    config: Mapping[str, Any] | None,
    steps: int,
    errors: dict[str, Any],
    figure: str,
    *,
    record: str | None = None,
) -> dict[str, Any]:
    """One figure's entry: `config` is the run's TrainConfig.to_dict() (None when unknown, e.g. a
    record written outside nm-optim), `errors` its kind's entry of compare_by_kind, `record` the
    record file it was drawn from when that is not the run's record.npz."""
    entry = {
        "name": name,
        "symmetry": kind,
        "model": config.get("model") if config else None,
        "optimizer": {k: config.get(k) for k in HYPER_NAMES} if config else None,
        "steps": steps,
        "num_groups": errors["num_groups"],
        **{k: errors.get(k, float("nan")) for k in ERROR_KEYS},
        "paper_valid": errors.get("paper_valid", True),
        "nonfinite_steps": errors.get("nonfinite_steps", 0),
        "figure": figure,
    }
    if errors.get("paper_caveats"):
        entry["paper_caveats"] = errors["paper_caveats"]
    if record is not None:
        entry["record"] = record
    return entry


def run_entry(
    result: TrainResult, record_name: str, *, name: str | None = None, with_device: bool = False
) -> dict[str, Any]:
    """One training run's entry. `name` leads it when given; `with_device` adds its device and
    backend (the demo's runs; a `train` summary has them at the top)."""
    entry = {} if name is None else {"name": name}
    entry.update({
        "config": result.config.to_dict(),
        "record": record_name,
        "steps": result.steps,
        "final_loss": result.final_loss,
        "test_accuracy": result.test_accuracy,
        "seconds": round(result.seconds, 3),
        "resumed_from": result.resumed_from,
        "symmetries": [s.describe() for s in result.symmetries],
    })
    if with_device:
        entry.update(device=result.device, backend=result.backend)
    if result.distributed is not None:  # {"mode", "world_size"}: how many processes shared the batches
        entry["distributed"] = result.distributed
    return entry


def summary_dict(backend: str, device: str, experiments: list[dict[str, Any]]) -> dict[str, Any]:
    """The head of a summary.json; the caller adds "runs" (and "note" or "seconds")."""
    return {"version": __version__, "backend": backend, "device": device, "error_measure": ERROR_MEASURE,
            "experiments": experiments}


def write_json(path: Path, obj: Any) -> Path:
    """Write `obj` as indented JSON to `path`, atomically."""
    text = json.dumps(_jsonable(obj), indent=2, allow_nan=False) + "\n"
    return atomic_write(path, lambda f: f.write(text), binary=False)


def _jsonable(x: Any) -> Any:
    """NaN / inf (a diverged run, a symmetry with no data) become null: JSON has neither."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, Path):
        return str(x)
    return x


# -- what `train` and `plot` write ---------------------------------------------------------------------------


def write_run_outputs(result: TrainResult, out_dir: Path) -> dict[str, Any]:
    """summary.json and one figure per symmetry kind for a `train` run. A run recorded with
    record_every > 1 (or with no symmetry found) gets no comparison: summary["note"] says why;
    its record is still written."""
    cfg = result.config
    experiments = []
    note = None
    if not result.symmetries:
        note = "no symmetry found in this model: nothing to compare with the theory"
    elif cfg.record_every != 1:
        note = f"recorded every {cfg.record_every} steps: the theory needs every step (--record-every 1)"
    else:
        comparison = compare_record(result.record)
        for kind, e in compare_by_kind(comparison).items():
            figure = draw_figure(comparison, kind, out_dir / f"{kind}.png", title=f"{cfg.model} on {cfg.data}: {kind}")
            experiments.append(experiment_entry(kind, kind, cfg.to_dict(), result.steps, e, figure.name))
    summary = summary_dict(result.backend, result.device, experiments)
    if note:
        summary["note"] = note
    summary["runs"] = [run_entry(result, RECORD_NAME)]
    write_json(out_dir / SUMMARY_NAME, summary)
    return summary


def plot_record(path: str | os.PathLike, out: str | os.PathLike) -> list[dict[str, Any]]:
    """Redraw a saved record's figures into `out`: one per symmetry kind, named
    "<record stem>-<kind>.png", and the momentum-oscillation panel of the first oscillating scale
    or rescale symmetry. Returns their experiment entries (for format_table)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"record {path} does not exist" if not path.exists() else f"record {path} is not a file")
    try:
        record = nm_optim.load_record(path)
    except Exception as e:
        raise UserError(f"cannot read record {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    if not record.meta.get("symmetries"):
        raise UserError(f"record {path} holds no symmetries (it was not recorded with nm_optim.SGD(..., symmetries=...))")
    out = check_writable(out)
    comparison = compare_record(record)
    errors = compare_by_kind(comparison)
    cfg = record.meta.get("training", {}).get("config", {})
    figures = [(kind, kind, False) for kind in errors]
    oscillating = [k for k in ("scale", "rescale") if k in errors and underdamped(comparison, k)]
    if oscillating:
        figures.append(("momentum_oscillation", oscillating[0], True))
    experiments = []
    for name, kind, oscillation in figures:
        figure = draw_figure(comparison, kind, out / f"{path.stem}-{name}.png", title=f"{path.stem}: {name}",
                             oscillation=oscillation)
        experiments.append(experiment_entry(f"{path.stem}/{name}", kind, cfg, len(record), errors[kind], figure.name))
    return experiments


# -- what the commands print ---------------------------------------------------------------------------------


def format_table(experiments: list[dict[str, Any]]) -> str:
    """The short table the commands print: experiment, groups, and the max errors (against each
    quantity's natural scale at each step) of the exact recursion (over the run and its last
    tenth), of the recursion with the measured breaking kept, of the paper's closed form (over
    the run and its last tenth; "!" where its assumptions fail) and of the conserved constant
    (no forcing); "non-finite" steps when there are any."""
    header = ["experiment", "groups", "exact", "exact late", "exact+breaking", "paper", "paper late", "no forcing"]
    nonfinite = any(e.get("nonfinite_steps") for e in experiments)
    rows = []
    for e in experiments:
        paper = _fmt(e.get("paper_max_rel_err")) + ("" if e.get("paper_valid", True) else " !")
        row = [e["name"], str(e["num_groups"]), _fmt(e.get("exact_max_rel_err")), _fmt(e.get("exact_late_max_rel_err")),
               _fmt(e.get("exact_with_breaking_max_rel_err")), paper, _fmt(e.get("paper_late_max_rel_err")),
               _fmt(e.get("gradient_flow_max_rel_err"))]
        if nonfinite:
            row.append(str(e.get("nonfinite_steps", 0)))
        rows.append(tuple(row))
    if nonfinite:
        header.append("non-finite")
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(r, widths))) for r in (header, *rows)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("(per group, max over steps |prediction - measured| / the quantity's natural scale at that step: "
                 "translation sqrt(n)|θ_A|, scale |θ_A|², rescale |θ_A1|² + |θ_A2|²; late: the last 10% of the "
                 "steps; no forcing: the conserved constant; ! the closed form's assumptions fail)")
    return "\n".join(lines)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.2e}"
