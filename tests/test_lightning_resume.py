"""NMOptimCallback in a real Lightning Trainer: a run stopped and resumed with
``fit(ckpt_path=...)`` has the record of a run never stopped (the callback keeps the recorder's
state in Lightning's checkpoint) and its loggers receive every nm_optim scalar once per logged
step (``log_dict`` at the trainer's ``log_every_n_steps``), as the CSV file they write shows."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from torch import nn

import nm_optim
from helpers import assert_same_record

pl = pytest.importorskip("lightning.pytorch")
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402

from nm_optim.integrations.lightning import NMOptimCallback  # noqa: E402

STEPS_PER_EPOCH = 4


class Module(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        syms = nm_optim.find_symmetries(self.net, torch.randn(2, 6), loss=nn.functional.cross_entropy)
        return nm_optim.SGD(self.net.named_parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3, symmetries=syms)

    def train_dataloader(self):
        gen = torch.Generator().manual_seed(1)
        x, y = torch.randn(16 * STEPS_PER_EPOCH, 6, generator=gen), torch.randint(0, 3, (16 * STEPS_PER_EPOCH,), generator=gen)
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)


def fit(tmp_path, name, epochs, ckpt_path=None, version=0):
    torch.set_num_threads(1)
    module = Module()
    trainer = pl.Trainer(
        max_epochs=epochs, log_every_n_steps=3, accelerator="cpu", devices=1, enable_progress_bar=False,
        enable_model_summary=False, logger=CSVLogger(tmp_path, name=name, version=version),
        callbacks=[NMOptimCallback(), ModelCheckpoint(dirpath=tmp_path / name / "ckpt", save_last=True)],
    )
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer, trainer.optimizers[0]


def logged(tmp_path, name) -> dict[str, list[tuple[int, float]]]:
    """What CSVLogger wrote, in every version (a resumed fit writes its own: CSVLogger deletes
    the metrics.csv of the version it reuses): tag -> [(step, value)] in order, one per row
    that has it."""
    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted((tmp_path / name).glob("version_*/metrics.csv")):
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                for key, value in row.items():
                    if key != "step" and value not in ("", None):
                        out.setdefault(key, []).append((int(row["step"]), float(value)))
    return out


def test_a_stopped_and_resumed_fit_has_the_uninterrupted_record_and_logs_each_step_once(tmp_path):
    # Stopped at an epoch's end: from there Lightning resumes on the same batches (a checkpoint
    # written by max_steps at an epoch's last batch replays that epoch's first batch).
    total, stop = 4 * STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH
    _, whole = fit(tmp_path, "whole", 4)
    _, opt = fit(tmp_path, "parts", 2)
    assert opt.recorder.steps_done == stop
    resumed, opt = fit(tmp_path, "parts", 4, ckpt_path=tmp_path / "parts" / "ckpt" / "last.ckpt", version=1)
    assert resumed.global_step == total and opt.recorder.steps_done == total
    assert_same_record(whole.recorder.snapshot(), opt.recorder.snapshot())

    want, got = logged(tmp_path, "whole"), logged(tmp_path, "parts")
    tags = {k for k in want if k.startswith("nm_optim/")}
    assert {"nm_optim/hyper/lr", "nm_optim/norm/theta/0.weight"} <= tags
    assert any(k.startswith("nm_optim/conserved/rescale/") for k in tags)
    assert {k for k in got if k.startswith("nm_optim/")} == tags
    for tag in sorted(tags) + ["loss"]:
        steps = [s for s, _ in got[tag]]
        assert len(steps) == len(set(steps)), f"{tag} logged twice at a step: {steps}"
        assert got[tag] == want[tag], tag
    # log_every_n_steps=3: Lightning's steps 2, 5, 8, ... (and no other)
    assert [s for s, _ in got["nm_optim/hyper/lr"]] == list(range(2, total, 3))


def test_a_checkpoint_carries_the_recorder_state(tmp_path):
    fit(tmp_path, "run", 1)
    ckpt = torch.load(tmp_path / "run" / "ckpt" / "last.ckpt", weights_only=True)
    (state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("NMOptimCallback")]
    assert state["recorders"][0]["step"] == STEPS_PER_EPOCH
    assert state["recorders"][0]["meta"]["steps"] == list(range(STEPS_PER_EPOCH))
