"""nm_optim.SGD is a drop-in torch.optim.SGD at the edges too: duplicate
params, torch's constructor arguments and state-dict keys, tracked params that change shape, file
modes under threads, and small argument / message details."""

from __future__ import annotations

import os
import stat
import threading
import warnings

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from helpers import assert_rel_close, tiny_model
from torch.distributed.checkpoint.state_dict import (
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

import nm_optim
import nm_optim.sgd
from nm_optim import _io
from nm_optim.record import load_record


def _duplicate_run(make_opt, w0, c0, grads):
    """[a, a, c] with a listed twice: three steps with the given grads; a, c and a's buffer."""
    a, c = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(c0.clone())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        opt = make_opt([a, a, c])
    for g in grads:
        a.grad, c.grad = g.clone(), g[: c.numel()].clone()
        opt.step()
    buf = opt.state[a].get("momentum_buffer")
    return a.detach(), c.detach(), buf


def test_a_param_listed_twice_is_stepped_twice_in_order_deterministically_like_torch(monkeypatch):
    """torch.optim.SGD warns at construction and steps a duplicated param once per occurrence, in
    order (the second update sees the first's result; the momentum buffer is shared after the first
    step). nm_optim does the same, and no kernel call ever sees one tensor twice: above 65,536
    elements the CPU kernel's threads would otherwise race on the same memory."""
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.warns(UserWarning) as ours:
        nm_optim.SGD([p, p], lr=0.1)
    with pytest.warns(UserWarning) as theirs:
        torch.optim.SGD([p, p], lr=0.1)
    assert [str(w.message) for w in ours] == [str(w.message) for w in theirs]
    assert "duplicate parameters" in str(ours[0].message)

    calls = []  # per kernel call: (tensors, distinct addresses)
    real_step = nm_optim.sgd.sgd_step_

    def spy(params, *args):
        calls.append((len(params), len({t.data_ptr() for t in params})))
        return real_step(params, *args)

    monkeypatch.setattr(nm_optim.sgd, "sgd_step_", spy)
    gen = torch.Generator().manual_seed(0)
    n = 1 << 18  # with the duplicate, far above the CPU kernel's serial threshold
    w0, c0 = torch.randn(n, generator=gen), torch.randn(1000, generator=gen)
    grads = [torch.randn(n, generator=gen) for _ in range(3)]

    # Plain SGD: the kernel's update is torch's to the bit.
    got = _duplicate_run(lambda ps: nm_optim.SGD(ps, lr=0.1, backend="cpu"), w0, c0, grads)
    want = _duplicate_run(lambda ps: torch.optim.SGD(ps, lr=0.1, foreach=False), w0, c0, grads)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])

    # Momentum, dampening, weight decay: torch's result to rounding, and the same bits every run.
    hyper = {"lr": 0.1, "momentum": 0.9, "dampening": 0.1, "weight_decay": 1e-2}
    runs = [_duplicate_run(lambda ps: nm_optim.SGD(ps, backend="cpu", **hyper), w0, c0, grads) for _ in range(2)]
    want = _duplicate_run(lambda ps: torch.optim.SGD(ps, foreach=False, **hyper), w0, c0, grads)
    for got in runs:
        assert_rel_close(got[0], want[0], 1e-5, "a", floor=1.0)
        assert_rel_close(got[1], want[1], 1e-5, "c", floor=1.0)
        assert_rel_close(got[2], want[2], 1e-5, "a's momentum buffer", floor=1.0)
    assert all(torch.equal(x, y) for x, y in zip(*runs))

    # Tracked, its statistics are those of the pre-step values (its first occurrence's).
    a = torch.nn.Parameter(w0[:4000].reshape(40, 100).clone())
    with pytest.warns(UserWarning, match="duplicate parameters"):
        opt = nm_optim.SGD([a, a], lr=0.1, momentum=0.9, dampening=0.1, track=[(a, "rows")])
    for g in grads[:2]:
        a.grad = g[:4000].reshape(40, 100).clone()
        p0 = a.detach().double()
        v0 = opt.state[a]["momentum_buffer"].double() if a in opt.state else torch.zeros(40, 100).double()
        opt.step()
        (stats,) = opt.last_stats()
        want = torch.stack([p0.sum(1), (v0 * v0).sum(1), (p0 * a.grad.double()).sum(1)], 1)
        assert_rel_close(stats[:, [0, 5, 6]], want, 1e-6, "stats of a", floor=1.0)
    assert calls and all(n == distinct for n, distinct in calls), "a kernel call got the same memory twice"


class _OpaqueParam(torch.nn.Parameter):
    """A Parameter subclass: its memory span is not read (as for a DTensor, aliasing.memory_span)."""


def test_a_param_listed_twice_goes_to_two_calls_even_when_its_memory_is_not_inspected(monkeypatch):
    calls = []
    real_step = nm_optim.sgd.sgd_step_
    monkeypatch.setattr(nm_optim.sgd, "sgd_step_", lambda params, *a: calls.append(list(map(id, params)))
                        or real_step(params, *a))
    p, q = _OpaqueParam(torch.randn(5)), _OpaqueParam(torch.randn(3))
    assert nm_optim.aliasing.memory_span(p) is None
    with pytest.warns(UserWarning, match="duplicate parameters"):
        opt = nm_optim.SGD([p, q, p], lr=0.1, momentum=0.9, backend="cpu")
    p.grad, q.grad = torch.ones(5), torch.ones(3)
    opt.step()
    assert calls == [[id(p), id(q)], [id(p)]]


def _views_run(make_opt, base0, views, grads, steps=3):
    """Params that are views of one flat buffer (`views`: slices of it), stepped `steps` times."""
    base = base0.clone()
    params = [torch.nn.Parameter(base[sl]) for sl in views]
    opt = make_opt(params)
    for s in range(steps):
        for i, p in enumerate(params):
            p.grad = grads[i][s].clone()
        opt.step()
    return base, opt


def test_params_that_share_memory_are_stepped_in_order_like_torch(monkeypatch):
    """Views of one buffer that overlap: torch.optim.SGD's loop steps them one after the other,
    the later one reading the earlier one's result. In one kernel call the threads would step the
    shared memory at once (a race, and not torch's result): overlapping params go to successive
    calls, keep their own statistics, and disjoint views of one buffer still share a call."""
    calls = []
    real_step = nm_optim.sgd.sgd_step_

    def spy(params, *args):
        calls.append([(t.data_ptr(), t.data_ptr() + 4 * t.numel()) for t in params])
        return real_step(params, *args)

    monkeypatch.setattr(nm_optim.sgd, "sgd_step_", spy)
    gen = torch.Generator().manual_seed(0)
    n = 1 << 20  # far above the CPU kernel's serial threshold
    base0 = torch.randn(3 * n, generator=gen)
    views = [slice(0, 2 * n), slice(n, 3 * n), slice(2 * n + 10, 2 * n + 4010)]  # 0 and 1 overlap, 2 lies in 1
    grads = [[torch.randn(sl.stop - sl.start, generator=gen) for _ in range(3)] for sl in views]
    hyper = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-2}
    want, _ = _views_run(lambda ps: torch.optim.SGD(ps, foreach=False, **hyper), base0, views, grads)
    got, _ = _views_run(lambda ps: nm_optim.SGD(ps, backend="cpu", **hyper), base0, views, grads)
    assert torch.equal(got, want)
    for call in calls:
        spans = sorted(call)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), "a kernel call got overlapping memory"
    assert [len(c) for c in calls[:3]] == [1, 1, 1]  # 0, then 1, then 2 (which lies in 1)

    # tracked: each param's statistics are of its own values just before its own update
    calls.clear()
    got, opt = _views_run(lambda ps: nm_optim.SGD(ps, backend="cpu", track="layers", **hyper), base0, views, grads,
                          steps=1)
    stats = opt.last_stats()  # one "all" track per param
    base = base0.clone()
    for i, sl in enumerate(views):
        p0, g = base[sl].double(), grads[i][0].double()
        assert_rel_close(stats[i][0, [0, 1, 3, 6]], torch.stack([p0.sum(), g.sum(), (p0 * p0).sum(), (p0 * g).sum()]),
                         1e-6, f"stats of view {i}", floor=1.0)
        base[sl] -= 0.1 * (grads[i][0] + 1e-2 * base[sl])  # torch's first step: the buffer is d
    assert torch.allclose(got, base, rtol=1e-6, atol=1e-6)

    # disjoint views of one buffer (a flat parameter buffer): one call
    calls.clear()
    disjoint = [slice(0, n), slice(n, 2 * n), slice(2 * n, 3 * n)]
    _views_run(lambda ps: nm_optim.SGD(ps, backend="cpu", **hyper), base0, disjoint,
               [[torch.randn(n, generator=gen)] for _ in disjoint], steps=1)
    assert [len(c) for c in calls] == [3]


def test_torch_constructor_arguments_and_state_dicts_are_interchangeable(tmp_path):
    """foreach / fused / differentiable=False are accepted (they choose nothing here) and kept in
    the param groups as torch keeps them; the state dict has exactly torch.optim.SGD's keys, so
    each optimizer loads the other's, directly and through torch.distributed.checkpoint, and the
    backend stays the one chosen at construction."""
    model = tiny_model()
    params = list(model.parameters())
    for kwargs in ({"foreach": False}, {"foreach": True}, {"fused": True}, {"differentiable": False}):
        opt = nm_optim.SGD(params, lr=0.1, **kwargs)
        ref = torch.optim.SGD(params, lr=0.1, **kwargs)
        assert set(opt.param_groups[0]) == set(ref.param_groups[0]) | {"backend"}
        assert {k: opt.param_groups[0][k] for k in kwargs} == kwargs
    with pytest.raises(NotImplementedError, match="differentiable=True"):
        nm_optim.SGD(params, lr=0.1, differentiable=True)
    with pytest.raises(RuntimeError) as theirs:
        torch.optim.SGD(params, lr=0.1, foreach=True, fused=True)
    with pytest.raises(RuntimeError, match=str(theirs.value)):
        nm_optim.SGD(params, lr=0.1, foreach=True, fused=True)

    def train(opt, steps=2):
        for _ in range(steps):
            opt.zero_grad()
            model(torch.ones(2, 5)).square().sum().backward()
            opt.step()

    ref = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    opt = nm_optim.SGD(params, lr=0.1, momentum=0.9, backend="reference")
    train(opt)
    saved = opt.state_dict()
    assert [set(g) for g in saved["param_groups"]] == [set(g) for g in ref.state_dict()["param_groups"]]

    ref.load_state_dict(saved)  # nm -> torch: nothing extra arrives
    back = ref.state_dict()
    assert [set(g) for g in back["param_groups"]] == [set(g) for g in saved["param_groups"]]
    for i, st in saved["state"].items():
        assert torch.equal(back["state"][i]["momentum_buffer"], st["momentum_buffer"])
    train(ref)
    opt.load_state_dict(ref.state_dict())  # torch -> nm: the backend chosen here is kept
    assert opt.param_groups[0]["backend"] == "reference"
    assert opt.state_dict()["param_groups"] == ref.state_dict()["param_groups"]
    for p in params:
        assert torch.equal(opt.state[p]["momentum_buffer"], ref.state[p]["momentum_buffer"])

    # torch.distributed.checkpoint (one process, no process group): its state-dict API and its
    # default planners, which refuse a key the checkpoint lacks. Both directions.
    dcp_nm, dcp_torch = get_optimizer_state_dict(model, opt), get_optimizer_state_dict(model, ref)
    assert [set(g) for g in dcp_nm["param_groups"]] == [set(g) for g in dcp_torch["param_groups"]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no process group: running single-process"
        dcp.save({"optim": dcp_nm}, checkpoint_id=tmp_path / "nm")
        dcp.save({"optim": dcp_torch}, checkpoint_id=tmp_path / "torch")
        for target, source in ((ref, "nm"), (opt, "torch")):
            target.param_groups[0]["lr"] = 0.5
            into = {"optim": get_optimizer_state_dict(model, target)}
            dcp.load(into, checkpoint_id=tmp_path / source)
            set_optimizer_state_dict(model, target, into["optim"])
            assert target.param_groups[0]["lr"] == 0.1
    assert set(ref.param_groups[0]) == set(opt.param_groups[0]) - {"backend"}
    assert opt.param_groups[0]["backend"] == "reference"


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_a_tracked_param_that_changes_shape_fails_at_that_step_and_the_history_stays_saveable(tmp_path, momentum):
    """The track's groups were fixed at construction: the step that sees the new shape raises,
    naming the param and how to track it again, before touching anything; what was recorded so far
    is saved as it was recorded."""
    model = tiny_model()
    weight = model[0].weight
    opt = nm_optim.SGD(model.named_parameters(), lr=0.1, momentum=momentum, track=[(weight, "rows")])
    for _ in range(2):
        opt.zero_grad()
        model(torch.ones(2, 5)).square().sum().backward()
        opt.step()
    shape = tuple(weight.shape)
    weight.data = weight.data[: shape[0] // 2].clone()
    weight.grad = torch.ones_like(weight)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"'0\.weight'.*shape.*(new nm_optim\.SGD|track)") as info:
        opt.step()
    assert "recorder.save" in str(info.value)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    record = load_record(opt.recorder.save(tmp_path / "run.npz"))
    assert len(record) == 2 and record.tracks[0]["shape"] == list(shape)
    assert record.stats[0].shape == (2, shape[0], 9)


def test_file_modes_never_touch_the_process_umask_even_with_threads(tmp_path, monkeypatch):
    """os.umask is process-wide: setting it to 0 even for a moment lets files that other threads
    create meanwhile come out group/world-writable. Neither atomic_write (from several threads at
    once) nor new_file_mode ever sets it, and files get what open() gives (0o666 less the umask)."""
    old = os.umask(0o022)
    try:
        set_by = []
        real_umask = os.umask

        def spy(mask):
            set_by.append(threading.current_thread().name)
            return real_umask(mask)

        def write_often(k):
            for _ in range(20):
                _io.atomic_write(tmp_path / f"w{k}.bin", lambda f: f.write(b"x"))

        monkeypatch.setattr(os, "umask", spy)
        writers = [threading.Thread(target=write_often, args=(k,), name=f"writer{k}") for k in range(4)]
        for t in writers:
            t.start()
        for t in writers:
            t.join()
        assert set_by == [], f"os.umask was set by {sorted(set(set_by))}"
        assert {stat.S_IMODE((tmp_path / f"w{k}.bin").stat().st_mode) for k in range(4)} == {0o644}
        assert _io.new_file_mode() == 0o644 and set_by == []
        monkeypatch.undo()

        # The real thing: one thread asks for the mode as fast as it can while this one creates files.
        done = threading.Event()

        def ask_often():
            while not done.is_set():
                _io.new_file_mode()

        asker = threading.Thread(target=ask_often)
        asker.start()
        loose = 0
        try:
            for i in range(2000):
                path = tmp_path / f"other{i}"
                path.touch()
                loose += bool(path.stat().st_mode & 0o022)
                path.unlink()
        finally:
            done.set()
            asker.join()
        assert loose == 0, f"{loose} of 2000 files created by another thread were group/world-writable"

        os.umask(0o077)  # the umask still applies
        private = _io.atomic_write(tmp_path / "private.bin", lambda f: f.write(b"x"))
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
        assert _io.new_file_mode() == 0o600
    finally:
        os.umask(old)


def test_small_argument_and_message_details():
    """record_every takes any integral (numpy's too) but not bool or float; an error about a bad
    track names the shape and dtype of a tensor, never prints its values."""
    w = torch.nn.Parameter(torch.randn(40, 30))
    b = torch.nn.Parameter(torch.randn(40))
    opt = nm_optim.SGD([w, b], lr=0.1, track=[(w, "rows")], record_every=np.int64(2))
    assert opt.recorder.record_every == 2 and type(opt.recorder.record_every) is int
    for _ in range(4):
        w.grad, b.grad = torch.ones_like(w), torch.ones_like(b)
        opt.step()
    assert list(opt.recorder.snapshot().steps) == [0, 2]
    for bad in (True, 2.0, "2"):
        with pytest.raises(TypeError, match="record_every"):
            nm_optim.SGD([w], lr=0.1, track=[(w, "rows")], record_every=bad)
    with pytest.raises(ValueError, match="record_every"):
        nm_optim.SGD([w], lr=0.1, track=[(w, "rows")], record_every=np.int32(0))

    for track in ([w], [(w, b)], [(w, "rows", b)]):
        with pytest.raises((TypeError, ValueError)) as info:
            nm_optim.SGD([w, b], lr=0.1, track=track)
        message = str(info.value)
        assert "tensor(" not in message and len(message) < 300, message
        assert "shape" in message, message


def test_the_theory_names_record_every_without_a_wrong_ordinal():
    """'every 2th step' read wrong; the message says one step in N and how to fix it."""
    import numpy as np

    from nm_optim import theory

    w = torch.nn.Parameter(torch.randn(3, 4))
    b = torch.nn.Parameter(torch.zeros(3))
    opt = nm_optim.SGD([w, b], lr=0.1, record_every=2,
                       symmetries=[nm_optim.Translation(w, b, name="head", weight_name="w", bias_name="b")])
    for _ in range(6):
        w.grad, b.grad = torch.randn_like(w), torch.randn_like(b)
        opt.step()
    with pytest.raises(ValueError) as e:
        theory.compare(opt.recorder.snapshot())
    assert "one step in 2" in str(e.value) and "2th" not in str(e.value) and "record_every=1" in str(e.value)
    assert np.isfinite(opt.recorder.snapshot().stats[0]).all()
