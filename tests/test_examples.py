"""The README's examples run and do what they say."""

from __future__ import annotations

import pytest

from helpers import load_example as load


def test_train_small_example_runs_and_tracks_torch(capsys):
    result = load("train_small").main(["--steps", "40"])
    losses = result["losses"]["nm_optim.SGD"]
    assert sum(losses[-5:]) < sum(losses[:5]), "the model learns"
    assert result["drift"] < 1e-5, "nm_optim.SGD and torch.optim.SGD agree to float32 rounding"
    assert "max |w_nm_optim - w_torch|" in capsys.readouterr().out


def test_theory_quickstart_runs_the_readme_api_and_the_theory_holds(tmp_path, capsys):
    """The README's "API in a dozen lines" on digits: every symmetry kind is found, and the
    exact recursion predicts each measured quantity (scale within BatchNorm's eps breaking)."""
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    figure = tmp_path / "theory.png"
    result = load("theory_quickstart").main(["--steps", "60", "--figure", str(figure)])
    kinds = {p.kind for p in result.predictions}
    assert kinds == {"translation", "scale", "rescale"}
    for p in result.predictions:
        assert float(p.exact_error.max()) < 1e-3, f"{p.name}: exact error {float(p.exact_error.max()):.2e}"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "exact" in capsys.readouterr().out
