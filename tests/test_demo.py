"""`nm-optim demo`'s settings do what its figures claim (docs/theory.md): the underdamped runs
show several periods of the oscillation, the period its comments give is 2π/√(ω² − γ²)/lr,
`--full` prints its estimate before training and trains VGG with every core, and the shuffled
labels keep the images."""

from __future__ import annotations

import math

import pytest
import torch

from nm_optim import theory
from nm_optim.app import demo


def _period_steps(run, kind):
    h, gamma, omega2 = theory.oscillator_parameters(run.lr, run.momentum, 0.0, run.weight_decay, kind)
    assert theory.regime(gamma, omega2) == "underdamped"
    return 2 * math.pi / math.sqrt(omega2 - gamma * gamma) / h


def test_the_underdamped_runs_show_several_periods():
    runs = {e.name: (r, e.symmetry) for r in demo.DEMO_RUNS for e in r.experiments if e.oscillation}
    scale = _period_steps(*runs["momentum_oscillation"])
    translation = _period_steps(*runs["translation_oscillation"])
    assert round(scale) == 316 and round(translation) == 288  # the numbers in demo.py's comment
    assert demo.DEMO_STEPS / scale >= 3 and demo.DEMO_STEPS / translation >= 3
    vgg = _period_steps(demo.FULL_MOMENTUM_RUN, "translation")
    assert round(vgg) == 66 and demo.FULL_MOMENTUM_STEPS / vgg >= 1.5


def test_full_prints_its_estimate_first_and_trains_vgg_with_every_core(monkeypatch, tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("sklearn")
    seen = []

    class Stop(Exception):
        pass

    def fake_train(config, *args, **kwargs):
        seen.append(("train", config.model, torch.get_num_threads()))
        raise Stop

    monkeypatch.setattr(demo, "DEMO_RUNS", ())
    monkeypatch.setattr(demo, "_collapse_runs", lambda *a, **k: [])
    monkeypatch.setattr(demo, "_print_estimate", lambda *a, **k: seen.append(("estimate",)))
    monkeypatch.setattr(demo, "train", fake_train)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(Stop):
            demo.run_demo(tmp_path, full=True, progress=False, device="cpu")
    finally:
        torch.set_num_threads(threads)
    assert seen[0] == ("estimate",)
    assert seen[1] == ("train", "vgg16_bn", 2)


def test_shuffled_labels_keep_the_images():
    pytest.importorskip("sklearn")
    digits = demo.load_digits()
    mixed = demo.shuffled(digits)
    assert torch.equal(mixed.train.images, digits.train.images)
    assert sorted(mixed.train.labels.tolist()) == sorted(digits.train.labels.tolist())
    assert (mixed.train.labels != digits.train.labels).float().mean() > 0.5
