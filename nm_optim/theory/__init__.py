"""The Neural Mechanics theory (Kunin et al., ICLR 2021, sections 4-6), predicted from the recorded
statistics; docs/architecture.md, "The theory".

For every group of every symmetry the package builds trajectories over the recorded steps:

- ``measured``: the conserved-or-not quantity read from the record (translation ``Σp``; scale
  ``Σp²``; rescale ``Σp²(A1) - Σp²(A2)``);
- ``exact``: the discrete one-step recursion of torch's SGD with the symmetry's vanishing term set
  to zero; its error is float rounding plus genuine symmetry breaking (``exact_breaking`` keeps
  the measured breaking term: rounding only);
- ``paper``: the paper's continuous closed forms (modified gradient flow, damped oscillators with
  momentum), propagated step by step, piecewise where the hyper-parameters change;
- ``gradient_flow``: conservation under gradient flow (``lr → 0``, no weight decay): the initial
  value, constant.

Modules, one job each: `laws` (the quantities, the breaking terms, `Schedule` and the exact
recursion), `continuous` (the paper's closed forms), `prediction` (every trajectory of a
record's symmetry), `errors` (the error against each quantity's natural scale), `comparison` (the
errors of all of them: a table, a dict). Numpy only: nm_optim.symmetry (torch) is imported only when a
record's symmetry descriptions are rebuilt.

    from nm_optim import theory
    result = theory.compare(record)          # symmetries from record.meta["symmetries"]
    print(result)                            # the summary table
    pred = theory.predict(record, symmetry)  # .measured, .exact, .paper, .gradient_flow, .time
    # without a Symmetry object: theory.predict_arrays(kind, {"A": stats}, theory.Schedule(...))
    # members with their own hyper-parameters (no weight decay on biases...): one theory.Part
    # per set, theory.predict_parts(kind, parts); theory.parts_of(symmetry, record) builds them

Records must hold consecutive steps (``record_every == 1``): the recursion needs every step.
"""

from __future__ import annotations

from nm_optim.theory.comparison import Comparison, compare
from nm_optim.theory.continuous import (
    VALIDITY_LIMIT,
    Segment,
    damped_oscillator,
    first_order_rate,
    gradient_flow,
    oscillator_parameters,
    oscillator_step,
    paper,
    regime,
)
from nm_optim.theory.errors import LATE_FRACTION, natural_scale, scaled_error, step_error
from nm_optim.theory.laws import (
    VANISHING,
    Part,
    Schedule,
    breaking,
    breaking_bound,
    breaking_ratio,
    buffer_norm_after_step,
    combine,
    exact,
    exact_parts,
    finite_sums,
    measured,
    reference_parts,
    start_steps,
)
from nm_optim.theory.prediction import (
    Prediction,
    RecordLike,
    bias_groups,
    check_consecutive,
    error_floor,
    late_error,
    nonfinite_steps,
    parts_of,
    predict,
    predict_arrays,
    predict_parts,
    relative_error,
    schedule_of,
    symmetries_of,
)

__all__ = [
    "LATE_FRACTION",
    "VALIDITY_LIMIT",
    "VANISHING",
    "Comparison",
    "Part",
    "Prediction",
    "RecordLike",
    "Schedule",
    "Segment",
    "bias_groups",
    "breaking",
    "breaking_bound",
    "breaking_ratio",
    "buffer_norm_after_step",
    "check_consecutive",
    "combine",
    "compare",
    "damped_oscillator",
    "error_floor",
    "exact",
    "exact_parts",
    "finite_sums",
    "first_order_rate",
    "gradient_flow",
    "late_error",
    "measured",
    "natural_scale",
    "nonfinite_steps",
    "oscillator_parameters",
    "oscillator_step",
    "paper",
    "parts_of",
    "predict",
    "predict_arrays",
    "predict_parts",
    "reference_parts",
    "regime",
    "relative_error",
    "scaled_error",
    "schedule_of",
    "start_steps",
    "step_error",
    "symmetries_of",
]
