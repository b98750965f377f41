"""torch.compile: a compiled `opt.step` has no more graph breaks than torch.optim.SGD's, the op is
one node (Dynamo never traces its implementation), results equal eager bitwise (statistics and
record included), and a scheduler with a tensor lr causes no recompiles after the first steps."""

from __future__ import annotations

import numpy as np
import torch
from torch._dynamo.utils import counters

import nm_optim


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))


def train(opt_fn, steps, compiled, scheduler_fn=None):
    torch._dynamo.reset()
    counters.clear()
    m = model()
    opt = opt_fn(m.parameters())
    sched = scheduler_fn(opt) if scheduler_fn else None
    step = torch.compile(opt.step) if compiled else opt.step
    for i in range(steps):
        gen = torch.Generator().manual_seed(i)
        m(torch.randn(8, 16, generator=gen)).square().mean().backward()
        step()
        opt.zero_grad()
        if sched is not None:
            sched.step()
    breaks = len(counters["graph_break"])  # unique graph breaks
    graphs = counters["stats"].get("unique_graphs", 0)
    return m, opt, breaks, graphs


def nm_sgd(params, **kw):
    return nm_optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-3, track="layers", **kw)


def torch_sgd(params, **kw):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-3, **kw)


def test_no_more_graph_breaks_than_torch_and_the_same_results_as_eager():
    _, _, torch_breaks, _ = train(torch_sgd, 3, compiled=True)
    m_c, opt_c, breaks, _ = train(nm_sgd, 6, compiled=True)
    m_e, opt_e, _, _ = train(nm_sgd, 6, compiled=False)
    assert breaks <= torch_breaks, f"{breaks} unique graph breaks, torch.optim.SGD has {torch_breaks}"
    for a, b in zip(m_c.parameters(), m_e.parameters()):
        assert torch.equal(a, b)
    rc, re_ = opt_c.recorder.snapshot(), opt_e.recorder.snapshot()
    assert np.array_equal(rc.steps, re_.steps)
    assert all(np.array_equal(a, b) for a, b in zip(rc.stats, re_.stats))


def test_a_tensor_lr_scheduler_does_not_recompile():
    sched = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.9 ** k)  # noqa: E731
    lr = lambda: torch.tensor(0.1)  # noqa: E731
    _, _, _, graphs = train(lambda p: nm_optim.SGD(p, lr=lr(), momentum=0.9, track="layers"), 10,
                            compiled=True, scheduler_fn=sched)
    _, _, _, torch_graphs = train(lambda p: torch.optim.SGD(p, lr=lr(), momentum=0.9), 10,
                                  compiled=True, scheduler_fn=sched)
    assert graphs <= max(torch_graphs, 2), f"{graphs} graphs compiled (torch.optim.SGD: {torch_graphs})"


def test_the_op_is_one_node_with_fullgraph():
    from nm_optim.ops import sgd_step_

    backend = "cpu" if "cpu" in nm_optim.available_backends() else "reference"
    ps = [torch.randn(10), torch.randn(3, 4)]
    gs = [torch.randn_like(p) for p in ps]
    bs = [torch.zeros_like(p) for p in ps]
    stats = torch.zeros(4, 9, dtype=torch.float64)
    want = [p.clone() for p in ps]
    sgd_step_(want, gs, [b.clone() for b in bs], [False, False], 0.1, None, 0.0, 0.9, 0.0, False, False,
              None, None, backend)

    def f(ps, gs, bs, stats):
        sgd_step_(ps, gs, bs, [False, False], 0.1, None, 0.0, 0.9, 0.0, False, False, None, None, backend,
                  stats, [-1, -1, 0, 1, -1, -1])

    torch._dynamo.reset()
    torch.compile(f, fullgraph=True)(ps, gs, bs, stats)
    assert all(torch.equal(a, b) for a, b in zip(ps, want))
    assert torch.isfinite(stats[:4]).all()
