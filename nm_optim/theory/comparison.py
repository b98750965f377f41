"""Comparing the theory with a record: the errors of every symmetry's predictions, per group, as a
summary table and a JSON-able dict (`compare`, `Comparison`).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from nm_optim.theory.prediction import (
    Prediction,
    RecordLike,
    check_consecutive,
    predict,
    symmetries_of,
)


@dataclass
class Comparison:
    """Per symmetry: its Prediction and errors per group: max over steps |prediction − measured|
    / the quantity's natural scale at that step (`errors.natural_scale`), over the run and over
    its last tenth ("late")."""

    predictions: list[Prediction]

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for p in self.predictions:
            finite = lambda a: float(np.nanmax(a)) if a.size and np.isfinite(a).any() else float("nan")
            count, tail = p.nonfinite
            diverged = [int(t) for t in tail if t >= 0]
            out.append({
                "symmetry": p.name, "kind": p.kind, "groups": p.num_groups, "steps": len(p.steps),
                "max_exact_error": finite(p.exact_error),
                "max_exact_late_error": finite(p.exact_late_error),
                "max_exact_breaking_error": finite(p.exact_breaking_error),
                "max_paper_error": finite(p.paper_error),
                "max_paper_late_error": finite(p.paper_late_error),
                "max_gradient_flow_error": finite(p.gradient_flow_error),
                "max_breaking": finite(np.abs(p.breaking)), "max_breaking_ratio": finite(p.breaking_ratio),
                "paper_applies": p.paper_applies, "paper_reason": p.paper_reason,
                "paper_valid": p.paper_valid, "paper_caveats": p.paper_caveats,
                "mixed_hyper": p.mixed_note, "paper_mixed_groups": p.paper_mixed,
                "max_mismatch_effect": finite(p.mismatch_effect),
                "nonfinite_steps": int(count.max()) if count.size else 0,
                "diverged_at": min(diverged) if diverged else None,
                "segments": [s.to_dict() for s in p.segments],
            })
        return out

    def table(self) -> str:
        """The summary table: symmetry, kind, groups; the max errors (against each quantity's
        natural scale at each step) of the exact recursion over the run and over its last tenth
        ("exact late"), of the recursion with the measured breaking term kept ("+breaking"), of
        the paper's closed form over the run and its last tenth ("paper late"), of the gradient-flow constant
        (drift from conservation: the no-forcing baseline); "breaking": max_k |⟨g, generator⟩| /
        max_k |g||generator| (see `breaking_ratio`); "non-finite": steps of a group with
        non-finite statistics that GradScaler did not skip (errors are over finite steps only).
        "(n/a)": the closed form does not apply; "(!)": its assumptions fail on a segment or a
        group's members have different hyper-parameters ("mixed:" says how, and what the exact
        laws keep)."""
        head = ("symmetry", "kind", "groups", "exact err", "exact late", "+breaking", "paper err", "paper late",
                "flow err", "breaking", "non-finite")
        lines = []
        for r in self.rows():
            mark = "" if not r["paper_applies"] is False else " (n/a)"
            mark = mark or ("" if r["paper_valid"] else " (!)")
            lines.append((r["symmetry"], r["kind"], str(r["groups"]), f"{r['max_exact_error']:.2e}",
                          f"{r['max_exact_late_error']:.2e}", f"{r['max_exact_breaking_error']:.2e}", f"{r['max_paper_error']:.2e}" + mark,
                          f"{r['max_paper_late_error']:.2e}", f"{r['max_gradient_flow_error']:.2e}",
                          f"{r['max_breaking_ratio']:.1e}", str(r["nonfinite_steps"])))
        widths = [max(len(h), *(len(row[i]) for row in lines)) if lines else len(h) for i, h in enumerate(head)]
        fmt = lambda row: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        out = [fmt(head), "  ".join("-" * w for w in widths), *map(fmt, lines)]
        rows = self.rows()
        notes = {r["paper_reason"] for r in rows if r["paper_reason"]}
        out += [f"(n/a) paper closed form does not apply: {n}" for n in sorted(notes)]
        caveats = sorted({f"{r['symmetry']}: {c}" for r in rows for c in r["paper_caveats"]})
        out += [f"(!) {c}" for c in caveats]
        out += [f"mixed: {r['symmetry']}: {r['mixed_hyper']} (max effect {r['max_mismatch_effect']:.1e})"
                for r in rows if r["mixed_hyper"]]
        out += [f"non-finite: {m}" for m in self.nonfinite_messages()]
        return "\n".join(out)

    def nonfinite_messages(self) -> list[str]:
        """One line per symmetry with non-finite steps that were not GradScaler skips."""
        out = []
        for r in self.rows():
            if r["nonfinite_steps"]:
                what = (f"diverged at step {r['diverged_at']}" if r["diverged_at"] is not None
                        else "a param without a grad, or a diverged step")
                out.append(f"{r['symmetry']} ({r['kind']}): up to {r['nonfinite_steps']} steps of a group have "
                           f"non-finite statistics without a GradScaler skip ({what}); its errors are over the "
                           "finite steps only")
        return out

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: the summary rows with per-group errors."""
        rows = self.rows()
        for r, p in zip(rows, self.predictions):
            r["exact_error"] = [_json_float(x) for x in p.exact_error]
            r["exact_late_error"] = [_json_float(x) for x in p.exact_late_error]
            r["exact_breaking_error"] = [_json_float(x) for x in p.exact_breaking_error]
            r["paper_error"] = [_json_float(x) for x in p.paper_error]
            r["paper_late_error"] = [_json_float(x) for x in p.paper_late_error]
            for k in ("max_exact_error", "max_exact_late_error", "max_exact_breaking_error", "max_paper_error", "max_paper_late_error",
                      "max_gradient_flow_error", "max_breaking", "max_breaking_ratio", "max_mismatch_effect"):
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


def compare(record: RecordLike, symmetries: Sequence[Any] | None = None, *, start: str = "consistent") -> Comparison:
    """Errors of the `exact` and `paper` predictions against the measured trajectories, per
    symmetry and group (max over steps |pred - meas| / the quantity's natural scale at that step:
    translation √n·|θ_A|, scale |θ_A|², rescale |θ_A1|² + |θ_A2|²; see `errors`), for every symmetry (default: those described in the record's meta, so a
    loaded file needs no model). ``print(compare(record))`` prints the summary table. Steps with
    non-finite statistics that were not GradScaler skips (a diverged run) are counted in the
    "non-finite" column and raise a RuntimeWarning. `start`: the paper curve's initial velocity
    (`continuous.paper`; "rest" reproduces the paper's figures as printed)."""
    check_consecutive(record)
    if symmetries is None:
        symmetries = symmetries_of(record)
    result = Comparison([predict(record, s, start=start) for s in symmetries])
    for message in result.nonfinite_messages():
        warnings.warn(message, RuntimeWarning, stacklevel=2)
    return result
