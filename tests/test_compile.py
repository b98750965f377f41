"""torch.compile: Dynamo compiles nm_optim.SGD's step with the op ``nm_optim::sgd_step_`` as one node
of its graph (the op's implementation is never traced), no frame falls back to eager, the results
are eager's to the bit (params, momentum buffers, statistics, the record), and a scheduler's lr
recompiles nothing after the first steps.

Every check reads what Dynamo did, not a proxy for it: the graphs a recording backend received,
and torch._dynamo's counters of frames (attempted vs compiled: a frame that Dynamo cannot compile
runs eagerly, "falls back", and is counted in ``total`` but not in ``ok``), of what it could not
trace (``unimplemented``) and of graph breaks, or ``torch._dynamo.explain``."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import nm_optim
import nm_optim.sgd

OP = torch.ops.nm_optim.sgd_step_
# The one graph break a compiled step may have: the recorder's host bookkeeping (counters, lists,
# chunk flushes), which runs eagerly (torch.compiler.disable) so the graph does not guard on it.
RECORDER = "Recorder.after_step"
# A compiled training step breaks at backward() and, after a break, at zero_grad (which torch marks
# as not traceable), as it does with torch.optim.SGD.
BACKWARD = "Unsupported Tensor.backward() call"
ZERO_GRAD = "Optimizer.zero_grad"


class Recording:
    """A torch.compile backend that keeps every graph Dynamo hands it and runs it as traced."""

    def __init__(self) -> None:
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs) -> object:
        self.graphs.append(gm)
        return gm.forward

    def op_nodes(self, gm: torch.fx.GraphModule | None = None) -> list[torch.fx.Node]:
        graphs = self.graphs if gm is None else [gm]
        return [n for g in graphs for n in g.graph.nodes if n.op == "call_function" and n.target in (OP, OP.default)]

    def creates_buffers(self, gm: torch.fx.GraphModule) -> bool:
        return any(n.target is torch.empty_like for n in gm.graph.nodes)


def fresh_dynamo() -> None:
    torch._dynamo.reset()
    counters.clear()


def assert_nothing_fell_back(allowed_breaks: tuple[str, ...] = ()) -> None:
    frames = counters["frames"]
    assert frames["total"] > 0, "Dynamo compiled no frame"
    assert frames["ok"] == frames["total"], (
        f"{frames['total'] - frames['ok']} of {frames['total']} frames fell back to eager: "
        f"{[k.splitlines()[0] for k in counters['unimplemented']]}")
    assert not counters["unimplemented"], [k.splitlines()[0] for k in counters["unimplemented"]]
    unexpected = [k.splitlines()[0] for k in counters["graph_break"] if not any(a in k for a in allowed_breaks)]
    assert not unexpected, f"graph breaks besides {allowed_breaks}: {unexpected}"


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal to the bit, NaN payloads included."""
    a, b = a.detach().contiguous(), b.detach().contiguous()
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def assert_same_run(compiled: nm_optim.SGD, eager: nm_optim.SGD) -> None:
    """Params, momentum buffers, the last statistics and the whole record, to the bit."""
    pc = [p for g in compiled.param_groups for p in g["params"]]
    pe = [p for g in eager.param_groups for p in g["params"]]
    assert all(same_bits(a, b) for a, b in zip(pc, pe)), "params differ from eager"
    bufs = [(compiled.state[a].get("momentum_buffer"), eager.state[b].get("momentum_buffer")) for a, b in zip(pc, pe)]
    assert all((x is None) == (y is None) for x, y in bufs), "momentum buffers created differently"
    assert all(same_bits(x, y) for x, y in bufs if x is not None), "momentum buffers differ from eager"
    if not eager.tracks:
        return
    assert all(same_bits(a, b) for a, b in zip(compiled.last_stats(), eager.last_stats())), "statistics differ"
    rc, re_ = compiled.recorder.snapshot(), eager.recorder.snapshot()
    assert len(rc) == len(re_) > 0
    assert np.array_equal(rc.steps, re_.steps) and np.array_equal(rc.first, re_.first)
    assert np.array_equal(rc.skipped, re_.skipped)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(rc.stats, re_.stats)), "recorded statistics differ"
    assert rc.hyper.keys() == re_.hyper.keys()
    assert all(rc.hyper[k].tobytes() == re_.hyper[k].tobytes() for k in rc.hyper), "recorded hyper-parameters differ"


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    return torch.randn(5, 6, generator=gen), torch.randint(0, 3, (5,), generator=gen)


def make_opt(config: str, m: torch.nn.Module, extra: torch.nn.Parameter) -> nm_optim.SGD:
    hyper = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3}
    if config == "plain":
        return nm_optim.SGD(m.parameters(), **hyper)
    if config == "layers":
        return nm_optim.SGD(m.parameters(), track="layers", **hyper)
    if config == "symmetries":
        syms = nm_optim.find_symmetries(m, batch(0)[0], loss=F.cross_entropy)
        assert {s.kind for s in syms} == {"translation", "rescale"}
        return nm_optim.SGD(m.parameters(), symmetries=syms, **hyper)
    # A param group whose params never get a grad: not stepped, their statistics NaN.
    assert config == "group without grads"
    return nm_optim.SGD([{"params": list(m.parameters())}, {"params": [extra], "lr": 0.05}], track="layers", **hyper)


def train(config: str, steps: int, compiled: str | None, backend: Recording | str | None = None,
          scheduler: bool = False, lr_tensor: bool = False) -> tuple[torch.nn.Module, nm_optim.SGD]:
    """`steps` training steps; compiled None (eager), "step" (torch.compile(opt.step)) or
    "train" (the whole step compiled: forward, backward, opt.step(), zero_grad)."""
    m = model()
    extra = torch.nn.Parameter(torch.ones(4))
    opt = make_opt(config, m, extra)
    if lr_tensor:
        for g in opt.param_groups:
            g["lr"] = torch.tensor(g["lr"], dtype=torch.float64)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.9 ** k) if scheduler else None
    step = torch.compile(opt.step, backend=backend) if compiled == "step" else opt.step

    def train_step(x, y):
        F.cross_entropy(m(x), y).backward()
        step()
        opt.zero_grad()

    if compiled == "train":
        train_step = torch.compile(train_step, backend=backend)
    for k in range(steps):
        train_step(*batch(k))
        if sched is not None:
            sched.step()
    return m, opt


@pytest.mark.parametrize("config", ["plain", "layers", "symmetries", "group without grads"])
def test_a_compiled_step_is_graphs_holding_the_op_and_eagers_bits(config):
    """torch.compile(opt.step): the first step's graph creates the momentum buffers and calls the
    op, the later steps' graph calls it on the existing buffers; no frame falls back to eager;
    the only graph break is the recorder's (with tracks); every bit is eager's."""
    fresh_dynamo()
    rec = Recording()
    _, compiled = train(config, 4, "step", rec)
    assert_nothing_fell_back((RECORDER,) if compiled.tracks else ())
    if not compiled.tracks:
        assert not counters["graph_break"], "an untracked step has no graph break"
    holding = [gm for gm in rec.graphs if rec.op_nodes(gm)]
    assert len(holding) == 2, f"{len(holding)} graphs call the op; expected the first step's and the later steps'"
    assert rec.creates_buffers(holding[0]) and not rec.creates_buffers(holding[1])
    # One (device, dtype) bucket per group with grads: one op call per graph.
    assert [len(rec.op_nodes(gm)) for gm in holding] == [1, 1]
    n_stepped = len(list(model().parameters()))
    assert [len(n.args[0]) for n in rec.op_nodes()] == [n_stepped, n_stepped]
    _, eager = train(config, 4, None)
    assert_same_run(compiled, eager)
    if config == "group without grads":
        assert torch.isnan(compiled.last_stats()[-1]).all()


def test_an_untracked_step_compiles_with_fullgraph():
    """Without tracks there is no recorder: the whole step, buffer creation included, is one graph
    (fullgraph=True raises at any graph break)."""
    fresh_dynamo()
    rec = Recording()
    m = model()
    opt = nm_optim.SGD(m.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    step = torch.compile(opt.step, fullgraph=True, backend=rec)
    for k in range(3):
        x, y = batch(k)
        F.cross_entropy(m(x), y).backward()
        step()
    # (fullgraph=True raises where a frame would fall back; Dynamo's frame counters stay empty)
    assert not counters["unimplemented"] and not counters["graph_break"]
    assert len(rec.graphs) == 2 and len(rec.op_nodes()) == 2  # the first step's graph, the later steps'
    m_e = model()
    eager = nm_optim.SGD(m_e.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    for k in range(3):
        x, y = batch(k)
        F.cross_entropy(m_e(x), y).backward()
        eager.step()
    assert_same_run(opt, eager)


def test_a_compiled_training_step_breaks_only_where_torch_optim_sgd_does_and_at_the_recorder():
    """Forward, backward, opt.step() and zero_grad compiled as one function: the op is in a
    graph, no frame falls back, and the graph breaks are backward()'s and zero_grad's (as with
    torch.optim.SGD) and the recorder's."""
    fresh_dynamo()
    rec = Recording()
    _, compiled = train("layers", 4, "train", rec)
    assert_nothing_fell_back((BACKWARD, ZERO_GRAD, RECORDER))
    assert len(rec.op_nodes()) == 2  # the first step's graph and the later steps'
    _, eager = train("layers", 4, None)
    assert_same_run(compiled, eager)


def test_aot_autograd_keeps_the_op_and_eagers_bits():
    """Through AOTAutograd (functionalization, as Inductor sees the graph) the op's in-place
    writes to params, buffers and statistics survive, to the bit."""
    fresh_dynamo()
    _, compiled = train("layers", 4, "step", "aot_eager")
    assert_nothing_fell_back((RECORDER,))
    _, eager = train("layers", 4, None)
    assert_same_run(compiled, eager)


def test_explain_sees_the_op_in_a_graph_and_only_the_recorders_break():
    m = model()
    opt = nm_optim.SGD(m.parameters(), lr=0.1, momentum=0.9, track="layers")
    for k in range(2):  # the step that creates the buffers, then a later one
        x, y = batch(k)
        F.cross_entropy(m(x), y).backward()
        fresh_dynamo()
        out = torch._dynamo.explain(opt.step)()
        ops = [n for g in out.graphs for n in g.graph.nodes if n.op == "call_function" and n.target in (OP, OP.default)]
        assert len(ops) == 1 and out.graph_count == 1
        assert all(RECORDER in str(r.reason) for r in out.break_reasons), [str(r.reason) for r in out.break_reasons]
        assert_nothing_fell_back((RECORDER,))


@pytest.mark.parametrize("lr_tensor", [False, True], ids=["float lr", "tensor lr"])
def test_a_scheduler_recompiles_nothing_after_the_first_steps(lr_tensor):
    """LambdaLR changes lr every step, 12 steps (Dynamo's recompile limit is 8): two graphs, the
    first step's and the later steps' (the float lr is a graph input once Dynamo has seen it
    change: the op gets it as a float64 tensor on the CPU, which it reads as the same double),
    no frame falls back, and every bit (the recorded lr included) is eager's."""
    fresh_dynamo()
    rec = Recording()
    _, compiled = train("layers", 12, "step", rec, scheduler=True, lr_tensor=lr_tensor)
    assert_nothing_fell_back((RECORDER, "lr_scheduler.py"))
    assert len([gm for gm in rec.graphs if rec.op_nodes(gm)]) == 2
    _, eager = train("layers", 12, None, scheduler=True, lr_tensor=lr_tensor)
    assert_same_run(compiled, eager)
    assert len(set(compiled.recorder.snapshot().hyper["lr"][:, 0])) == 12


def _op_calls_of(rec: Recording, gm: torch.fx.GraphModule) -> list[list[tuple[int, torch.dtype]]]:
    """Each op call of a graph: (numel, dtype) of each param it steps."""
    return [[(a.meta["example_value"].numel(), a.meta["example_value"].dtype) for a in n.args[0]]
            for n in rec.op_nodes(gm)]


def test_the_plan_is_eagers_under_compile_and_follows_the_params():
    """The plan (which params go to which op call) is computed on the host when Dynamo traces the
    step and is a constant of the graph: overlapping views of one buffer go to successive calls as
    in eager mode, disjoint ones share a call; a param that gets a grad, a param whose dtype
    changes and a param replaced in its group each recompile and plan again. Every step is
    torch.optim.SGD's to the bit."""
    torch.manual_seed(0)
    base = torch.randn(40)

    def params():
        b = base.clone()
        return [torch.nn.Parameter(b[0:12]), torch.nn.Parameter(b[6:20]), torch.nn.Parameter(b[30:40]),
                torch.nn.Parameter(torch.randn(3, 5, generator=torch.Generator().manual_seed(1))),
                torch.nn.Parameter(torch.randn(7, generator=torch.Generator().manual_seed(2)))]

    def run(opt, step, on_step):
        group = opt.param_groups[0]["params"]
        for k in range(5):
            on_step(k, group, opt.state)
            gen = torch.Generator().manual_seed(10 + k)
            for i, p in enumerate(group):
                grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
                p.grad = None if (i == 4 and k < 2) else grad  # param 4 gets a grad from step 2 on
            step()
        return group

    def on_step(k, group, state):
        if k == 3:  # param 3 becomes float64, with its buffer, as a .double() of the model would
            p = group[3]
            p.data = p.data.double()
            state[p]["momentum_buffer"] = state[p]["momentum_buffer"].double()
        if k == 4:  # a new tensor in place of param 2 (same shape and dtype)
            group[2] = torch.nn.Parameter(torch.randn(10, generator=torch.Generator().manual_seed(3)))

    fresh_dynamo()
    rec = Recording()
    hyper = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-2}
    opt = nm_optim.SGD(params(), **hyper)
    got = run(opt, torch.compile(opt.step, backend=rec), on_step)
    assert_nothing_fell_back()
    ref = torch.optim.SGD(params(), foreach=False, **hyper)
    want = run(ref, ref.step, on_step)
    assert all(same_bits(a, b) for a, b in zip(got, want)), "not torch.optim.SGD's bits"
    assert all(same_bits(opt.state[a]["momentum_buffer"], ref.state[b]["momentum_buffer"])
               for a, b in zip(got, want) if b in ref.state)

    f32, f64 = torch.float32, torch.float64
    calls = [_op_calls_of(rec, gm) for gm in rec.graphs if rec.op_nodes(gm)]
    # Step 0 (buffers created) and 1: views 0 and 1 overlap, so view 1 waits for a second call.
    first = [[(12, f32), (10, f32), (15, f32)], [(14, f32)]]
    # Step 2 (param 4 got a grad and a buffer), 3 (param 3 is float64): a new plan each.
    with_4 = [[(12, f32), (10, f32), (15, f32), (7, f32)], [(14, f32)]]
    with_64 = [[(12, f32), (10, f32), (7, f32)], [(15, f64)], [(14, f32)]]
    assert calls[:4] == [first, first, with_4, with_64], calls
    # Step 4: param 2 replaced by a tensor of its own memory: a graph for the new param.
    assert len(calls) == 5 and calls[4] == with_64, calls


def test_a_param_replaced_in_its_group_is_the_one_a_compiled_step_steps():
    """A tracked optimizer reads its tracked params in two places (the param groups, and the
    tracks' shape check); the compiled step must guard the groups' params by identity, so that a
    tensor put in a group in place of another recompiles instead of stepping the old one."""
    def run(compiled):
        fresh_dynamo()
        torch.manual_seed(0)
        a, b = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(3))
        opt = nm_optim.SGD([a, b], lr=0.1, momentum=0.9, track="layers")
        step = torch.compile(opt.step, backend=Recording()) if compiled else opt.step
        for k in range(4):
            if k == 2:
                opt.param_groups[0]["params"][0] = torch.nn.Parameter(torch.randn(4))
            for p in opt.param_groups[0]["params"]:
                p.grad = torch.full_like(p, 0.5 + k)
            step()
        return a, opt

    a_c, compiled = run(True)
    assert_nothing_fell_back((RECORDER,))
    a_e, eager = run(False)
    assert same_bits(a_c, a_e), "the replaced param was stepped after it left the group"
    assert_same_run(compiled, eager)


def test_errors_under_compile_are_eagers():
    """Planning and backend choice run on the host while Dynamo traces; their errors reach the
    user with eager's type and message, not as an internal Dynamo error."""
    def error(make, compiled):
        fresh_dynamo()
        opt = make()
        with pytest.raises(Exception) as info:
            (torch.compile(opt.step, backend=Recording()) if compiled else opt.step)()
        return type(info.value), str(info.value).splitlines()[0]

    def complex_param():
        p = torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))
        p.grad = torch.ones_like(p)
        return nm_optim.SGD([p], lr=0.1)

    def cuda_backend_on_cpu():
        p = torch.nn.Parameter(torch.zeros(3))
        p.grad = torch.ones_like(p)
        return nm_optim.SGD([p], lr=0.1, backend="cuda")

    for make, kind in ((complex_param, TypeError), (cuda_backend_on_cpu, ValueError)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            eager = error(make, False)
            compiled = error(make, True)
        assert eager[0] is kind and compiled == eager


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

    fresh_dynamo()
    rec = Recording()
    torch.compile(f, fullgraph=True, backend=rec)(ps, gs, bs, stats)
    assert len(rec.op_nodes()) == 1
    assert all(torch.equal(a, b) for a, b in zip(ps, want))
    assert torch.isfinite(stats[:4]).all()


def test_a_compiled_step_keeps_torchs_bits_across_a_dtype_change_and_fails_like_eager_on_a_bad_buffer():
    """After ``model.to(torch.float64)`` the params are float64 and torch keeps the float32
    momentum buffers: Dynamo recompiles (dtype guards) and the op takes the mixed pair to the
    reference, torch's ops in torch's order. A buffer torch rejects raises eager's error."""
    def run(make_opt, compiled):
        fresh_dynamo()
        gen = torch.Generator().manual_seed(5)
        m = torch.nn.Linear(4, 3)
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))
        opt = make_opt(m.parameters())
        step = torch.compile(opt.step, backend=Recording()) if compiled else opt.step
        for s in range(4):
            if s == 2:
                m.to(torch.float64)
            for p in m.parameters():
                p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
            step()
        return [t for p in m.parameters() for t in (p.detach(), opt.state[p]["momentum_buffer"])]

    hyper = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-2}
    got = run(lambda ps: nm_optim.SGD(ps, **hyper), compiled=True)
    want = run(lambda ps: torch.optim.SGD(ps, foreach=False, **hyper), compiled=False)
    assert [t.dtype for t in got] == [torch.float64, torch.float32] * 2
    assert all(same_bits(a, b) for a, b in zip(got, want))

    def bad_buffer_error(compiled):
        fresh_dynamo()
        p = torch.nn.Parameter(torch.zeros(4, 3))
        p.grad = torch.ones_like(p)
        opt = nm_optim.SGD([p], lr=0.1, momentum=0.9)
        opt.state[p]["momentum_buffer"] = torch.zeros(2, 6)
        with pytest.raises(Exception) as info:
            (torch.compile(opt.step, backend=Recording()) if compiled else opt.step)()
        assert torch.equal(p.detach(), torch.zeros(4, 3))
        return type(info.value), str(info.value).splitlines()[0]

    eager = bad_buffer_error(False)
    assert eager[0] is RuntimeError and "The size of tensor a (6) must match" in eager[1]
    assert bad_buffer_error(True) == eager


def test_late_weight_tying_under_a_compiled_step_keeps_torchs_bits():
    """Dynamo does not guard where a Parameter's memory is, so after ``b.data = a.data`` the
    compiled step keeps its plan (a and b in one kernel call); the op itself finds the shared
    memory and steps them one after the other, as torch.optim.SGD's loop does."""
    n = 1 << 17  # two such params: above the CPU kernel's serial threshold (its threads would race)

    def run(make_opt, compiled):
        fresh_dynamo()
        gen = torch.Generator().manual_seed(6)
        a = torch.nn.Parameter(torch.randn(n, generator=gen))
        b = torch.nn.Parameter(torch.randn(n, generator=gen))
        opt = make_opt([a, b])
        step = torch.compile(opt.step, backend=Recording()) if compiled else opt.step
        for s in range(4):
            if s == 2:
                b.data = a.data
            a.grad, b.grad = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
            step()
        return [a.detach(), opt.state[a]["momentum_buffer"], opt.state[b]["momentum_buffer"]]

    hyper = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-2}
    got = run(lambda ps: nm_optim.SGD(ps, backend="cpu", **hyper), compiled=True)
    want = run(lambda ps: torch.optim.SGD(ps, foreach=False, **hyper), compiled=False)
    assert all(same_bits(x, y) for x, y in zip(got, want))
