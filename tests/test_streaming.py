"""Record streams (nm_optim.recorder, "Where the collected chunks go"): a streamed record equals
the in-memory one bit for bit, host memory stays bounded, a crash loses at most the chunk being
written, checkpoints hold the stream's length and a resume cuts the stream back to it, float32
streams round each sum once, and a damaged stream is one RecordError naming it."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

import nm_optim
from nm_optim.record import RecordError, RecordStream
from nm_optim.record.format import STREAM_INDEX, STREAM_META
from nm_optim.record.stream import _StreamReader
from nm_optim.recorder import Recorder


def make(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    tracks = [(model[0].weight, "rows"), (model[0].weight, "cols"), (model[0].bias, "all"), (model[2].weight, "all")]
    opt = nm_optim.SGD(model.named_parameters(), lr=torch.tensor(0.1), momentum=0.9, weight_decay=1e-3, track=tracks)
    return model, opt


def batches(n, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)) for _ in range(n)]


def step(model, opt, x, y, sched=None):
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    if sched is not None:
        sched.step()


def assert_same(a, b):
    assert [t["name"] for t in a.tracks] == [t["name"] for t in b.tracks]
    assert np.array_equal(a.steps, b.steps)
    for x, y in zip(a.stats, b.stats):
        assert x.shape == y.shape and np.array_equal(x, y)
    assert set(a.hyper) == set(b.hyper)
    for k in a.hyper:
        assert np.array_equal(a.hyper[k], b.hyper[k], equal_nan=True), k
    assert np.array_equal(a.first, b.first) and np.array_equal(a.skipped, b.skipped)


@pytest.mark.parametrize("background", [True, False], ids=["writer-thread", "in-line"])
def test_a_streamed_record_equals_the_in_memory_one(tmp_path, background):
    (ma, oa), (mb, ob) = make(), make()
    for o in (oa, ob):
        o.recorder.chunk = 4
    sa = torch.optim.lr_scheduler.StepLR(oa, 5, 0.5)
    sb = torch.optim.lr_scheduler.StepLR(ob, 5, 0.5)
    path = ob.recorder.stream_to(tmp_path / "rec", background=background)
    for x, y in batches(23):
        step(ma, oa, x, y, sa)
        step(mb, ob, x, y, sb)
    memory = oa.recorder.snapshot()
    streamed = ob.recorder.snapshot()
    loaded = nm_optim.load_record(path)
    assert len(loaded) == 23 and loaded.tracks == memory.tracks
    assert_same(memory, streamed)
    assert_same(memory, loaded)
    assert all(isinstance(s, np.memmap) for s in loaded.stats), "stats are memory-mapped, not loaded"
    assert np.allclose(loaded.hyper["lr"][:, 0], [0.1] * 5 + [0.05] * 5 + [0.025] * 5 + [0.0125] * 5 + [0.00625] * 3)
    # the .npz export of a streamed record is the same record
    assert_same(memory, nm_optim.load_record(loaded.save(tmp_path / "r.npz")))
    assert sorted(p.name for p in path.iterdir()) == ["index.jsonl", "meta.json", "stats-0.bin"]


def test_streaming_keeps_host_memory_bounded(tmp_path):
    lin = nn.Linear(4, 2)
    opts = {}
    for mode in ("memory", "stream"):
        opts[mode] = nm_optim.SGD(lin.parameters(), lr=1e-3, momentum=0.9, track=[(lin.weight, "rows"), (lin.bias, "all")])
        opts[mode].recorder.chunk = 16
    opts["stream"].recorder.stream_to(tmp_path / "rec", fsync=False)
    sizes = {"memory": [], "stream": []}
    for i in range(2000):
        for p in lin.parameters():
            p.grad = torch.full_like(p, 1e-3)
        for mode, opt in opts.items():
            opt.step()
            if i % 400 == 399:
                sizes[mode].append(opt.recorder.host_bytes)
    per_record = 3 * 9 * 8 + 8 + 2 + 1
    assert max(sizes["stream"]) <= (64 + 2 * 16) * per_record, "keep_records + 2 queued chunks, whatever the length"
    assert sizes["memory"] == sorted(sizes["memory"]) and sizes["memory"][-1] > 4 * sizes["memory"][0]
    assert len(nm_optim.load_record(tmp_path / "rec")) >= 2000 - 16


def stream_ten_steps(folder):
    """10 steps streamed to `folder` in chunks of 4: 8 records on disk, 2 not yet."""
    model, opt = make()
    opt.recorder.chunk = 4
    path = opt.recorder.stream_to(folder)
    for x, y in batches(10):
        step(model, opt, x, y)
    return opt, path


def test_a_crash_loses_at_most_the_chunk_being_written(tmp_path):
    opt, path = stream_ten_steps(tmp_path / "rec")
    # 8 records in two chunks are on disk, 2 on the device. A crash mid-append leaves stats of a
    # chunk without its index line, or half a line:
    opt.recorder.stream.drain()
    rows = opt.recorder.stream.rows[0]
    with open(path / "stats-0.bin", "ab") as f:
        f.write(b"\x01" * (rows * 9 * 8 * 3 + 5))
    with open(path / STREAM_INDEX, "ab") as f:
        f.write(b'{"records":4,"steps":[8,9')
    reference = make()[1]
    reference.recorder.chunk = 4
    loaded = nm_optim.load_record(path)
    assert list(loaded.steps) == list(range(8))
    # continuing the stream cuts the torn index line; the next chunk's stats go over the torn ones
    stream = RecordStream.open(path)
    assert stream.records == 8
    assert (path / STREAM_INDEX).read_bytes().endswith(b"\n")
    again = _StreamReader(path).chunk(4, 8)
    again.steps = again.steps + 4  # steps increase through a stream: these are steps 8..11
    stream.append(again)
    continued = nm_optim.load_record(path)
    assert list(continued.steps) == list(range(12))
    assert np.array_equal(continued.stats[0][8:], continued.stats[0][4:8])


def test_checkpoints_refer_to_the_stream_and_resuming_cuts_it_back(tmp_path):
    """An optimizer rebuilt from state dicts after records were written past the checkpoint
    records exactly what an uninterrupted run records."""
    data = batches(17)
    whole_model, whole = make()
    whole.recorder.chunk = 3
    for x, y in data:
        step(whole_model, whole, x, y)

    model, opt = make()
    opt.recorder.chunk = 3
    opt.recorder.stream_to(tmp_path / "rec")
    for x, y in data[:10]:
        step(model, opt, x, y)
    twin = [p.detach().clone() for p in model.parameters()]
    saved = copy.deepcopy((opt.state_dict(), opt.recorder.state_dict()))
    assert saved[1]["stream"]["records"] == 10 and all(s.shape[0] == 0 for s in saved[1]["stats"]), "the position, not the history"
    for x, y in data[10:15]:  # written past the checkpoint, then "crash"
        step(model, opt, x, y)
    assert opt.recorder.stream.records > 10

    resumed_model, resumed = make()
    with torch.no_grad():
        for p, q in zip(resumed_model.parameters(), twin):
            p.copy_(q)
    resumed.recorder.chunk = 3
    resumed.load_state_dict(saved[0])
    resumed.recorder.load_state_dict(saved[1])  # the stream at its recorded path
    assert len(resumed.recorder) == 10 and resumed.recorder.steps_done == 10
    for x, y in data[10:]:
        step(resumed_model, resumed, x, y)
    assert_same(whole.recorder.snapshot(), resumed.recorder.snapshot())  # which writes the partial chunk
    assert_same(whole.recorder.snapshot(), nm_optim.load_record(tmp_path / "rec"))

    # a stream shorter than the checkpoint says is refused, and nothing is cut
    _, short = make()
    state = dict(saved[1], stream=dict(saved[1]["stream"], records=999))
    with pytest.raises(ValueError, match="fewer than the 999"):
        short.recorder.load_state_dict(state)
    assert len(nm_optim.load_record(tmp_path / "rec")) == 17


# A record loaded (memory-mapped) before a resume cuts its stream back, read after the cut. Run in
# a child process: a read past the end of a shortened file is SIGBUS, which would kill pytest.
READ_ACROSS_A_CUT = """
import copy, sys, torch, nm_optim
from torch import nn
torch.manual_seed(0)
lin = nn.Linear(64, 64)
opt = nm_optim.SGD(lin.parameters(), lr=0.1, momentum=0.9, track="layers")
opt.recorder.chunk = 2
path = opt.recorder.stream_to(sys.argv[1], background=False)
def step():
    lin(torch.randn(3, 64)).sum().backward()
    opt.step()
    opt.zero_grad()
for _ in range(4):
    step()
state = copy.deepcopy(opt.recorder.state_dict())
for _ in range(200):
    step()
before = nm_optim.load_record(path)
last = before.stats[0][-1].copy()
opt.recorder.load_state_dict(state)  # the stream is cut back to 4 records
assert (before.stats[0][-1] == last).all()  # its pages past the cut are still there
for _ in range(2):
    step()
print(len(nm_optim.load_record(path)), (before.stats[0][4] == nm_optim.load_record(path).stats[0][4]).all())
"""


def test_a_record_loaded_before_a_resume_cuts_its_stream_stays_readable(tmp_path):
    # (shortening the stats files killed any process that had them mapped, e.g. a notebook or a
    # live plot watching the run, with SIGBUS; they are overwritten in place instead)
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", READ_ACROSS_A_CUT, str(tmp_path / "rec")], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-3000:]}"
    # the new run's records replace the cut ones, in the old mapping too
    assert proc.stdout.split() == ["6", "True"]


def test_a_stream_whose_stats_file_is_shorter_than_its_index_is_refused(tmp_path):
    opt, path = stream_ten_steps(tmp_path / "rec")
    opt.recorder.stream.drain()
    del opt
    size = (path / "stats-0.bin").stat().st_size
    with open(path / "stats-0.bin", "r+b") as f:
        f.truncate(size - 8)
    with pytest.raises(RecordError, match="damaged record: stats-0.bin holds 7 records, index.jsonl lists 8"):
        RecordStream.open(path)


def test_an_in_memory_checkpoint_loaded_into_a_streaming_recorder_restarts_the_stream(tmp_path):
    data = batches(9)
    model, opt = make()
    for x, y in data[:5]:
        step(model, opt, x, y)
    state = opt.recorder.state_dict()
    _, other = make()
    other.recorder.stream_to(tmp_path / "rec")
    other.recorder.load_state_dict(state)
    assert nm_optim.load_record(tmp_path / "rec").steps.tolist() == [0, 1, 2, 3, 4]


def test_a_float32_stream_rounds_each_sum_once(tmp_path):
    (ma, oa), (mb, ob) = make(), make()
    ob.recorder.stream_to(tmp_path / "rec", dtype="float32")
    for x, y in batches(12):
        step(ma, oa, x, y)
        step(mb, ob, x, y)
    assert_same(ob.recorder.snapshot(), rounded := nm_optim.load_record(tmp_path / "rec"))
    exact = oa.recorder.snapshot()
    for a, b in zip(exact.stats, rounded.stats):
        assert b.dtype == np.float32 and np.array_equal(a.astype(np.float32), b)
        assert np.all(np.abs(b - a) <= 2.0**-24 * np.abs(a))
    assert (tmp_path / "rec" / "stats-0.bin").stat().st_size == 12 * sum(t["num_groups"] for t in exact.tracks) * 9 * 4


def test_stream_to_refuses_a_folder_in_use(tmp_path):
    _, opt = make()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a record stream"):
        opt.recorder.stream_to(tmp_path / "busy")
    _, first = make()
    first.recorder.stream_to(tmp_path / "rec")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        opt.recorder.stream_to(tmp_path / "rec")
    opt.recorder.stream_to(tmp_path / "rec", overwrite=True)
    with pytest.raises(RuntimeError, match="already streams"):
        opt.recorder.stream_to(tmp_path / "other")
    with pytest.raises(ValueError, match="dtype"):
        make()[1].recorder.stream_to(tmp_path / "x", dtype="float16")


@pytest.fixture
def stream(tmp_path):
    opt, path = stream_ten_steps(tmp_path / "rec")
    opt.recorder.snapshot()
    return path


def check(path, message):
    with pytest.raises(RecordError, match=message) as e:
        nm_optim.load_record(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_damaged_streams_are_one_record_error(stream):
    assert len(nm_optim.load_record(stream)) == 10
    lines = (stream / STREAM_INDEX).read_text().splitlines(keepends=True)
    (stream / STREAM_INDEX).write_text(lines[0] + "garbage\n" + "".join(lines[1:]))
    check(stream, "line 2 of index.jsonl")
    (stream / STREAM_INDEX).write_text("".join(lines))
    data = (stream / "stats-0.bin").read_bytes()
    (stream / "stats-0.bin").write_bytes(data[: len(data) // 2])
    check(stream, "holds 5 records, index.jsonl lists 10")
    meta = json.loads((stream / STREAM_META).read_text())
    (stream / STREAM_META).write_text(json.dumps(dict(meta, stream={})))
    check(stream, "meta.json fails its checksum")
    del meta["crc32"]  # a meta.json rewritten without its checksum: the layout is checked still
    (stream / STREAM_META).write_text(json.dumps(dict(meta, stream={})))
    check(stream, "no valid 'stream' layout")
    (stream / STREAM_META).write_text("{not json")
    check(stream, "meta.json is not valid JSON")
    (stream / STREAM_META).unlink()
    check(stream, "folder without meta.json")
    check(stream / "absent", "no such file")


@pytest.mark.parametrize("crash", [13, 4], ids=["past-the-checkpoint", "before-any-checkpoint"])
def test_train_streams_and_a_resume_cuts_the_stream_back(tmp_path, monkeypatch, crash):
    """nm-optim train's loop, with chunks of 3 steps: records past the checkpoint at step 10 are
    on disk when the run crashes at 13; the resumed run's record equals an uninterrupted one."""
    from test_resume import CONFIG, Crash, crash_at, run

    from nm_optim.app.checkpoint import CHECKPOINT_NAME, load_checkpoint

    record_every, _, meta = Recorder.__init__.__defaults__
    monkeypatch.setattr(Recorder.__init__, "__defaults__", (record_every, 3, meta))
    whole = run(tmp_path / "whole")
    with pytest.raises(Crash):
        run(tmp_path / "parts", on_step=crash_at(crash))
    if crash < CONFIG.checkpoint_every:  # a fresh run replaces the stream of the crashed one
        assert len(nm_optim.load_record(tmp_path / "parts" / "record")) == 3
        again = run(tmp_path / "parts")
        assert_same(whole.record, again.record)
        return
    assert len(nm_optim.load_record(tmp_path / "parts" / "record")) == 13, "chunks after the checkpoint"
    state = load_checkpoint(tmp_path / "parts" / CHECKPOINT_NAME)["recorder"]
    assert state["stream"]["records"] == 10 and all(s.shape[0] == 0 for s in state["stats"]) and state["meta"]["steps"] == []
    resumed = run(tmp_path / "parts", resume=True)
    for out, result in (("whole", whole), ("parts", resumed)):
        assert_same(result.record, nm_optim.load_record(tmp_path / out / "record"))
    assert_same(whole.record, resumed.record)
    assert len(resumed.record) == CONFIG.steps
    assert nm_optim.load_record(tmp_path / "parts" / "record").meta["training"]["steps_done"] == CONFIG.steps


def test_a_resume_without_its_stream_is_a_user_error(tmp_path):
    import shutil

    from test_resume import CONFIG, run

    from nm_optim.app.config import TrainConfig, UserError

    run(tmp_path / "r", config=TrainConfig(**{**CONFIG.to_dict(), "steps": 5}))
    shutil.rmtree(tmp_path / "r" / "record")
    with pytest.raises(UserError, match="record stream of checkpoint .* cannot be continued"):
        run(tmp_path / "r", resume=True)


def test_a_stream_replaced_by_another_run_is_refused(tmp_path):
    _, opt = make()
    opt.recorder.stream_to(tmp_path / "rec")
    state = opt.recorder.state_dict()
    _, other = make()
    other.recorder.stream_to(tmp_path / "rec", overwrite=True)  # a new run in the same folder
    with pytest.raises(ValueError, match="another run replaced it"):
        make()[1].recorder.load_state_dict(state)


def test_a_write_error_of_the_writer_thread_reaches_the_training_thread(tmp_path, monkeypatch):
    model, opt = make()
    opt.recorder.chunk = 2
    opt.recorder.stream_to(tmp_path / "rec")

    def broken(self, chunk):
        raise OSError("disk full")

    monkeypatch.setattr(RecordStream, "_write", broken)
    with pytest.raises(OSError, match="writing a chunk failed: disk full"):
        for x, y in batches(10):
            step(model, opt, x, y)
            opt.recorder.stream.drain()


HOLD_A_STREAM = """
import sys
from nm_optim.record import RecordStream
s = RecordStream.open(sys.argv[1])
print("holding", flush=True)
sys.stdin.readline()
"""


def test_a_stream_this_process_writes_is_refused_to_another_process(tmp_path):
    """Two writers would interleave the chunks of two runs (every rank of a distributed run
    streaming to one folder): the second process is refused, and told the cure."""
    import subprocess
    import sys

    opt, path = stream_ten_steps(tmp_path / "rec")  # opt's recorder keeps streaming there
    other = subprocess.run([sys.executable, "-c", "import sys; from nm_optim.record import RecordStream; "
                            "RecordStream.open(sys.argv[1])", str(path)], capture_output=True, text=True, timeout=120)
    assert other.returncode != 0
    assert "being written by another process" in other.stderr and "rank 0" in other.stderr
    assert opt.recorder.stream.records == 8


def test_a_stream_another_process_writes_is_refused_here_until_it_is_gone(tmp_path):
    """The other way round, through the recorder too; reading is never refused; the kernel drops
    the lock with its process, so a crashed writer leaves nothing stale."""
    import gc
    import subprocess
    import sys

    path = tmp_path / "rec"
    stream_ten_steps(path)  # garbage: its recorder's partial chunk is written at the next safe point
    gc.collect()
    assert len(nm_optim.load_record(path)) == 10  # that point: and the folder is free again
    holder = subprocess.Popen([sys.executable, "-c", HOLD_A_STREAM, str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(RuntimeError, match="another process.*rank 0"):
            RecordStream.open(path)
        _, opt = make()
        with pytest.raises(RuntimeError, match="another process"):
            opt.recorder.stream_to(path, overwrite=True)
        assert nm_optim.load_record(path).steps.shape == (10,)  # reading is never refused
    finally:
        holder.kill()  # as a crash would
        holder.wait(timeout=60)
    RecordStream.open(path)  # the holder is gone, and its lock with it
