"""Nothing recorded is lost at a normal exit, and nothing damaged or malformed loads silently
(nm_optim/recorder.py, "Where the collected chunks go"; nm_optim/record/format.py, "Checksums").

A streamed run that ends normally (the interpreter exits, ``recorder.close()``, a ``with`` block,
nm_optim.app.distributed.end_process) has every recorded step on disk: the scripts below run in
real subprocesses and the folder is read back with load_record."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

import nm_optim

SCRIPT = """
import sys, torch, nm_optim
torch.manual_seed(0)
w = torch.nn.Parameter(torch.randn(4, 3))
opt = nm_optim.SGD([w], lr=0.1, momentum=0.9, track=[(w, "rows"), (w, "all")])
folder = sys.argv[1]
def train(n=300):
    for _ in range(n):
        w.grad = torch.randn_like(w)
        opt.step()
"""

ENDINGS = {
    # the script just ends: the interpreter's shutdown writes the partial chunk
    "exit": "opt.recorder.stream_to(folder)\ntrain()\n",
    # ... also with the writer in the training thread
    "exit-in-line": "opt.recorder.stream_to(folder, background=False)\ntrain()\n",
    # sys.exit from a function holding the optimizer
    "sys-exit": "opt.recorder.stream_to(folder)\ntrain()\nsys.exit(0)\n",
    "with": "with opt.recorder as r:\n    r.stream_to(folder)\n    train()\nassert len(r) == 300\n",
    "close": "opt.recorder.stream_to(folder)\ntrain()\nopt.recorder.close()\nimport os\nos._exit(0)\n",
    "del": "opt.recorder.stream_to(folder)\ntrain()\ndel opt\nimport gc, os\ngc.collect()\nos._exit(0)\n",
    "end_process": "opt.recorder.stream_to(folder)\ntrain()\n"
                   "from nm_optim.app.distributed import end_process\nend_process(0)\n",
    # an exception ends the run: what was recorded before it is on disk too
    "exception": "opt.recorder.stream_to(folder)\ntrain()\nraise SystemExit('stopped')\n",
}


def run_script(body: str, folder) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT + textwrap.dedent(body), str(folder)],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("ending", list(ENDINGS))
def test_every_recorded_step_is_on_disk_after_a_normal_exit(tmp_path, ending):
    folder = tmp_path / "rec"
    done = run_script(ENDINGS[ending], folder)
    assert done.returncode == (1 if ending == "exception" else 0), done.stderr
    record = nm_optim.load_record(folder)
    # 300 steps in chunks of 256: the last 44 are the partial chunk
    assert list(record.steps) == list(range(300))
    assert all(np.isfinite(s).all() for s in record.stats)


def test_close_writes_the_partial_chunk_and_recording_goes_on(tmp_path):
    import torch

    w = torch.nn.Parameter(torch.randn(4, 3))
    opt = nm_optim.SGD([w], lr=0.1, momentum=0.9, track=[(w, "all")])
    opt.recorder.chunk = 8
    folder = opt.recorder.stream_to(tmp_path / "rec")
    for _ in range(11):
        w.grad = torch.randn_like(w)
        opt.step()
    opt.recorder.close()
    assert list(nm_optim.load_record(folder).steps) == list(range(11))
    opt.recorder.close()  # twice: nothing more to write
    for _ in range(3):
        w.grad = torch.randn_like(w)
        opt.step()
    opt.recorder.close()
    assert list(nm_optim.load_record(folder).steps) == list(range(14))


# -- checksums: a damaged file is one RecordError naming it, never a silent wrong load ----------------------


import json  # noqa: E402

import torch  # noqa: E402

from nm_optim.record import RecordError  # noqa: E402
from nm_optim.record.format import STREAM_INDEX, STREAM_META  # noqa: E402


def train(opt, w, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        w.grad = torch.randn(w.shape, generator=gen)
        opt.step()


def recorded(chunk=None):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 3))
    opt = nm_optim.SGD([w], lr=0.1, momentum=0.9, track=[(w, "rows"), (w, "all")])
    if chunk:
        opt.recorder.chunk = chunk
    return opt, w


@pytest.fixture
def stream(tmp_path):
    """A closed stream of 4 chunks of 8 records and a partial one of 3 (35 records)."""
    opt, w = recorded(chunk=8)
    path = opt.recorder.stream_to(tmp_path / "rec")
    train(opt, w, 35)
    opt.recorder.close()
    return path


def same(a, b):
    assert np.array_equal(a.steps, b.steps) and np.array_equal(a.first, b.first)
    assert np.array_equal(a.skipped, b.skipped)
    assert all(np.array_equal(x, y) for x, y in zip(a.stats, b.stats))
    assert all(np.array_equal(a.hyper[k], b.hyper[k], equal_nan=True) for k in a.hyper)


def refused(path, match, **kw):
    with pytest.raises(RecordError, match=match) as e:
        nm_optim.load_record(path, **kw)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    return str(e.value)


def flip(file, offset):
    data = bytearray(file.read_bytes())
    data[offset] ^= 0x10
    file.write_bytes(bytes(data))


def test_a_flipped_byte_in_a_streams_stats_names_the_first_bad_chunk_and_the_prefix_stays_readable(stream):
    whole = nm_optim.load_record(stream)
    row = (stream / "stats-0.bin").stat().st_size // 35  # bytes per record
    for record in (17, 20, 23):  # all in chunk 2 (records 16..23)
        for byte in (0, row // 2, row - 1):
            flip(stream / "stats-0.bin", record * row + byte)
            message = refused(stream, r"stats-0\.bin fails its checksum in chunk 2 \(records 16 to 23")
            assert "records=16" in message  # how to read the intact prefix
            flip(stream / "stats-0.bin", record * row + byte)  # undone
    flip(stream / "stats-0.bin", 20 * row + 3)
    prefix = nm_optim.load_record(stream, records=16)
    assert len(prefix) == 16
    assert np.array_equal(prefix.steps, whole.steps[:16]) and np.array_equal(prefix.first, whole.first[:16])
    assert all(np.array_equal(x, y[:16]) for x, y in zip(prefix.stats, whole.stats))
    refused(stream, "chunk 2", records=17)  # the damaged chunk is not part of an intact prefix
    refused(stream, "records must be", records=36)


def test_a_flipped_byte_in_a_streams_index_or_meta_is_refused(stream):
    lines = (stream / STREAM_INDEX).read_bytes().splitlines(keepends=True)
    start = sum(len(x) for x in lines[:3])
    # a digit of a step or a hyper-parameter changes, the line stays valid JSON
    for i in range(len(lines[3])):
        if chr(lines[3][i]) in "123456789":
            data = bytearray((stream / STREAM_INDEX).read_bytes())
            data[start + i] = ord("1") if data[start + i] != ord("1") else ord("2")
            (stream / STREAM_INDEX).write_bytes(bytes(data))
            try:
                refused(stream, r"(line 4 of index\.jsonl|index\.jsonl)")
            finally:
                (stream / STREAM_INDEX).write_bytes(b"".join(lines))
    nm_optim.load_record(stream)
    meta = (stream / STREAM_META).read_bytes()
    at = meta.index(b'"record_every": 1') + len(b'"record_every": ')
    (stream / STREAM_META).write_bytes(meta[:at] + b"2" + meta[at + 1:])
    refused(stream, r"meta\.json.*checksum")


def test_a_stream_whose_meta_claims_float32_over_float64_data_is_refused(stream):
    from nm_optim.record.format import _seal

    meta = json.loads((stream / STREAM_META).read_text())
    del meta["crc32"]
    meta["stream"]["dtype"] = "float32"
    (stream / STREAM_META).write_text(_seal(json.dumps(meta, indent=1)))
    refused(stream, r"stats-0\.bin.*chunk 0")


def test_every_single_byte_flip_of_a_saved_npz_is_refused_or_harmless(tmp_path):
    opt, w = recorded()
    train(opt, w, 20)
    path = opt.recorder.save(tmp_path / "run.npz")
    whole = nm_optim.load_record(path)
    data = path.read_bytes()
    silent = []
    for offset in range(0, len(data), max(len(data) // 150, 1)):
        damaged = bytearray(data)
        damaged[offset] ^= 0x10
        path.write_bytes(bytes(damaged))
        try:
            loaded = nm_optim.load_record(path)
        except RecordError as e:
            assert str(path) in str(e) and "\n" not in str(e)
            continue
        try:
            same(loaded, whole)
            assert loaded.meta == whole.meta and loaded.tracks == whole.tracks
        except AssertionError:
            silent.append(offset)
    assert not silent, f"flips at {silent} loaded a different record without an error"
