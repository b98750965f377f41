"""`nm_optim.load_record` on a damaged or foreign file: one RecordError (a ValueError) that names
the file and what is wrong with it, never a raw numpy / zipfile / json error, never a record
that loads and fails later; `nm-optim plot` prints it as one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import nm_optim
from nm_optim.record import RecordError


@pytest.fixture
def record_path(tmp_path):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 3))
    opt = nm_optim.SGD([w], lr=0.1, momentum=0.9, track=[(w, "rows"), (w, "all")])
    for _ in range(50):
        w.grad = torch.randn_like(w)
        opt.step()
    return opt.recorder.save(tmp_path / "run.npz")


def rewrite(path, edit):
    """Rewrite the .npz with `edit(arrays: dict)` applied."""
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    edit(arrays)
    np.savez(path, **arrays)


def check(path, message):
    with pytest.raises(RecordError, match=message) as e:
        nm_optim.load_record(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    assert "allow_pickle" not in str(e.value)
    return e.value


def test_a_good_record_loads(record_path):
    assert len(nm_optim.load_record(record_path)) == 50


def test_a_truncated_file(record_path):
    data = record_path.read_bytes()
    record_path.write_bytes(data[: len(data) // 2])
    check(record_path, "damaged")


@pytest.mark.parametrize("content", [b"hello, this is text\n", bytes(range(256)) * 10, b""])
def test_a_file_that_is_not_a_record(tmp_path, content):
    path = tmp_path / "x.npz"
    path.write_bytes(content)
    check(path, "not an nm_optim record")


def test_a_npy_array(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.zeros(3))
    check(path, "single array")


def test_a_missing_file(tmp_path):
    check(tmp_path / "nothing.npz", "no such file")


@pytest.mark.parametrize("key", ["meta", "steps", "stats_0", "first", "skipped", "hyper_lr"])
def test_a_missing_entry_is_named(record_path, key):
    rewrite(record_path, lambda a: a.pop(key))
    check(record_path, repr(key) if key != "meta" else "'meta'")


def test_meta_that_is_not_json(record_path):
    rewrite(record_path, lambda a: a.__setitem__("meta", np.array("{not json")))
    check(record_path, "meta")


def test_meta_without_tracks(record_path):
    def edit(a):
        meta = json.loads(str(a["meta"]))
        meta.pop("tracks")
        a["meta"] = np.array(json.dumps(meta))
    rewrite(record_path, edit)
    check(record_path, "'tracks'")


def test_arrays_that_disagree(record_path):
    rewrite(record_path, lambda a: a.__setitem__("stats_0", a["stats_0"][:10]))
    err = check(record_path, "stats_0")
    assert "10" in str(err) and "50" in str(err)


def test_a_foreign_npz(tmp_path):
    path = tmp_path / "x.npz"
    np.savez(path, a=np.zeros(3))
    check(path, "not an nm_optim record")


def test_plot_prints_one_line(record_path, tmp_path, capsys):
    from nm_optim.app.cli import main

    record_path.write_bytes(b"garbage")
    assert main(["plot", str(record_path), "--out", str(tmp_path / "figs")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(record_path) in err and "Traceback" not in err


def test_a_save_killed_by_sigkill_leaves_nothing_behind_after_the_next_save(tmp_path):
    """A writer killed mid-save leaves its temporary file; the next save of that path removes
    it (its writer is gone), and never touches a live writer's file."""
    import os
    import signal
    import subprocess
    import sys
    import textwrap

    target = tmp_path / "run.rec.npz"
    script = textwrap.dedent(f"""
        import time, sys
        from nm_optim._io import atomic_write
        def write(f):
            f.write(b"x" * 1000)
            f.flush()
            print("writing", flush=True)
            time.sleep(60)
        atomic_write({str(target)!r}, write)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    leftovers = list(tmp_path.glob(".run.rec.npz.*.tmp"))
    assert len(leftovers) == 1
    live = tmp_path / f".run.rec.npz.{os.getpid()}.0123.tmp"  # this process: alive
    live.write_bytes(b"in progress")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert leftovers[0].exists(), "SIGKILL runs no cleanup"

    from nm_optim._io import atomic_write

    atomic_write(target, lambda f: f.write(b"done"))
    assert target.read_bytes() == b"done"
    assert not leftovers[0].exists() and live.exists()
