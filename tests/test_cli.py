"""The `nm-optim` command line: the demo end to end in a reduced mode, `train` on tiny generated
CIFAR-10 and ImageFolder sets with checkpoints and --resume, `plot` on a saved record, and every
user mistake ending in one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from helpers import write_cifar10, write_image_folder

import nm_optim
from nm_optim.app.cli import main
from nm_optim.app.demo import DEMO_RUNS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EXPERIMENT_KEYS = {"name", "symmetry", "model", "optimizer", "steps", "num_groups", "exact_max_rel_err",
                   "paper_max_rel_err", "figure"}
OPTIMIZER_KEYS = {"lr", "momentum", "dampening", "weight_decay", "nesterov"}


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_valid_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path.name} is not a PNG"
    image = pytest.importorskip("matplotlib.image").imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, f"{path.name}: {image.shape}"
    assert float(image[..., :3].std()) > 0.01, f"{path.name} is blank"


def assert_experiment_schema(e, steps):
    assert set(e) >= EXPERIMENT_KEYS, f"missing {EXPERIMENT_KEYS - set(e)}"
    assert e["symmetry"] in ("translation", "scale", "rescale")
    assert set(e["optimizer"]) == OPTIMIZER_KEYS
    assert e["steps"] == steps and isinstance(e["num_groups"], int) and e["num_groups"] > 0
    # the exact recursion holds to rounding plus BatchNorm's eps; the continuous paper form to the
    # finite-lr error: both small, both real numbers (null only where a prediction is missing)
    assert isinstance(e["exact_max_rel_err"], float) and 0 <= e["exact_max_rel_err"] < 1e-2, e
    assert e["paper_max_rel_err"] is None or e["paper_max_rel_err"] >= 0


# -- demo --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    out = tmp_path_factory.mktemp("demo")
    code = main(["demo", "--out", str(out), "--steps", "12", "--no-progress", "--device", "cpu"])
    assert code == 0
    return out


def test_demo_writes_the_summary_schema(demo_dir):
    summary = json.loads((demo_dir / "summary.json").read_text())
    assert summary["version"] == nm_optim.__version__
    assert summary["device"] == "cpu" and summary["backend"] in nm_optim.available_backends("cpu")
    experiments = summary["experiments"]
    assert [e["name"] for e in experiments] == [x.name for r in DEMO_RUNS for x in r.experiments]
    assert {e["symmetry"] for e in experiments} == {"translation", "scale", "rescale"}
    for e in experiments:
        assert_experiment_schema(e, steps=12)
    oscillation = next(e for e in experiments if e["name"] == "momentum_oscillation")
    assert oscillation["optimizer"]["momentum"] == 0.995 and oscillation["symmetry"] == "scale"
    # the underdamped setting is underdamped: gamma < omega for the scale oscillator
    o = oscillation["optimizer"]
    h = o["lr"] * (1 - o["dampening"])
    assert (1 - o["momentum"]) / (h * (1 + o["momentum"])) < math.sqrt(4 * o["weight_decay"] / (h * (1 + o["momentum"])))


def test_demo_figures_are_valid_pngs_and_records_load(demo_dir):
    summary = json.loads((demo_dir / "summary.json").read_text())
    figures = {e["figure"] for e in summary["experiments"]}
    assert {"translation.png", "scale.png", "rescale.png", "momentum_oscillation.png"} <= figures
    for name in figures:
        assert_valid_png(demo_dir / name)
    for run in DEMO_RUNS:
        record = nm_optim.load_record(demo_dir / "records" / f"{run.name}.npz")
        assert len(record) == 12 and record.meta["symmetries"]
        assert record.meta["training"]["config"]["model"] == run.model


def test_plot_redraws_a_demo_record_with_its_oscillation(demo_dir, tmp_path, capsys):
    code, out, err = run_cli(capsys, "plot", demo_dir / "records" / "underdamped_bn.npz", "--out", tmp_path)
    assert code == 0, err
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f"underdamped_bn-{k}.png" for k in ("momentum_oscillation", "rescale", "scale", "translation")]
    for n in names:
        assert_valid_png(tmp_path / n)
    assert "underdamped_bn/momentum_oscillation" in out


def test_demo_prints_a_table(tmp_path, capsys, monkeypatch):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    monkeypatch.setattr("nm_optim.app.demo.DEMO_RUNS", DEMO_RUNS[-1:])
    code, out, err = run_cli(capsys, "demo", "--out", tmp_path, "--steps", 3)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["experiment", "groups"] and "momentum_oscillation" in lines[2]
    pytest.importorskip("tqdm")
    assert "demo 1/1 underdamped_bn" in err and "/3" in err, "a progress bar on stderr"


# -- train and plot ---------------------------------------------------------------------------------------


def test_train_on_cifar10_checkpoints_resumes_and_plots(tmp_path, capsys):
    write_cifar10(tmp_path / "cifar", n_per_batch=8)
    out = tmp_path / "run"
    args = ["train", "--model", "mlp", "--data", f"cifar10:{tmp_path / 'cifar'}", "--lr", 0.05, "--momentum", 0.9,
            "--weight-decay", 1e-3, "--batch-size", 8, "--checkpoint-every", 3, "--out", out, "--no-progress"]
    code, stdout, err = run_cli(capsys, *args, "--steps", 4)
    assert code == 0, err
    assert {"record.npz", "checkpoint.pt", "summary.json"} <= {p.name for p in out.iterdir()}
    summary = json.loads((out / "summary.json").read_text())
    for e in summary["experiments"]:
        assert_experiment_schema(e, steps=4)
        assert_valid_png(out / e["figure"])
    assert summary["runs"][0]["config"]["data"].startswith("cifar10:")
    assert "test accuracy" in stdout

    # continue to 7 steps; the same as running 7 at once
    code, stdout, err = run_cli(capsys, "train", "--out", out, "--resume", "--steps", 7, "--no-progress")
    assert code == 0, err
    assert "resumed at step 4" in stdout
    code, _, err = run_cli(capsys, *[a if a != out else tmp_path / "once" for a in args], "--steps", 7)
    assert code == 0, err
    a, b = nm_optim.load_record(out / "record.npz"), nm_optim.load_record(tmp_path / "once" / "record.npz")
    # (NaN in the columns a product-only track does not reduce)
    assert len(a) == 7 and all(np.array_equal(x, y, equal_nan=True) for x, y in zip(a.stats, b.stats))

    code, stdout, err = run_cli(capsys, "plot", out / "record.npz", "--out", tmp_path / "figs")
    assert code == 0, err
    pngs = sorted(p.name for p in (tmp_path / "figs").iterdir())
    assert pngs and all(p.startswith("record-") for p in pngs)
    for p in pngs:
        assert_valid_png(tmp_path / "figs" / p)


def test_train_on_an_image_folder(tmp_path, capsys):
    write_image_folder(tmp_path / "imgs" / "train", classes=("a", "b"), per_class=4, size=(9, 9))
    code, _, err = run_cli(capsys, "train", "--model", "small_vgg_bn", "--data", f"imagefolder:{tmp_path / 'imgs'}",
                           "--image-size", 8, "--batch-size", 4, "--epochs", 2, "--out", tmp_path / "run",
                           "--no-progress", "--quiet")
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert {e["symmetry"] for e in summary["experiments"]} == {"scale", "rescale", "translation"}
    assert summary["runs"][0]["steps"] == 4 and summary["runs"][0]["test_accuracy"] is None


# -- user errors: one line, non-zero, no traceback ------------------------------------------------------------


def _not_a_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    return tmp_path / "file" / "out"


@pytest.mark.parametrize(
    "argv, code, message",
    [
        (["train", "--model", "mlp", "--data", "cifar10:{tmp}/absent", "--out", "{tmp}/o"], 1,
         "CIFAR-10 folder .*absent does not exist"),
        (["train", "--model", "mlp", "--data", "cifar10:{tmp}/broken", "--out", "{tmp}/o"], 1,
         "is missing data_batch_2"),
        (["train", "--model", "mlp", "--data", "imagefolder:{tmp}/broken", "--out", "{tmp}/o"], 1, "no class subfolders"),
        (["train", "--model", "alexnet", "--data", "digits", "--out", "{tmp}/o"], 1,
         "unknown model 'alexnet'; expected one of: mlp, small_vgg"),
        (["train", "--model", "mlp", "--data", "mnist", "--out", "{tmp}/o"], 1, "unknown data set 'mnist'"),
        (["train", "--model", "mlp", "--data", "digits", "--out", "{notdir}"], 1, "cannot write to output folder"),
        (["demo", "--out", "{notdir}"], 1, "cannot write to output folder"),
        (["train", "--model", "mlp", "--data", "digits", "--lr", "-1", "--out", "{tmp}/o"], 1, "--lr must be a finite number >= 0"),
        (["train", "--model", "mlp", "--data", "digits", "--steps", "0", "--out", "{tmp}/o"], 1, "--steps must be a positive integer"),
        (["train", "--model", "mlp", "--data", "digits", "--batch-size", "5000", "--out", "{tmp}/o"], 1,
         "larger than the training set"),
        (["train", "--model", "mlp", "--data", "digits", "--device", "cuda:7", "--out", "{tmp}/o"], 1, "--device cuda:7"),
        (["train", "--model", "mlp", "--data", "digits", "--backend", "tpu", "--out", "{tmp}/o"], 1, "--backend 'tpu' is unknown"),
        (["train", "--data", "digits", "--out", "{tmp}/o"], 1, "train needs --model"),
        (["train", "--out", "{tmp}/o", "--resume"], 1, "no checkpoint to resume from"),
        (["train", "--model", "mlp", "--data", "digits", "--steps", "3", "--epochs", "1", "--out", "{tmp}/o"], 2,
         "not allowed with argument"),
        (["train", "--model", "mlp", "--data", "digits", "--lr", "fast", "--out", "{tmp}/o"], 2, "invalid float value: 'fast'"),
        (["plot", "{tmp}/absent.npz", "--out", "{tmp}/f"], 1, "record .*absent.npz does not exist"),
        (["plot", "{tmp}/junk.npz", "--out", "{tmp}/f"], 1, "cannot read record .*junk.npz"),
        (["fly"], 2, "invalid choice: 'fly'"),
    ],
    ids=["data-missing", "data-malformed", "imagefolder-flat", "unknown-model", "unknown-data", "train-unwritable",
         "demo-unwritable", "negative-lr", "zero-steps", "batch-too-large", "no-such-gpu", "unknown-backend",
         "no-model", "resume-nothing", "steps-and-epochs", "bad-float", "plot-missing", "plot-junk", "unknown-command"],
)
def test_user_errors_are_one_line(tmp_path, capsys, argv, code, message):
    write_cifar10(tmp_path / "broken", skip=("data_batch_2",))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    notdir = _not_a_folder(tmp_path)
    argv = [a.format(tmp=tmp_path, notdir=notdir) for a in argv]
    got, out, err = run_cli(capsys, *argv)
    assert got == code, err
    assert out == "", "errors go to stderr"
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("nm-optim") and ": error: " in lines[0]
    assert re.search(message, lines[0]), lines[0]


def test_an_interrupted_train_says_how_to_resume(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("nm_optim.app.cli.train", interrupted)
    code, _, err = run_cli(capsys, "train", "--model", "mlp", "--data", "digits", "--out", tmp_path)
    assert code == 130
    assert err == f"nm-optim: interrupted; continue from the last checkpoint with: nm-optim train --out {tmp_path} --resume\n"


def test_resume_with_a_different_setting_is_a_user_error(tmp_path, capsys):
    out = tmp_path / "r"
    assert run_cli(capsys, "train", "--model", "mlp", "--data", "digits", "--steps", 2, "--out", out, "--quiet",
                   "--no-progress", "--checkpoint-every", 1)[0] == 0
    code, _, err = run_cli(capsys, "train", "--out", out, "--resume", "--lr", 0.5, "--no-progress")
    assert code == 1 and err.count("\n") == 1
    assert "--lr 0.5 differs from the checkpointed run" in err


def test_python_dash_m_and_the_console_script(tmp_path):
    res = subprocess.run([sys.executable, "-m", "nm_optim", "plot", str(tmp_path / "none.npz"), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 1 and res.stderr.startswith("nm-optim: error: record") and "Traceback" not in res.stderr
    script = shutil.which("nm-optim") or shutil.which("nm-optim", path=str(sys.prefix) + "/bin")
    if script is None:
        pytest.skip("the nm-optim console script is not installed in this environment (pip install -e . adds it)")
    res = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0 and nm_optim.__version__ in res.stdout


def test_a_sparse_record_is_kept_but_not_compared(tmp_path, capsys):
    code, out, err = run_cli(capsys, "train", "--model", "mlp", "--data", "digits", "--steps", 4, "--record-every", 2,
                             "--out", tmp_path, "--no-progress")
    assert code == 0, err
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["experiments"] == [] and "--record-every 1" in summary["note"] and "--record-every 1" in out
    assert list(nm_optim.load_record(tmp_path / "record.npz").steps) == [0, 2]
