"""The README's example runs and does what it says."""

from __future__ import annotations

import importlib.util
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_small.py"


def test_train_small_example_runs_and_tracks_torch(capsys):
    spec = importlib.util.spec_from_file_location("train_small", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--steps", "40"])
    losses = result["losses"]["nm_optim.SGD"]
    assert sum(losses[-5:]) < sum(losses[:5]), "the model learns"
    assert result["drift"] < 1e-5, "nm_optim.SGD and torch.optim.SGD agree to float32 rounding"
    assert "max |w_nm_optim - w_torch|" in capsys.readouterr().out
