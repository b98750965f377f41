"""docs/recipes.md's "Recipes" run and do what they say: a plain loop with warmup from lr 0, no-decay
groups and a cosine schedule to 0; Lightning with bf16-mixed and clipping; the Hugging Face
Trainer; FSDP2 with symmetries under torchrun (2 gloo processes)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import nm_optim
from helpers import load_example as load

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_plain_loop_with_warmup_no_decay_groups_and_cosine_to_zero():
    pytest.importorskip("sklearn")
    result = load("recipe_warmup").main(["--steps", "60", "--warmup", "8"])
    assert {p.kind for p in result.predictions} == {"translation", "scale", "rescale"}
    for p in result.predictions:
        # fp32 run: the exact law with the measured breaking kept is at float32 rounding
        assert float(np.nanmax(p.exact_breaking_error)) <= 3e-4, p.name


def test_lightning_bf16_mixed_with_clipping_records_every_step(tmp_path):
    pytest.importorskip("lightning")
    pytest.importorskip("sklearn")
    trainer = load("recipe_lightning").main(["--epochs", "1", "--out", str(tmp_path)])
    opt = trainer.optimizers[0]
    assert isinstance(opt, nm_optim.SGD) and trainer.precision == "bf16-mixed" and trainer.gradient_clip_val == 1.0
    record = opt.recorder.snapshot()
    assert trainer.global_step == opt.recorder.steps_done == len(record.steps) > 0
    assert record.hyper["lr"][0, 0] == 0.0, "warmup from lr 0"
    [metrics] = list(Path(tmp_path).rglob("metrics.csv"))
    with open(metrics) as f:
        rows = list(csv.DictReader(f))
    assert any(k.startswith("nm_optim/conserved/") for k in rows[0]), "the callback logged through Lightning"
    assert (Path(tmp_path) / "ckpt" / "last.ckpt").exists()


def test_hugging_face_trainer_sends_the_scalars_to_tensorboard_not_the_console(tmp_path, capsys):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    pytest.importorskip("tensorboard")
    trainer = load("recipe_huggingface").main(["--steps", "10", "--out", str(tmp_path)])
    opt = trainer.optimizer
    while not isinstance(opt, nm_optim.SGD):  # accelerate wraps it
        opt = opt.optimizer
    assert opt.recorder.steps_done == trainer.state.global_step == 10
    assert "nm_optim" not in capsys.readouterr().out
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    [folder] = {p.parent for p in Path(tmp_path).rglob("events.out.tfevents.*")}
    acc = EventAccumulator(str(folder))
    acc.Reload()
    assert any("nm_optim/norm/theta/" in tag for tag in acc.Tags()["scalars"])


def test_fsdp2_with_symmetries_under_torchrun(tmp_path):
    out = tmp_path / "record.npz"
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(EXAMPLES / "recipe_fsdp2.py"), "--steps", "20", "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    record = nm_optim.load_record(out)
    assert len(record.steps) == 20
    result = nm_optim.theory.compare(record)
    assert {p.kind for p in result.predictions} == {"translation", "rescale"}
    for p in result.predictions:
        assert float(np.nanmax(p.exact_error)) <= 1e-4, p.name
