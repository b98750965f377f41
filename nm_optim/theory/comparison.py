"""Comparing the theory with a record: the errors of every symmetry's predictions, per group, as a
summary table and a JSON-able dict (`compare`, `Comparison`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from nm_optim.theory.prediction import Prediction, RecordLike, check_consecutive, predict, symmetries_of


@dataclass
class Comparison:
    """Per symmetry: its Prediction and errors per group (see `relative_error`)."""

    predictions: list[Prediction]

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for p in self.predictions:
            finite = lambda a: float(np.nanmax(a)) if a.size and np.isfinite(a).any() else float("nan")
            out.append({
                "symmetry": p.name, "kind": p.kind, "groups": p.num_groups, "steps": len(p.steps),
                "max_exact_error": finite(p.exact_error), "max_paper_error": finite(p.paper_error),
                "max_gradient_flow_error": finite(p.gradient_flow_error),
                "max_breaking": finite(np.abs(p.breaking)), "max_breaking_ratio": finite(p.breaking_ratio),
                "paper_applies": p.paper_applies, "paper_reason": p.paper_reason,
                "segments": [s.to_dict() for s in p.segments],
            })
        return out

    def table(self) -> str:
        """The summary table: symmetry, kind, groups, max exact err, max paper err, max gradient
        flow err (drift from conservation), and "breaking": max_k |⟨g, generator⟩| / max_k
        |g||generator| (see `breaking_ratio`)."""
        head = ("symmetry", "kind", "groups", "exact err", "paper err", "flow err", "breaking")
        lines = []
        for r in self.rows():
            paper_err = f"{r['max_paper_error']:.2e}" + ("" if r["paper_applies"] else " (n/a)")
            lines.append((r["symmetry"], r["kind"], str(r["groups"]), f"{r['max_exact_error']:.2e}",
                          paper_err, f"{r['max_gradient_flow_error']:.2e}", f"{r['max_breaking_ratio']:.1e}"))
        widths = [max(len(h), *(len(row[i]) for row in lines)) if lines else len(h) for i, h in enumerate(head)]
        fmt = lambda row: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        out = [fmt(head), "  ".join("-" * w for w in widths), *map(fmt, lines)]
        notes = {r["paper_reason"] for r in self.rows() if r["paper_reason"]}
        out += [f"(n/a) paper closed form does not apply: {n}" for n in sorted(notes)]
        return "\n".join(out)

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: the summary rows with per-group errors."""
        rows = self.rows()
        for r, p in zip(rows, self.predictions):
            r["exact_error"] = [_json_float(x) for x in p.exact_error]
            r["paper_error"] = [_json_float(x) for x in p.paper_error]
            for k in ("max_exact_error", "max_paper_error", "max_gradient_flow_error", "max_breaking",
                      "max_breaking_ratio"):
                r[k] = _json_float(r[k])
            for seg in r["segments"]:
                for k, v in seg.items():
                    if isinstance(v, float):
                        seg[k] = _json_float(v)
        out = {"symmetries": rows}
        json.dumps(out)  # fail here, not in the caller's json.dump, if something is not JSON-able
        return out

    @property
    def max_exact_error(self) -> dict[str, float]:
        return {r["symmetry"]: r["max_exact_error"] for r in self.rows()}

    @property
    def max_paper_error(self) -> dict[str, float]:
        return {r["symmetry"]: r["max_paper_error"] for r in self.rows()}


def _json_float(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def compare(record: RecordLike, symmetries: Sequence[Any] | None = None) -> Comparison:
    """Errors of the `exact` and `paper` predictions against the measured trajectories, per
    symmetry and group (max over steps |pred - meas| / max over steps |meas|; for translation
    the normaliser is at least the group's norm |θ_A|, see `error_floor`), for every symmetry (default: those described in the record's meta, so a
    loaded file needs no model). ``print(compare(record))`` prints the summary table."""
    check_consecutive(record)
    if symmetries is None:
        symmetries = symmetries_of(record)
    return Comparison([predict(record, s) for s in symmetries])
