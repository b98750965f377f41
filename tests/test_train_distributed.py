"""`nm-optim train --distributed ddp|fsdp` on two CPU processes (gloo on loopback), launched the
way a user launches it: ``python -m torch.distributed.run --standalone --nproc-per-node 2 -m
nm_optim train ...``.

What is specified:

- a 2-process run (DDP, and FSDP2) writes the record a 1-process run with the same global batch
  writes: same tracks, steps and hyper-parameters; statistics, parameters and momentum buffers
  equal to rounding (see assert_same_run for why not bit for bit), the same loss log;
- rank 0 alone writes: the output folder holds exactly the files of a 1-process run, and the
  run's summary is printed once;
- a 2-process run of K steps resumed with --resume to 2K steps equals the uninterrupted 2K-step
  2-process run bit for bit; its checkpoint also resumes on one process (to rounding);
- mistakes are one-line errors that name the option: an unknown --distributed, --distributed
  without torchrun's environment, a --batch-size that does not split over the processes, and a
  torchrun launch without --distributed.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import nm_optim
from nm_optim.app.checkpoint import CHECKPOINT_NAME
from nm_optim.app.cli import main
from nm_optim.app import distributed as dist_app
from nm_optim.app.distributed import ENV_VARS, Distributed, local_indices

pytest.importorskip("sklearn")  # the digits
pytest.importorskip("matplotlib")  # a run's figures, part of what rank 0 writes

WORLD = 2
STEPS = 12  # past loop.LOG_EVERY: the loss log has an entry
HALF = STEPS // 2
# mlp (no BatchNorm, no dropout: a 2-process run computes what one process computes); momentum
# so that resuming must restore the momentum buffers; batch 32 = 2 x 16.
RUN = ["--model", "mlp", "--data", "digits", "--lr", "0.05", "--momentum", "0.9", "--batch-size", "32",
       "--device", "cpu", "--seed", "1", "--checkpoint-every", str(HALF), "--no-progress"]
# Statistics and parameters after STEPS steps, relative to their layer's scale: measured ~3e-7
# (float32 rounding of a different reduction order, grown over a few steps).
RTOL = 1e-5


def torchrun(out: Path, *args, mode: str) -> subprocess.Popen:
    """Start `nm-optim train` on WORLD processes, as a user launches it; finish() waits for it."""
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
    for k in ENV_VARS:  # the launcher sets them for its workers
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(WORLD),
           "-m", "nm_optim", "train", *RUN, "--out", str(out), "--distributed", mode, *map(str, args)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> str:
    """The stdout of a torchrun launch, after checking it succeeded."""
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"{' '.join(proc.args)} timed out")
    assert proc.returncode == 0, f"{' '.join(proc.args)} failed:\n{(stdout + stderr)[-6000:]}"
    return stdout


def one_process(out: Path, *args) -> None:
    assert main(["train", *RUN, "--out", str(out), "--quiet", *map(str, args)]) == 0


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The runs the tests compare (folder, stdout): 1 process, DDP and FSDP2 for STEPS steps;
    FSDP2 for HALF steps resumed to STEPS on 2 processes and, from a copy, on 1."""
    tmp = tmp_path_factory.mktemp("dist")
    launched: list[subprocess.Popen] = []

    def launch(*args, **kwargs):
        launched.append(torchrun(*args, **kwargs))
        return launched[-1]

    try:
        # The launches spend much of their time starting up and waiting for each other
        # (rendezvous, barriers): three at once finish sooner than one after another.
        started = {mode: launch(tmp / mode, "--steps", STEPS, mode=mode) for mode in ("ddp", "fsdp")}
        first_half = launch(tmp / "resumed", "--steps", HALF, mode="fsdp")
        one_process(tmp / "one", "--steps", STEPS)
        out = {"one": (tmp / "one", None)}
        out.update({mode: (tmp / mode, finish(proc)) for mode, proc in started.items()})
        finish(first_half)
        shutil.copytree(tmp / "resumed", tmp / "resumed_on_one")
        resumed = launch(tmp / "resumed", "--resume", "--steps", STEPS, mode="fsdp")
        one_process(tmp / "resumed_on_one", "--resume", "--steps", STEPS)
        out["resumed"] = (tmp / "resumed", finish(resumed))
        out["resumed_on_one"] = (tmp / "resumed_on_one", None)
    finally:
        for proc in launched:  # a failure above must not leave launches running
            if proc.poll() is None:
                proc.terminate()  # SIGTERM: torchrun stops its workers too
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
    return out


# -- comparing runs ------------------------------------------------------------------------------------------


def layer_scale(record, i: int) -> np.ndarray:
    """Each statistic's scale in track i, per step and column: a bound on the sum of |terms| of
    the sum (Cauchy-Schwarz: sum|x| <= sqrt(n sum x^2), sum|x y| <= sqrt(sum x^2 sum y^2)),
    maxed over the track's groups. Per layer, not per group: a nearly dead ReLU unit's gradient
    is a cancellation of per-example terms far larger than itself, so its own size says nothing
    about the rounding of a different reduction order."""
    t, s = record.tracks[i], record.stats[i]
    shape, axis = t["shape"], t["axis"]
    n = math.prod(shape) // (shape[0] if axis == "rows" else shape[1] if axis == "cols" else 1)
    pp, gg, vv = s[..., 3], s[..., 4], s[..., 5]
    bound = np.stack([np.sqrt(n * pp), np.sqrt(n * gg), np.sqrt(n * vv), pp, gg, vv,
                      np.sqrt(pp * gg), np.sqrt(pp * vv), np.sqrt(gg * vv)], -1)
    return bound.max(axis=1, keepdims=True)


def without(meta: dict, *keys: str) -> dict:
    return {k: v for k, v in meta.items() if k not in keys}


def assert_same_run(a_dir: Path, b_dir: Path, exact: bool) -> None:
    """The records and final checkpoints of two runs agree: bit for bit (`exact`), or to RTOL of
    each layer's scale. Why not bit for bit across process counts: each process sums the loss
    gradient over its 16 examples and DDP / FSDP's reduce-scatter add the two halves, where one
    process sums 32 examples in another order (float32 addition is not associative); the
    difference, ~1e-7 of a layer's gradient, then grows slowly over the steps."""
    a, b = nm_optim.load_record(a_dir / "record.npz"), nm_optim.load_record(b_dir / "record.npz")
    assert [t["name"] for t in a.tracks] == [t["name"] for t in b.tracks] and len(a.tracks) >= 5
    assert np.array_equal(a.steps, b.steps) and np.array_equal(a.steps, np.arange(STEPS))
    for k in a.hyper:
        assert np.array_equal(a.hyper[k], b.hyper[k], equal_nan=True), k
    assert np.array_equal(a.first, b.first) and np.array_equal(a.skipped, b.skipped)
    assert without(a.meta, "training", "saved_at") == without(b.meta, "training", "saved_at")
    ta, tb = a.meta["training"], b.meta["training"]
    assert ta["config"] == tb["config"] and ta["steps_done"] == tb["steps_done"] == STEPS
    assert [s for s, _ in ta["loss"]] == [s for s, _ in tb["loss"]] == [10]
    ca = torch.load(a_dir / CHECKPOINT_NAME, weights_only=True)
    cb = torch.load(b_dir / CHECKPOINT_NAME, weights_only=True)
    assert ca["step"] == cb["step"] == STEPS and ca["model"].keys() == cb["model"].keys()
    buffers = lambda c: [s["momentum_buffer"] for _, s in sorted(c["optimizer"]["state"].items())]
    tensors = list(zip(ca["model"].values(), cb["model"].values())) + list(zip(buffers(ca), buffers(cb)))
    assert len(tensors) == 2 * len(ca["model"])  # every param has its momentum buffer
    if exact:
        for i, (x, y) in enumerate(zip(a.stats, b.stats)):
            assert np.array_equal(x, y, equal_nan=True), f"{a.tracks[i]['name']}: max diff {np.nanmax(np.abs(x - y))}"
        assert ta == tb
        assert all(torch.equal(x, y) for x, y in tensors)
        return
    for i, (x, y) in enumerate(zip(a.stats, b.stats)):
        # A track of a scale or rescale symmetry reduces the products only: the other columns NaN in both.
        assert np.array_equal(np.isnan(x), np.isnan(y)), a.tracks[i]["name"]
        err = float(np.nanmax(np.abs(x - y) / np.maximum(layer_scale(a, i), 1e-300)))
        assert err <= RTOL, f"{a.tracks[i]['name']}: error {err:.2e} of the layer's scale"
    np.testing.assert_allclose([v for _, v in ta["loss"]], [v for _, v in tb["loss"]], rtol=RTOL)
    # a test example whose two top logits are within rounding could flip: allow one of ~360
    assert abs(ta["test_accuracy"] - tb["test_accuracy"]) <= 1.5 / 360
    for x, y in tensors:
        assert float((x - y).abs().max()) <= RTOL * float(x.abs().max()), "params or momentum differ"


def files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# -- the specification ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_record_what_one_process_records_with_the_same_global_batch(runs, mode):
    assert_same_run(runs["one"][0], runs[mode][0], exact=False)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_only_rank_0_writes(runs, mode):
    folder, stdout = runs[mode]
    # exactly the files of a 1-process run: no second record stream, no rank-1 leftovers
    assert files(folder) == files(runs["one"][0])
    assert {"record.npz", "checkpoint.pt", "summary.json", "record/meta.json"} <= set(files(folder))
    assert stdout.count(f"{STEPS} steps in") == 1, stdout  # the summary is printed once, by rank 0
    import json

    summary = json.loads((folder / "summary.json").read_text())
    assert summary["runs"][0]["distributed"] == {"mode": mode, "world_size": WORLD}
    assert "distributed" not in json.loads((runs["one"][0] / "summary.json").read_text())["runs"][0]


def test_resumed_on_two_processes_equals_the_uninterrupted_run(runs):
    folder, stdout = runs["resumed"]
    assert f"resumed at step {HALF}" in stdout
    assert_same_run(runs["fsdp"][0], folder, exact=True)


def test_a_two_process_checkpoint_resumes_on_one_process(runs):
    # the checkpoint holds whole tensors (the shards gathered), the 1-process format
    assert_same_run(runs["one"][0], runs["resumed_on_one"][0], exact=False)


def test_each_rank_takes_its_contiguous_share_of_the_global_batch():
    idx = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    shares = [local_indices(idx, Distributed("ddp", r, 3, r)) for r in range(3)]
    assert [len(s) for s in shares] == [4, 4, 4]
    assert torch.equal(torch.cat(shares), idx)  # together, in rank order: the 1-process batch


# -- mistakes ------------------------------------------------------------------------------------------------


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


@pytest.fixture
def torchrun_env(monkeypatch):
    """The environment torchrun gives rank 0 of 2 (nothing listens at MASTER_PORT: the errors
    below must come before any process group is formed)."""
    for k, v in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": "9"}.items():
        monkeypatch.setenv(k, v)


def test_an_unknown_mode_names_the_option(capsys, tmp_path):
    code, err = run_cli(capsys, "train", *RUN, "--steps", 1, "--out", tmp_path / "o", "--distributed", "bogus")
    assert code == 2 and "argument --distributed: invalid choice: 'bogus'" in err and "ddp" in err
    assert "Traceback" not in err


def test_distributed_without_torchrun_says_how_to_launch(capsys, tmp_path, monkeypatch):
    for k in ENV_VARS:
        monkeypatch.delenv(k, raising=False)
    code, err = run_cli(capsys, "train", *RUN, "--steps", 1, "--out", tmp_path / "o", "--distributed", "fsdp")
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert "--distributed fsdp needs the environment torchrun" in err and "RANK" in err and "torchrun --nproc-per-node" in err
    assert not (tmp_path / "o").exists()


def test_a_batch_that_does_not_split_over_the_processes_names_batch_size(capsys, tmp_path, torchrun_env):
    code, err = run_cli(capsys, "train", *RUN, "--steps", 1, "--batch-size", 15, "--out", tmp_path / "o",
                        "--distributed", "ddp")
    assert code == 1 and err.count("\n") == 1
    assert "--batch-size 15 does not split evenly over the 2 processes" in err and "multiple of 2" in err
    assert not torch.distributed.is_initialized() and not (tmp_path / "o").exists()


def test_a_torchrun_launch_without_distributed_is_refused(capsys, tmp_path, torchrun_env):
    # each process would train the whole run and write the same --out
    code, err = run_cli(capsys, "train", *RUN, "--steps", 1, "--out", tmp_path / "o")
    assert code == 1 and "WORLD_SIZE=2" in err and "--distributed ddp or fsdp" in err
    assert not (tmp_path / "o").exists()


# -- ending ----------------------------------------------------------------------------------------------

# A process that ends by end_process (as every torchrun worker of `nm-optim train --distributed`
# does): a stream with a writer thread, chunks still queued, and buffered stdout.
END_PROCESS = """
import sys, torch, nm_optim
from torch import nn
from nm_optim.app.distributed import end_process
lin = nn.Linear(4, 2)
opt = nm_optim.SGD(lin.parameters(), lr=0.1, track="layers")
opt.recorder.chunk = 2
opt.recorder.stream_to(sys.argv[1], background=True)
for _ in range(8):
    lin(torch.randn(3, 4)).sum().backward()
    opt.step()
print("written", end="")
sys.stderr.write("to stderr")
end_process(3)
"""


def test_a_worker_ends_with_its_status_and_loses_nothing_it_wrote(tmp_path):
    # end_process skips the interpreter's finalisation (gloo's threads may abort it, see there):
    # what a normal exit would still have done, flush the streams and the record's queued chunks,
    # must be done before
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout into a pipe: buffered
    proc = subprocess.run([sys.executable, "-c", END_PROCESS, str(tmp_path / "rec")], capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "written" and proc.stderr.endswith("to stderr")
    assert len(nm_optim.load_record(tmp_path / "rec")) == 8


def test_a_worker_that_joined_the_process_group_ends_through_end_process(capsys, monkeypatch):
    ended = []
    monkeypatch.setattr(dist_app, "joined", lambda: True)
    monkeypatch.setattr(dist_app, "end_process", ended.append)
    code = main(["plot", "/nonexistent/record.npz", "--out", "/nonexistent/figures"])
    assert code == 1 and ended == [1]
