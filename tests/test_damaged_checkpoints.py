"""`nm-optim train --resume` with a damaged or foreign checkpoint: one clear UserError that names
the file and what is wrong (the CLI prints it as one line, exit status 1), never a traceback and
never a silent resume that changes the run; and nothing of a finished run is lost."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nm_optim.app.checkpoint import CHECKPOINT_NAME, load_checkpoint
from nm_optim.app.config import TrainConfig, UserError
from nm_optim.app.data import Split, TensorData
from nm_optim.app.loop import train

CONFIG = TrainConfig(model="tiny", data="tiny", lr=0.05, momentum=0.9, weight_decay=1e-3, batch_size=20,
                     steps=6, checkpoint_every=3, seed=3)


def tiny_data(n=60) -> Split:
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (n,), generator=gen)
    images = torch.randn(n, 1, 4, 4, generator=gen)
    make = lambda k: TensorData(f"tiny/{k}", images, labels, ["a", "b", "c"], [0.0], [1.0], scale=1.0)  # noqa: E731
    return Split(make("train"), make("test"))


def tiny_model(config, shape, num_classes, width=12) -> nn.Module:
    torch.manual_seed(config.seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, width), nn.ReLU(), nn.Linear(width, num_classes))


def run(out, *, resume=False, config=CONFIG, model_fn=tiny_model):
    return train(config, out, resume=resume, progress=False, data=tiny_data(), model_fn=model_fn,
                 symmetries_fn=lambda model, example: [], track="layers", write_outputs=True)


@pytest.fixture
def finished(tmp_path):
    run(tmp_path)
    assert (tmp_path / CHECKPOINT_NAME).is_file() and (tmp_path / "record.npz").is_file()
    return tmp_path


def damage(path, edit):
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)


@pytest.mark.parametrize("what,edit,message", [
    ("empty", lambda p: p.write_bytes(b""), "is empty"),
    ("truncated", lambda p: p.write_bytes(p.read_bytes()[:200]), "damaged"),
    ("text", lambda p: p.write_text("hello"), "damaged"),
])
def test_an_unreadable_checkpoint_is_one_clear_error(finished, what, edit, message):
    edit(finished / CHECKPOINT_NAME)
    with pytest.raises(UserError, match=message) as e:
        load_checkpoint(finished / CHECKPOINT_NAME)
    assert str(finished / CHECKPOINT_NAME) in str(e.value) and "\n" not in str(e.value)
    assert "mmap" not in str(e.value), "torch's internals are not the user's problem"


@pytest.mark.parametrize("key", ["model", "recorder", "config", "rng", "step", "optimizer"])
def test_a_checkpoint_missing_a_part_names_it(finished, key):
    damage(finished / CHECKPOINT_NAME, lambda s: s.pop(key))
    with pytest.raises(UserError, match=f"no '{key}'"):
        load_checkpoint(finished / CHECKPOINT_NAME)


def test_weights_that_do_not_fit_the_model_are_a_user_error(finished):
    wide = lambda config, shape, n: tiny_model(config, shape, n, width=13)  # noqa: E731
    with pytest.raises(UserError, match="do not fit"):
        run(finished, resume=True, config=TrainConfig(**{**CONFIG.to_dict(), "steps": 9}), model_fn=wide)


def test_an_empty_optimizer_state_does_not_resume_with_momentum_reset(finished):
    damage(finished / CHECKPOINT_NAME, lambda s: s["optimizer"].__setitem__("state", {}))
    with pytest.raises(UserError, match="momentum buffers"):
        run(finished, resume=True, config=TrainConfig(**{**CONFIG.to_dict(), "steps": 9}))


def test_a_failed_resume_keeps_the_finished_runs_record(finished):
    before = (finished / "record.npz").read_bytes()
    damage(finished / CHECKPOINT_NAME, lambda s: s["recorder"]["meta"].pop("steps"))
    with pytest.raises(UserError, match="recorder"):
        run(finished, resume=True, config=TrainConfig(**{**CONFIG.to_dict(), "steps": 9}))
    assert (finished / "record.npz").read_bytes() == before


def test_the_cli_prints_one_line(finished, capsys):
    from nm_optim.app.cli import main

    (finished / CHECKPOINT_NAME).write_bytes(b"")
    assert main(["train", "--out", str(finished), "--resume"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is empty" in err and "Traceback" not in err
