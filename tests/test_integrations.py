"""nm_optim.integrations: the scalars of a recorded step (norms of θ, g, v per parameter, each
symmetry's conserved quantity, hyper-parameters) match the record's sums; TensorBoard event
files, read back with tensorboard's EventAccumulator, hold them every N steps; `nm-optim train
--tensorboard DIR` writes them, and a resumed run keeps every logged value. The Lightning and
Hugging Face callbacks are tested in real trainers: tests/test_lightning_resume.py and
tests/test_hf_resume.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import nm_optim
from nm_optim.integrations import ScalarSource, step_scalars
from nm_optim.names import STAT_INDEX


def model_and_opt(momentum=0.9, every_group=False):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    syms = nm_optim.find_symmetries(model, torch.randn(4, 6), loss=nn.functional.cross_entropy)
    assert sorted(s.kind for s in syms) == ["rescale", "scale", "translation"]
    opt = nm_optim.SGD(model.named_parameters(), lr=0.05, momentum=momentum, weight_decay=1e-3, symmetries=syms,
                       track=[(model[3].weight, "all")])
    return model, opt, syms


def train(model, opt, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x, y = torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def expected(record, i, syms):
    """The scalars of row i, from the record's sums by hand."""
    stats = record.to_numpy()
    out = {}
    for param, track in (("0.weight", "0.weight:rows"), ("0.bias", "0.bias:rows"), ("3.weight", "3.weight:all"),
                         ("3.bias", "3.bias:rows"), ("5.weight", "5.weight:cols"), ("5.bias", "5.bias:all")):
        s = stats[track][i]
        for tag, col in (("theta", "pp"), ("grad", "gg"), ("buffer", "vv")):
            out[f"norm/{tag}/{param}"] = np.sqrt(s[:, STAT_INDEX[col]].sum())
    p, pp = STAT_INDEX["p"], STAT_INDEX["pp"]
    for sym in syms:
        if sym.kind == "translation":
            value = stats["5.weight:cols"][i, :, p].sum() + stats["5.bias:all"][i, :, p].sum()
        elif sym.kind == "scale":
            value = stats["0.weight:rows"][i, :, pp].sum() + stats["0.bias:rows"][i, :, pp].sum()
        else:
            value = (stats["3.weight:rows"][i, :, pp].sum() + stats["3.bias:rows"][i, :, pp].sum()
                     - stats["5.weight:cols"][i, :, pp].sum())
        out[f"conserved/{sym.kind}/{sym.name}"] = value
    for name in nm_optim.names.HYPER_NAMES:
        out[f"hyper/{name}"] = record.hyper[name][i, 0]
    return out


def test_step_scalars_are_the_records_sums():
    model, opt, syms = model_and_opt()
    train(model, opt, 6)
    record = opt.recorder.snapshot()
    for i in (0, 3, 5):
        got, want = step_scalars(record, i), expected(record, i, syms)
        law = {k for k in got if k.startswith(("exact/", "residual/", "breaking/"))}
        assert law == ({f"{tag}/{s.kind}/{s.name}" for tag in ("exact", "residual", "breaking") for s in syms}
                       if i > 0 else set()), "the one-step law needs the previous step"
        assert set(got) - law == set(want)
        for tag in want:
            assert got[tag] == pytest.approx(want[tag], rel=1e-12, abs=1e-300), tag
    assert step_scalars(record, 0)["norm/buffer/0.weight"] == 0.0, "no buffer before the first step"
    # the params' norms are those of the tensors themselves (pre-step values of the last record)
    model2, opt2, _ = model_and_opt()
    train(model2, opt2, 5)
    theta = {n: p.detach().double().norm().item() for n, p in model2.named_parameters() if not n.startswith("1.")}
    for name, value in theta.items():
        assert step_scalars(record, 5)[f"norm/theta/{name}"] == pytest.approx(value, rel=1e-6)


def test_the_source_reads_every_n_steps_from_the_latest_record():
    model, opt, _ = model_and_opt()
    source = ScalarSource(opt, every=4)
    logged = []
    for _ in range(11):
        train(model, opt, 1)
        got = source.read()
        if got is not None:
            logged.append(got[0])
    assert logged == [0, 4, 8]
    with pytest.raises(TypeError, match="nm_optim.SGD"):
        ScalarSource(torch.optim.SGD(model.parameters(), lr=0.1))


def test_tensorboard_event_files_hold_the_records_values(tmp_path):
    pytest.importorskip("tensorboard")
    from nm_optim.integrations.tensorboard import TensorBoardLogger, read_scalars

    model, opt, syms = model_and_opt()
    with TensorBoardLogger(opt, tmp_path / "tb", every=5) as board:
        train(model, opt, 23)
        board.add_scalar("train/custom", 1.5, 7)
    assert opt._optimizer_step_post_hooks == {}, "close() detaches the hook"
    record = opt.recorder.snapshot()
    scalars = read_scalars(tmp_path / "tb")
    assert scalars["train/custom"] == ([7], [1.5])
    want_tags = set(expected(record, 0, syms))
    assert want_tags <= set(scalars)
    for tag in want_tags:
        steps, values = scalars[tag]
        assert steps == [0, 5, 10, 15, 20], tag
        want = [expected(record, s, syms)[tag] for s in steps]
        np.testing.assert_allclose(values, want, rtol=1e-6, atol=1e-30, err_msg=tag)  # events are float32


def test_nm_optim_train_writes_tensorboard(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    from nm_optim.app.cli import main
    from nm_optim.integrations.tensorboard import read_scalars

    out, tb = tmp_path / "run", tmp_path / "tb"
    assert main(["train", "--model", "mlp", "--data", "digits", "--steps", "20", "--batch-size", "32",
                 "--tensorboard", str(tb), "--tensorboard-every", "5", "--out", str(out), "--no-progress", "-q"]) == 0
    record = nm_optim.load_record(out / "record")
    assert len(record) == 20 and (out / "record.npz").is_file()
    scalars = read_scalars(tb)
    assert scalars["train/loss"][0] == [10, 20]
    conserved = [t for t in scalars if t.startswith("conserved/")]
    assert conserved and any(t.startswith("norm/grad/") for t in scalars) and "hyper/lr" in scalars
    for tag in conserved:
        kind, name = tag.split("/")[1:]
        sym = next(s for s in nm_optim.symmetry.symmetries_from_record(record) if s.name == name)
        steps, values = scalars[tag]
        assert steps == [0, 5, 10, 15]
        g = sym.group_stats(record)
        col = STAT_INDEX["p" if kind == "translation" else "pp"]
        want = g["A"][steps, :, col].sum(1) if kind != "rescale" else (g["A1"] - g["A2"])[steps, :, col].sum(1)
        np.testing.assert_allclose(values, want, rtol=1e-6)


def test_the_exact_law_over_the_last_step_is_logged_live():
    """exact / residual / breaking per symmetry from the last two records only: the one-step
    recursion predicts the measured quantity to rounding, and keeping the recorded breaking term
    brings it closer still; without a previous step there is no prediction."""
    from nm_optim import models

    torch.manual_seed(0)
    net = models.get_model("small_vgg_bn", in_channels=1, image_size=8)
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    opt = nm_optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2,
                       symmetries=nm_optim.find_symmetries(net, x[:2], loss=torch.nn.functional.cross_entropy))
    for _ in range(5):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    scalars = step_scalars(opt.recorder.latest(2), -1)
    kinds = {k.split("/")[1] for k in scalars if k.startswith("exact/")}
    assert kinds == {"translation", "scale", "rescale"}
    for key, measured in scalars.items():
        if not key.startswith("conserved/"):
            continue
        name = key.removeprefix("conserved/")
        residual, breaking = scalars[f"residual/{name}"], scalars[f"breaking/{name}"]
        assert abs(residual) <= 1e-5 * max(abs(measured), 1.0), name
        # "Closer still" up to the rounding of the statistics themselves (float32 partial sums,
        # about 1e-7 of the summed magnitudes): where the breaking term is that small (a
        # translation before the classifier's softmax), it is noise, not a correction.
        assert abs(residual - breaking) <= abs(residual) + 1e-7 * max(abs(measured), 1.0), name
    assert not any(k.startswith("exact/") for k in step_scalars(opt.recorder.latest(1), -1))


def test_the_live_law_takes_no_decay_groups_and_warmup_from_zero():
    """The usual recipe: weight decay on weights only, the classifier at its own lr, warmup
    from lr 0. Each member is stepped with its own group's hyper-parameters, so the logged
    residual stays at rounding (it raised ValueError when members' groups differed)."""
    from nm_optim import models

    torch.manual_seed(0)
    net = models.get_model("small_vgg_bn", in_channels=1, image_size=8)
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    syms = nm_optim.find_symmetries(net, x[:2], loss=torch.nn.functional.cross_entropy)
    head = {id(p) for p in net.classifier.parameters()}
    groups = [
        {"params": [p for p in net.parameters() if p.ndim > 1 and id(p) not in head], "weight_decay": 1e-2},
        {"params": [p for p in net.parameters() if p.ndim <= 1 and id(p) not in head], "weight_decay": 0.0},
        {"params": [p for p in net.parameters() if id(p) in head], "lr": 0.02},  # the head at its own lr
    ]
    opt = nm_optim.SGD(groups, lr=0.05, momentum=0.9, symmetries=syms)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, k / 3))  # lr 0 on the first step
    for _ in range(6):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        sched.step()
    assert opt.recorder.snapshot().hyper["lr"][0, 0] == 0.0, "the first step had lr 0"
    scalars = step_scalars(opt.recorder.latest(2), -1)
    assert {k.split("/")[1] for k in scalars if k.startswith("exact/")} == {"translation", "scale", "rescale"}
    for key, measured in scalars.items():
        if key.startswith("conserved/"):
            residual = scalars["residual/" + key.removeprefix("conserved/")]
            assert abs(residual) <= 1e-5 * max(abs(measured), 1.0), key


def test_the_law_holds_group_by_group_and_goes_to_tensorboard_histograms(tmp_path):
    pytest.importorskip("tensorboard")
    from nm_optim.integrations.common import group_values
    from nm_optim.integrations.tensorboard import TensorBoardLogger

    model, opt, syms = model_and_opt()
    logger = TensorBoardLogger(opt, tmp_path / "tb", every=2)
    train(model, opt, 5)
    logger.close()
    values = group_values(opt.recorder.latest(2), -1)
    for sym in syms:
        key = f"{sym.kind}/{sym.name}"
        measured, residual = values[f"measured/{key}"], values[f"residual/{key}"]
        assert measured.shape == residual.shape == (sym.num_groups,)
        assert np.abs(residual).max() <= 1e-5 * max(np.abs(measured).max(), 1.0), key
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"histograms": 0})
    acc.Reload()
    assert any(tag.startswith("groups/residual/") for tag in acc.Tags()["histograms"])


def test_nm_optim_train_resume_keeps_every_logged_loss(tmp_path):
    """`nm-optim train --resume --tensorboard DIR`: the board a stopped and resumed run leaves
    holds what an uninterrupted run's holds: the loss at every 10 steps, including the one logged
    at the resumed step by the first run, and nm_optim's scalars, each at its step once."""
    pytest.importorskip("tensorboard")
    from nm_optim.app.cli import main
    from nm_optim.integrations.tensorboard import read_scalars

    common = ["--tensorboard-every", "5", "--no-progress", "-q"]
    first = ["train", "--model", "mlp", "--data", "digits", "--batch-size", "32", "--checkpoint-every", "15"]
    assert main([*first, "--steps", "40", "--out", str(tmp_path / "whole"),
                 "--tensorboard", str(tmp_path / "tb_whole"), *common]) == 0
    assert main([*first, "--steps", "30", "--out", str(tmp_path / "run"), "--tensorboard", str(tmp_path / "tb"),
                 *common]) == 0
    assert main(["train", "--out", str(tmp_path / "run"), "--resume", "--steps", "40",
                 "--tensorboard", str(tmp_path / "tb"), *common]) == 0
    whole, resumed = read_scalars(tmp_path / "tb_whole"), read_scalars(tmp_path / "tb")
    assert resumed["train/loss"][0] == [10, 20, 30, 40]
    assert set(resumed) == set(whole)
    for tag in whole:
        assert resumed[tag] == whole[tag], tag
