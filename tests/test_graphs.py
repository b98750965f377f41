"""CUDA graphs (gpu tests): a step with statistics captured in a graph replays correctly, and
eager steps with other tensors in between do not disturb what the graph reads (each capture
has tables of its own: nm_optim/ops/plan.py, PointerTable)."""

from __future__ import annotations

import pytest
import torch

import nm_optim

pytestmark = pytest.mark.gpu


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
