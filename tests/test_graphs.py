"""CUDA graphs: a step with statistics captured in a graph replays correctly, also when the
capture is the optimizer's very first step, and eager steps with other tensors in between do not
disturb what the graph reads (each capture has tables of its own: nm_optim/ops/plan.py,
PointerTable). The GPU tests need a CUDA device; on the CPU, a mocked capture checks that the
plan neither copies from pageable host memory nor pins memory while a capture is under way
(CUDA forbids both during stream capture)."""

from __future__ import annotations

import sys

import pytest
import torch

import nm_optim
from nm_optim.ops import plan as P

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_capture_replay_and_eager_steps_interleave(backend):
    if backend not in nm_optim.available_backends("cuda"):
        pytest.skip(f"backend {backend!r} not available for cuda here")
    torch.manual_seed(0)
    shapes = [(64, 33), (17,), (8, 6, 3, 3)]

    def make():
        ps = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in shapes]
        opt = nm_optim.SGD(ps, lr=torch.tensor(0.05, device="cuda"), momentum=0.9, weight_decay=1e-3,
                           backend=backend, track=[(p, "rows") for p in ps] + [(ps[0], "cols")])
        return ps, opt

    graph_ps, graph_opt = make()
    eager_ps, eager_opt = make()
    ref_ps = [torch.nn.Parameter(p.detach().clone()) for p in graph_ps]
    ref_opt = torch.optim.SGD(ref_ps, lr=0.05, momentum=0.9, weight_decay=1e-3)
    static_grads = [torch.zeros_like(p) for p in graph_ps]
    for p, g in zip(graph_ps, static_grads):
        p.grad = g
    # Warm up on a side stream (creates the buffers), then capture one step.
    for g in static_grads:
        g.normal_()
    for p, q in zip(ref_ps, static_grads):
        q_ = q.clone()
        p.grad = q_
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        graph_opt.step()
    torch.cuda.current_stream().wait_stream(s)
    ref_opt.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_opt.step()
    for step in range(4):
        for g in static_grads:
            g.normal_()
        for p, g in zip(ref_ps, static_grads):
            p.grad = g.clone()
        graph.replay()
        ref_opt.step()
        # An eager step of another optimizer with other tensors in between.
        for p in eager_ps:
            p.grad = torch.randn_like(p)
        eager_opt.step()
        torch.cuda.synchronize()
        for p, q in zip(graph_ps, ref_ps):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
        assert all(torch.isfinite(s).all() for s in graph_opt.last_stats())


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_a_capture_as_the_first_step_replays_like_torch_sgd(backend):
    """No eager step, no warm-up: the optimizer's first step is captured (buffers created, tables
    built under capture), then every replay equals torch.optim.SGD's step; an eager step of the
    same optimizer after the replays continues the trajectory."""
    if backend not in nm_optim.available_backends("cuda"):
        pytest.skip(f"backend {backend!r} not available for cuda here")
    torch.manual_seed(0)
    shapes = [(64, 33), (17,), (8, 6, 3, 3), (20000,)]
    ps = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in shapes]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt = nm_optim.SGD(ps, lr=torch.tensor(0.05, device="cuda"), momentum=0.9, weight_decay=1e-3,
                       backend=backend, track=[(p, "rows") for p in ps[:3]] + [(ps[0], "cols"), (ps[3], "all")])
    opt.recorder.enabled = False  # the recorder's bookkeeping is host-side: read last_stats() instead
    ref_opt = torch.optim.SGD(ref, lr=0.05, momentum=0.9, weight_decay=1e-3)
    grads = [torch.zeros_like(p) for p in ps]
    for p, g in zip(ps, grads):
        p.grad = g
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for _ in range(3):
        for p, g in zip(ref, grads):
            g.normal_()
            p.grad = g.clone()
        graph.replay()
        ref_opt.step()
        torch.cuda.synchronize()
        for p, q in zip(ps, ref):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
        assert all(torch.isfinite(s).all() for s in opt.last_stats())
    for p, q in zip(ps, ref):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    opt.step()
    ref_opt.step()
    for p, q in zip(ps, ref):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)


class NoHostCopies:
    """Fails every pageable host->device copy and pinned allocation that nm_optim/ops/plan.py
    makes: Tensor.to / copy_ / cuda / pin_memory called from that file."""

    def __init__(self, monkeypatch):
        self.calls = []
        for name in ("to", "copy_", "cuda", "pin_memory"):
            real = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._spy(name, real))

    def _spy(self, name, real):
        def spy(tensor, *args, **kwargs):
            if sys._getframe(1).f_code.co_filename == P.__file__:
                self.calls.append(f"Tensor.{name} at plan.py:{sys._getframe(1).f_lineno}")
            return real(tensor, *args, **kwargs)
        return spy


def test_under_capture_the_plan_makes_no_host_copy_and_pins_nothing(monkeypatch):
    """With a capture under way (mocked: the plan's one question, P._capturing), the plan's
    tables, its statistics plan and the address table are written by device ops alone, hold the
    values an eager build uploads, are kept alive for the graph and are not cached for eager
    steps (their device copy is written only when the graph replays)."""
    owner = torch.zeros(1)
    numels, row_lengths = (20000, 7, 0, 300), (0, 7, 0, 30)
    layout = P.stats_layout(owner, [torch.zeros(s) for s in [(20000,), (7,), (0,), (10, 30)]], numels,
                            [0, -1, 20000, 20001, -1, 20008, -1, -1, -1, 20009, 20019, 20049], torch.device("cpu"),
                            cpu=False)
    ptrs = [1 << 40, 3 << 33, 12345, 0]
    cpu = torch.device("cpu")
    eager_tiles = P.TileTable(numels, P.TILE_SIZE["cpu"], cpu, row_lengths)
    eager_plan = P.StatsPlan(layout.numels, layout.geom, layout.offsets_key, cpu, 4, 4, 16384, 2, 4)

    spy = NoHostCopies(monkeypatch)
    monkeypatch.setattr(P, "_capturing", lambda device: True)
    tiles = P.tile_table(owner, numels, cpu, row_lengths)
    plan = layout.plan(cpu, 4, 4, 16384, 2, 4)  # small tiles: long groups, two reduction levels
    pointers = plan.pointers.upload(ptrs, cpu)
    assert spy.calls == [], spy.calls
    monkeypatch.undo()

    for got, want in ((tiles.numel, eager_tiles.numel), (tiles.tiles, eager_tiles.tiles), (plan.flat, eager_plan.flat), (plan.tiles2d, eager_plan.tiles2d), (plan.tasks, eager_plan.tasks),
                      (pointers, torch.tensor(ptrs))):
        assert torch.equal(got, want)
    assert plan.n_flat and plan.n_tiles2d and plan.n_pre_tasks  # flat and 2-D tiles, two reduction levels
    assert plan.pointers.captured == [pointers]
    assert any(t is tiles for t in P._graph_tables[id(owner)]) and layout.graph_plans == [plan]
    assert P.tile_table(owner, numels, cpu, row_lengths) is not tiles, "a table built under capture was cached"
    assert layout.plan(cpu, 4, 4, 16384, 2, 4) is not plan, "a plan built under capture was cached"


@pytest.mark.skipif("triton" not in nm_optim.available_backends(DEVICE), reason="needs the Triton backend")
def test_a_step_under_capture_makes_no_host_copy_in_the_plan(monkeypatch):
    """A whole tracked step of the Triton backend (on the CPU, Triton's interpreter) with a
    capture under way: the plan makes no host copy and no pinned allocation, and the step is the
    eager step's."""
    shapes = [(20000,), (33,), (40, 64), (17, 12)]

    def run(capturing):
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(s, device=DEVICE)) for s in shapes]
        opt = nm_optim.SGD(ps, lr=0.05, momentum=0.9, backend="triton",
                           track=[(ps[1], "rows"), (ps[2], "cols"), (ps[2], "all"), (ps[3], "rows")])
        for p in ps:
            p.grad = torch.randn_like(p)
        with pytest.MonkeyPatch.context() as m:
            spy = NoHostCopies(m)
            if capturing:
                m.setattr(P, "_capturing", lambda device: True)
            opt.step()
        assert not capturing or spy.calls == [], spy.calls
        return [p.detach().clone() for p in ps] + list(opt.last_stats())

    for got, want in zip(run(True), run(False)):
        assert torch.equal(got, want)
