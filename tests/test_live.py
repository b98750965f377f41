"""Watching a run: Recorder.latest(k) / since(step) return exactly the newest records of the
snapshot, and their cost (records and chunks read) does not grow with the history, in memory
and streamed; steps_done counts every optimizer step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import nm_optim
from nm_optim import recorder as recorder_module


def linear_opt(record_every=1, chunk=4):
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    opt = nm_optim.SGD(lin.parameters(), lr=torch.tensor(0.01), momentum=0.9,
                       track=[(lin.weight, "rows"), (lin.weight, "cols"), (lin.bias, "all")], record_every=record_every)
    opt.recorder.chunk = chunk
    return lin, opt


def steps(lin, opt, n, seed=0):
    gen = torch.Generator().manual_seed(seed + opt.recorder.steps_done)
    for _ in range(n):
        for p in lin.parameters():
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()


def same(a, b):
    assert np.array_equal(a.steps, b.steps)
    for x, y in zip(a.stats, b.stats):
        assert np.array_equal(x, y)
    for k in a.hyper:
        assert np.array_equal(a.hyper[k], b.hyper[k], equal_nan=True)
    assert np.array_equal(a.first, b.first) and np.array_equal(a.skipped, b.skipped)
    assert a.tracks == b.tracks


def sliced(record, lo):
    return nm_optim.Record(record.tracks, record.steps[lo:], [s[lo:] for s in record.stats],
                           {k: v[lo:] for k, v in record.hyper.items()}, record.first[lo:], record.skipped[lo:])


@pytest.mark.parametrize("stream", [False, True], ids=["memory", "stream"])
def test_latest_and_since_are_the_tail_of_the_snapshot(tmp_path, stream):
    """Read at every phase of the chunks: partial chunk on the device, chunks collected, and
    (streamed) records only on disk; the reads change nothing that is recorded."""
    lin, opt = linear_opt(chunk=4)
    twin_lin, twin = linear_opt(chunk=4)
    if stream:
        opt.recorder.stream_to(tmp_path / "rec")
        opt.recorder.keep_records = 3
    for n in (1, 2, 3, 5, 1, 4, 7):
        steps(lin, opt, n)
        steps(twin_lin, twin, n)
        whole = twin.recorder.snapshot()
        total = len(whole)
        assert len(opt.recorder) == total and opt.recorder.steps_done == total
        for k in (0, 1, 3, 6, total, total + 5):
            same(opt.recorder.latest(k), sliced(whole, max(total - k, 0)))
        for s in (0, 2, total - 5, total - 1, total, total + 3):
            same(opt.recorder.since(s), sliced(whole, min(max(s, 0), total)))
    same(opt.recorder.snapshot(), twin.recorder.snapshot())


def test_since_with_record_every_and_steps_done():
    lin, opt = linear_opt(record_every=3, chunk=2)
    steps(lin, opt, 10)
    assert opt.recorder.steps_done == 10 and len(opt.recorder) == 4
    assert opt.recorder.since(4).steps.tolist() == [6, 9]
    assert opt.recorder.since(6).steps.tolist() == [6, 9]
    assert opt.recorder.latest(1).steps.tolist() == [9]
    assert opt.recorder.since(10).steps.tolist() == []
    with pytest.raises(ValueError):
        opt.recorder.latest(-1)
    with pytest.raises(TypeError):
        opt.recorder.since(1.5)


@pytest.mark.parametrize("stream", [False, True], ids=["memory", "stream"])
def test_the_cost_of_reading_the_latest_steps_does_not_grow_with_the_history(tmp_path, stream, monkeypatch):
    """Work counted, not timed: records read and segments (chunks) looked at, and, streamed, no
    read of the stream on disk, after 40 and after 4,000 steps."""
    lin, opt = linear_opt(chunk=16)
    if stream:
        opt.recorder.stream_to(tmp_path / "rec", fsync=False)
    disk_reads = []
    original = recorder_module._StreamReader.__init__

    def counting(self, path):
        disk_reads.append(path)
        original(self, path)

    monkeypatch.setattr(recorder_module._StreamReader, "__init__", counting)
    work = {}
    for total in (40, 4000):
        steps(lin, opt, total - opt.recorder.steps_done)
        for name, read in (("latest", lambda: opt.recorder.latest(5)),
                           ("since", lambda: opt.recorder.since(opt.recorder.steps_done - 20))):
            opt.recorder._reads.clear()
            got = read()
            work[name, total] = dict(opt.recorder._reads)
            assert len(got) == (5 if name == "latest" else 20)
    assert disk_reads == []
    for name in ("latest", "since"):
        assert work[name, 40] == work[name, 4000], work
        assert work[name, 4000]["rows"] == (5 if name == "latest" else 20)
        assert work[name, 4000]["segments"] <= 3


def test_old_records_of_a_stream_are_read_from_disk(tmp_path):
    lin, opt = linear_opt(chunk=4)
    twin_lin, twin = linear_opt(chunk=4)
    opt.recorder.stream_to(tmp_path / "rec")
    opt.recorder.keep_records = 4
    steps(lin, opt, 30)
    steps(twin_lin, twin, 30)
    assert opt.recorder.host_bytes < twin.recorder.host_bytes
    same(opt.recorder.since(3), sliced(twin.recorder.snapshot(), 3))


def test_what_is_read_is_a_copy_not_the_recorders_buffers():
    """One track spans the whole stats tensor: a view of the device chunk would change under the
    caller as training goes on."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3, 2))
    opt = nm_optim.SGD([w], lr=0.1, track=[(w, "all")])
    opt.recorder.chunk = 8
    for _ in range(3):
        w.grad = torch.randn_like(w)
        opt.step()
    got = [opt.recorder.latest(2), opt.recorder.since(0), opt.recorder.snapshot()]
    before = [r.stats[0].copy() for r in got]
    for _ in range(20):
        w.grad = torch.randn_like(w)
        opt.step()
    for r, b in zip(got, before):
        assert np.array_equal(r.stats[0], b)
    got[2].stats[0][:] = 0
    assert not np.array_equal(opt.recorder.snapshot().stats[0][:3], got[2].stats[0])
