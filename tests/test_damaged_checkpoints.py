"""`nm-optim train --resume` with a damaged or foreign checkpoint: one clear UserError that names
the file and what is wrong (the CLI prints it as one line, exit status 1), never a traceback and
never a silent resume that changes the run; and nothing of a finished run is lost.

Two kinds of damage: bytes flipped on disk (torch.load checks no CRC: the checkpoint's SHA-256
seal must catch every one), and a well-formed file whose fields are wrong (each field is checked
for type, shape, range and consistency, and the error names the file and the field)."""

from __future__ import annotations

import shutil
import struct

import pytest
import torch
from torch import nn

from nm_optim.app.checkpoint import CHECKPOINT_NAME, load_checkpoint, write_checkpoint
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
    """Edit a field and write the checkpoint back sealed, as nm_optim writes it: the field checks,
    not the checksum, must catch it."""
    state = torch.load(path, weights_only=True)
    edit(state)
    write_checkpoint(path, state)


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


# -- a real checkpoint of `nm-optim train` on the digits ------------------------------------------------------

DIGITS_STEPS = 12  # past the first loss-log entry (every 10 steps): the log and the pending losses are non-empty


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """`nm-optim train` on the digits with momentum (buffers in the checkpoint), checkpointed at
    its last step: a small real checkpoint (~0.1 MB)."""
    pytest.importorskip("sklearn")
    from nm_optim.app.cli import main

    out = tmp_path_factory.mktemp("digits") / "run"
    code = main(["train", "--model", "mlp", "--data", "digits", "--steps", str(DIGITS_STEPS), "--batch-size", "32",
                 "--lr", "0.05", "--momentum", "0.9", "--checkpoint-every", str(DIGITS_STEPS), "--out", str(out),
                 "--no-progress", "--quiet"])
    assert code == 0
    return out


def files(folder):
    """Every file under `folder` with its bytes: what a failed resume must leave as it was."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def resume_fails_in_one_line(folder, capsys, *fields):
    """Resume `folder` through the CLI: exit status 1, one line on stderr naming the checkpoint
    (and `fields`), and nothing of the run's outputs changed."""
    from nm_optim.app.cli import main

    before = files(folder)
    code = main(["train", "--out", str(folder), "--resume", "--steps", str(DIGITS_STEPS + 2), "--no-progress", "--quiet"])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("nm-optim: error: "), (code, err)
    assert str(folder / CHECKPOINT_NAME) in lines[0], lines[0]
    for field in fields:
        assert field in lines[0], f"{field!r} not named in: {lines[0]}"
    assert files(folder) == before, "a failed resume changed the run's outputs"
    return lines[0]


def test_the_digits_checkpoint_resumes(digits_run, tmp_path, capsys):
    """The control: the undamaged checkpoint resumes (so every failure below is the damage's). It
    is still a plain torch.save zip (torch.load reads it, every member's CRC-32 holds), with the
    SHA-256 of the bytes before it in the archive comment."""
    import hashlib
    import zipfile

    from nm_optim.app.cli import main

    path = digits_run / CHECKPOINT_NAME
    assert torch.load(path, weights_only=True)["step"] == DIGITS_STEPS
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None
        comment = z.comment
    prefix = b"nm_optim.checkpoint sha256:"
    assert comment.startswith(prefix)
    data = path.read_bytes()
    assert data.endswith(comment) and hashlib.sha256(data[: -len(comment)]).hexdigest().encode() == comment[len(prefix):]

    shutil.copytree(digits_run, tmp_path / "run")
    code = main(["train", "--out", str(tmp_path / "run"), "--resume", "--steps", str(DIGITS_STEPS + 2),
                 "--no-progress", "--quiet"])
    assert code == 0, capsys.readouterr().err


def test_every_flipped_byte_is_refused(digits_run, tmp_path, capsys):
    """One bit flipped at positions spread over the whole file, and every byte of the last 256
    (the zip directory, its end record and the checksum): each resume fails in one line naming
    the file, none resumes silently. A full-file digest leaves no byte unchecked, so no flip may
    resume at all (not even one in zip padding)."""
    run = tmp_path / "run"
    shutil.copytree(digits_run, run)
    ckpt = run / CHECKPOINT_NAME
    good = ckpt.read_bytes()
    n = len(good)
    positions = sorted(set(range(0, n, max(1, n // 150))) | set(range(max(0, n - 256), n)) | set(range(64)))
    silent = []
    for i in positions:
        damaged = bytearray(good)
        damaged[i] ^= 1 << (i % 8)
        ckpt.write_bytes(bytes(damaged))
        try:
            resume_fails_in_one_line(run, capsys)
        except AssertionError as e:
            silent.append((i, str(e).splitlines()[0][:120]))
    ckpt.write_bytes(good)
    assert not silent, f"{len(silent)} of {len(positions)} flipped bytes were not refused, e.g. {silent[:5]}"


def test_an_unsealed_version_1_checkpoint_is_checked_by_its_zip_crcs(digits_run, tmp_path):
    """A checkpoint from before the seal still loads, and a flipped tensor byte in it is caught by
    its zip member's CRC-32 (torch.load would read it silently)."""
    import zipfile

    path = tmp_path / CHECKPOINT_NAME
    state = torch.load(digits_run / CHECKPOINT_NAME, weights_only=True)
    state["version"] = 1
    torch.save(state, path)
    assert load_checkpoint(path)["step"] == DIGITS_STEPS
    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda m: m.file_size)  # the largest tensor
    data = bytearray(path.read_bytes())
    # the member's data starts after its local header (30 bytes, the name, the local extra field)
    name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)
    data[info.header_offset + 30 + name_len + extra_len + 5] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match=f"{info.filename} fails its CRC-32") as e:
        load_checkpoint(path)
    assert str(path) in str(e.value)
    state["version"] = 2  # a version-2 checkpoint without its seal is damaged, whatever its CRCs say
    torch.save(state, path)
    with pytest.raises(UserError, match="lost the checksum"):
        load_checkpoint(path)


def _buffer(state, shape):
    buf = state["optimizer"]["state"][0]["momentum_buffer"]
    state["optimizer"]["state"][0]["momentum_buffer"] = torch.zeros(shape, dtype=buf.dtype)


def _set(*keys_and_value):
    *keys, value = keys_and_value

    def edit(state):
        target = state
        for k in keys[:-1]:
            target = target[k]
        target[keys[-1]] = value(target[keys[-1]]) if callable(value) else value
    return edit


MALFORMED = [
    ("version-string", _set("version", "2"), ["version"]),
    ("version-zero", _set("version", 0), ["version"]),
    ("step-string", _set("step", "x"), ["step"]),
    ("step-negative", _set("step", -1), ["step"]),
    ("step-not-the-recorders", _set("step", DIGITS_STEPS + 1), ["recorder.step"]),
    ("losses-string", _set("losses", "x"), ["losses"]),
    ("losses-entry", _set("losses", [["a", 1.0]]), ["losses[0]"]),
    ("losses-value", _set("losses", [[10, "low"]]), ["losses[0]"]),
    ("losses-nan", _set("losses", [[10, float("nan")]]), ["losses[0]"]),
    ("losses-too-many", _set("losses", [[10, 1.0], [20, 1.0]]), ["losses"]),
    ("rng-empty", _set("rng", {}), ["rng"]),
    ("rng-empty-state", _set("rng", {"torch": torch.empty(0, dtype=torch.uint8)}), ["rng['torch']"]),
    ("rng-invalid-state", _set("rng", {"torch": torch.zeros(5056, dtype=torch.uint8)}), ["rng['torch']"]),
    ("rng-wrong-dtype", _set("rng", "torch", lambda t: t.float()), ["rng['torch']"]),
    ("config-string", _set("config", "x"), ["config"]),
    ("config-lr", _set("config", "lr", "fast"), ["config.lr"]),
    ("config-lr-tensor", _set("config", "lr", torch.ones(3, 3)), ["config.lr"]),
    ("config-steps", _set("config", "steps", 1.5), ["config.steps"]),
    ("config-nesterov", _set("config", "nesterov", "yes"), ["config.nesterov"]),
    ("config-missing", lambda s: s["config"].pop("momentum"), ["config", "'momentum'"]),
    ("config-unknown", _set("config", "speed", 3), ["config", "'speed'"]),
    ("config-model", _set("config", "model", "alexnet"), ["config.model", "alexnet"]),
    ("config-data", _set("config", "data", "mnist"), ["config.data", "mnist"]),
    ("buffer-shape", lambda s: _buffer(s, (3, 5)), ["momentum_buffer"]),
    ("buffer-same-numel", lambda s: _buffer(s, tuple(reversed(s["model"]["1.weight"].shape))), ["momentum_buffer"]),
    ("buffer-string", _set("optimizer", "state", 0, "momentum_buffer", "x"), ["momentum_buffer"]),
    ("optimizer-lr-string", _set("optimizer", "param_groups", 0, "lr", "fast"), ["param_groups[0].lr"]),
    ("optimizer-lr-other", _set("optimizer", "param_groups", 0, "lr", 0.5), ["param_groups[0].lr"]),
    ("optimizer-momentum-other", _set("optimizer", "param_groups", 0, "momentum", 0.0), ["param_groups[0].momentum"]),
    ("optimizer-string", _set("optimizer", "x"), ["optimizer"]),
    ("optimizer-index-twice", _set("optimizer", "param_groups", 0, "params", lambda ps: [ps[0]] * len(ps)),
     ["optimizer.state", "param_groups"]),
    ("optimizer-one-param-less", _set("optimizer", "param_groups", 0, "params", lambda ps: ps[:-1]),
     ["optimizer.state", "param_groups"]),
    ("pending-string", _set("pending_losses", "x"), ["pending_losses"]),
    ("pending-entry", _set("pending_losses", 0, "x"), ["pending_losses[0]"]),
    ("pending-too-few", _set("pending_losses", lambda p: p[:1]), ["pending_losses"]),
    ("model-string", _set("model", "x"), ["model"]),
    ("model-dtype", _set("model", "1.weight", lambda t: t.double()), ["model['1.weight']"]),
    ("model-shape", _set("model", "1.weight", lambda t: t[:-1]), ["model['1.weight']"]),
    ("model-missing", lambda s: s["model"].pop("1.bias"), ["1.bias"]),
    ("recorder-string", _set("recorder", "x"), ["recorder"]),
]


@pytest.mark.parametrize("what,edit,fields", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_a_malformed_field_is_one_line_naming_the_file_and_the_field(digits_run, tmp_path, capsys, what, edit, fields):
    run = tmp_path / "run"
    shutil.copytree(digits_run, run)
    damage(run / CHECKPOINT_NAME, edit)
    line = resume_fails_in_one_line(run, capsys, *fields)
    assert "--lr" not in line and "--model" not in line, f"a checkpoint's field is not a command-line option: {line}"


@pytest.mark.parametrize("key,value", [("maximize", True), ("foreach", torch.ones(3, 3)), ("param_names", ["a"] * 6)],
                         ids=["maximize", "foreach", "param_names"])
def test_an_optimizer_setting_the_config_does_not_hold_must_be_the_runs(digits_run, tmp_path, capsys, key, value):
    """load_state_dict takes every param_groups entry from the checkpoint: one the config does not
    hold (maximize: the run would climb the loss) must be the rebuilt optimizer's."""
    run = tmp_path / "run"
    shutil.copytree(digits_run, run)
    damage(run / CHECKPOINT_NAME, _set("optimizer", "param_groups", 0, key, value))
    resume_fails_in_one_line(run, capsys, f"param_groups[0].{key}")
