"""Resume: a run interrupted after a checkpoint and resumed from it ends exactly where an
uninterrupted run ends — parameters, BatchNorm buffers, momentum buffers, the loss log and the
record, bit for bit — and the recorder's state_dict round-trips on its own."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
from torch import nn

import nm_optim
from nm_optim.app.checkpoint import CHECKPOINT_NAME, load_checkpoint, resume_config
from nm_optim.app.config import TrainConfig, UserError
from nm_optim.app.data import Split, TensorData
from nm_optim.app.loop import epoch_order, train


def tiny_data(n=96, seed=0) -> Split:
    """Separable-ish 1x4x4 images, 3 classes: enough signal that training moves."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=gen)
    images = torch.randn(n, 1, 4, 4, generator=gen) + labels.view(-1, 1, 1, 1).float()
    make = lambda k: TensorData(f"tiny/{k}", images, labels, ["a", "b", "c"], [0.0], [1.0], scale=1.0)
    return Split(make("train"), make("test"))


def tiny_model(config, shape, num_classes) -> nn.Module:
    """BatchNorm (buffers), Dropout (the RNG) and a Linear head: what a resume must restore."""
    torch.manual_seed(config.seed)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(16, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Dropout(0.25), nn.Linear(12, num_classes)
    )


CONFIG = TrainConfig(model="tiny", data="tiny", lr=0.05, momentum=0.9, weight_decay=1e-3, batch_size=20,
                       steps=23, checkpoint_every=5, seed=3)


def run(out, *, resume=False, on_step=None, config=CONFIG):
    return train(config, out, resume=resume, progress=False, data=tiny_data(), model_fn=tiny_model,
                   symmetries_fn=lambda model, example: [], track="layers", on_step=on_step, write_outputs=False)


class Crash(Exception):
    pass


def crash_at(step):
    def on_step(done):
        if done == step:
            raise Crash(f"simulated crash after step {done}")
    return on_step


def assert_same_record(a, b):
    assert [t["name"] for t in a.tracks] == [t["name"] for t in b.tracks]
    assert np.array_equal(a.steps, b.steps)
    for name, x, y in zip([t["name"] for t in a.tracks], a.stats, b.stats):
        assert np.array_equal(x, y), f"stats of {name} differ after resume (max diff {np.abs(x - y).max()})"
    for k in a.hyper:
        assert np.array_equal(a.hyper[k], b.hyper[k], equal_nan=True), k
    assert np.array_equal(a.first, b.first) and np.array_equal(a.skipped, b.skipped)
    strip = lambda m: {k: v for k, v in m.items() if k != "saved_at"}
    assert strip(a.meta) == strip(b.meta)


# 4 batches of 20 per epoch: a crash at step 13 resumes from the checkpoint at 10, mid-epoch 3.
@pytest.mark.parametrize("crash", [13, 10, 4], ids=["mid-epoch", "at-a-checkpoint", "before-any-checkpoint"])
def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, crash):
    whole = run(tmp_path / "whole")
    with pytest.raises(Crash):
        run(tmp_path / "parts", on_step=crash_at(crash))
    if crash < CONFIG.checkpoint_every:
        assert not (tmp_path / "parts" / CHECKPOINT_NAME).exists()
        with pytest.raises(UserError, match="no checkpoint to resume from"):
            run(tmp_path / "parts", resume=True)
        return
    saved = load_checkpoint(tmp_path / "parts" / CHECKPOINT_NAME)
    assert saved["step"] == saved["recorder"]["step"] == crash // CONFIG.checkpoint_every * CONFIG.checkpoint_every
    resumed = run(tmp_path / "parts", resume=True)
    assert resumed.resumed_from == crash // CONFIG.checkpoint_every * CONFIG.checkpoint_every
    assert resumed.steps == whole.steps == CONFIG.steps
    for (name, a), (_, b) in zip(whole.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), f"{name} differs after resume"
    for p, q in zip(whole.optimizer.param_groups[0]["params"], resumed.optimizer.param_groups[0]["params"]):
        assert torch.equal(whole.optimizer.state[p]["momentum_buffer"], resumed.optimizer.state[q]["momentum_buffer"])
    assert whole.losses == resumed.losses
    assert whole.test_accuracy == resumed.test_accuracy
    assert_same_record(whole.record, resumed.record)
    assert len(whole.record) == CONFIG.steps


def test_resume_can_extend_a_finished_run(tmp_path):
    short = TrainConfig(**{**CONFIG.to_dict(), "steps": 10})
    run(tmp_path / "ext", config=short)
    extended = run(tmp_path / "ext", resume=True, config=resume_config(tmp_path / "ext", {"steps": CONFIG.steps}))
    assert extended.resumed_from == 10
    assert_same_record(run(tmp_path / "whole").record, extended.record)


def test_resume_refuses_a_different_trajectory(tmp_path):
    run(tmp_path / "r", config=TrainConfig(**{**CONFIG.to_dict(), "steps": 5}))
    with pytest.raises(UserError, match=r"--lr 0.1 differs from the checkpointed run .* \(0.05\)"):
        resume_config(tmp_path / "r", {"lr": 0.1})
    with pytest.raises(UserError, match="--momentum 0.5 differs"):
        run(tmp_path / "r", resume=True, config=TrainConfig(**{**CONFIG.to_dict(), "momentum": 0.5}))
    (tmp_path / "r" / CHECKPOINT_NAME).write_bytes(b"garbage")
    with pytest.raises(UserError, match="is damaged or not a checkpoint"):
        run(tmp_path / "r", resume=True)


def test_recorder_state_dict_round_trip_continues_the_record():
    """An optimizer rebuilt mid-run from state dicts (on a copy of the model) records the same
    history as the original."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    track = lambda m: [(m[0].weight, "rows"), (m[0].weight, "cols"), (m[2].bias, "all")]
    opt = nm_optim.SGD(model.named_parameters(), lr=torch.tensor(0.1), momentum=0.9, track=track(model))
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)) for _ in range(9)]

    def step(m, o, x, y):
        o.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        o.step()

    for x, y in batches[:4]:
        step(model, opt, x, y)
    twin = copy.deepcopy(model)
    saved = torch.load(_roundtrip((opt.state_dict(), opt.recorder.state_dict())), weights_only=True)
    for x, y in batches[4:]:
        step(model, opt, x, y)

    twin_opt = nm_optim.SGD(twin.named_parameters(), lr=torch.tensor(0.1), momentum=0.9, track=track(twin))
    twin_opt.load_state_dict(saved[0])
    twin_opt.recorder.load_state_dict(saved[1])
    assert len(twin_opt.recorder) == 4
    for x, y in batches[4:]:
        step(twin, twin_opt, x, y)
    a, b = opt.recorder.snapshot(), twin_opt.recorder.snapshot()
    assert list(b.steps) == list(range(9))
    assert b.first[0].all() and not b.first[1:].any(), "the loaded momentum buffers are not first steps"
    assert_same_record(a, b)

    with pytest.raises(ValueError, match="recorder state has tracks"):
        nm_optim.SGD(model.parameters(), lr=0.1, track=[(model[0].weight, "rows")]).recorder.load_state_dict(saved[1])


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def test_each_epoch_visits_every_example_once_in_an_order_fixed_by_seed_and_epoch():
    orders = [epoch_order(50, seed=3, epoch=e) for e in range(3)]
    for o in orders:
        assert sorted(o.tolist()) == list(range(50))
    assert not torch.equal(orders[0], orders[1]) and not torch.equal(orders[1], orders[2])
    assert torch.equal(epoch_order(50, seed=3, epoch=1), orders[1]), "no hidden generator state"
    assert not torch.equal(epoch_order(50, seed=4, epoch=1), orders[1])
