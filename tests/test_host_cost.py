"""The host's cost of a step, and what its caches must still see.

With many small tensors a step is Python work per tensor. After a step that checked everything,
later steps compare the metadata of each call's params, grads and momentum buffers in one C++
pass instead (nm_optim/ops/plan.py, TensorGuard; nm_optim/sgd.py, SGD._steady_buckets), and call
the op's implementation without the dispatcher where the dispatcher would do nothing else
(nm_optim/ops/op.py, sgd_step). These tests say that steady steps do skip the full checks, and
that every kind of change between steps is still seen: the step stays torch.optim.SGD's to the
bit, or fails as torch's does. bench/bench_step.py --shapes tiny measures the cost itself.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import nm_optim
import nm_optim.ops.op
import nm_optim.sgd
from nm_optim.ops import plan
from nm_optim.tracks import TrackTable

pytestmark = pytest.mark.skipif("cpu" not in nm_optim.available_backends("cpu"), reason="nm_optim._C not built")

HYPER = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-2}
SHAPES = [(4, 3), (5,), (2, 3, 2), (7,)]


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous()
    return t.view({torch.float64: torch.int64, torch.float32: torch.int32}[t.dtype])


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]


def _set_grads(params, step: int) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    for p in params:
        g = torch.randn(p.numel(), generator=gen, dtype=torch.float64)
        p.grad = g.to(p.dtype).view(p.shape)


class Counter:
    """How often the full path's checks ran, and how often the op went through the dispatcher."""

    def __init__(self, monkeypatch):
        self.counts = {"uniform_dense": 0, "buffer_ok": 0, "check_unchanged": 0, "dispatched": 0}
        for owner, name, key in ((nm_optim.ops.op, "uniform_dense", "uniform_dense"),
                                 (nm_optim.sgd, "buffer_ok", "buffer_ok"),
                                 (nm_optim.ops.op, "sgd_step_", "dispatched")):
            monkeypatch.setattr(owner, name, self._counting(getattr(owner, name), key))
        monkeypatch.setattr(TrackTable, "check_unchanged",
                            self._counting(TrackTable.check_unchanged, "check_unchanged"))

    def _counting(self, fn, key):
        def counted(*args, **kwargs):
            self.counts[key] += 1
            return fn(*args, **kwargs)

        return counted

    def take(self) -> dict[str, int]:
        out = dict(self.counts)
        self.counts = dict.fromkeys(self.counts, 0)
        return out


@pytest.mark.parametrize("track", [None, "layers"])
def test_steady_steps_skip_the_full_checks_and_the_dispatcher(monkeypatch, track):
    counter = Counter(monkeypatch)
    params = _params()
    opt = nm_optim.SGD(params, backend="cpu", track=track, **HYPER)
    _set_grads(params, 0)
    opt.step()
    first = counter.take()
    assert first["uniform_dense"] == 1 and first["buffer_ok"] == len(params)
    assert first["check_unchanged"] == (1 if track else 0)
    for step in range(1, 4):
        _set_grads(params, step)  # new grad tensors every step, as after zero_grad(set_to_none=True)
        opt.step()
        assert counter.take() == dict.fromkeys(first, 0), f"step {step} ran the full checks or dispatched"


def _stepped_twins(change, steps_before=3, steps_after=2, **hyper):
    """torch.optim.SGD (for-loop) and nm_optim.SGD on copies of the same params and grads, the
    same `change(opt, params)` applied to both after `steps_before` steady steps; returns both
    optimizers and param lists, or the exceptions raised after the change."""
    hyper = {**HYPER, **hyper}
    out = []
    for make in (lambda ps: torch.optim.SGD(ps, foreach=False, **hyper),
                 lambda ps: nm_optim.SGD(ps, backend="cpu", **hyper)):
        params = _params()
        opt = make(params)
        for step in range(steps_before):
            _set_grads(params, step)
            opt.step()
        try:
            change(opt, params)
            for step in range(steps_before, steps_before + steps_after):
                _set_grads([p for g in opt.param_groups for p in g["params"]], step)
                opt.step()
        except Exception as e:  # noqa: BLE001 (compared with torch's below)
            out.append(e)
            continue
        out.append((opt, [p for g in opt.param_groups for p in g["params"]]))
    return out


def _assert_like_torch(torch_run, nm_run) -> None:
    if isinstance(torch_run, Exception):
        assert isinstance(nm_run, Exception), f"torch raised {torch_run!r}, nm_optim stepped"
        assert type(nm_run) is type(torch_run) and str(torch_run) in str(nm_run), (torch_run, nm_run)
        return
    assert not isinstance(nm_run, Exception), f"nm_optim raised {nm_run!r}, torch stepped"
    (t_opt, t_params), (n_opt, n_params) = torch_run, nm_run
    for i, (a, b) in enumerate(zip(t_params, n_params)):
        assert _same(b, a), f"param {i} differs from torch.optim.SGD's"
        ta, na = t_opt.state[a].get("momentum_buffer"), n_opt.state[b].get("momentum_buffer")
        assert (ta is None) == (na is None), f"param {i}: a buffer on one side only"
        assert ta is None or _same(na, ta), f"param {i}: momentum buffer differs from torch.optim.SGD's"


def _reshape_in_place(opt, ps):
    ps[0].data = ps[0].data.view(3, 4)  # same element count, same address: only the shape changes


def _replace_buffer_object(opt, ps):
    opt.state[ps[0]]["momentum_buffer"] = opt.state[ps[0]]["momentum_buffer"] * 0.5


def _repoint_buffer(opt, ps):
    buf = opt.state[ps[1]]["momentum_buffer"]
    buf.set_(buf.detach().clone().mul_(-2.0))  # the same object, the same metadata, other memory


def _replace_state_dict(opt, ps):
    opt.state[ps[2]] = {"momentum_buffer": opt.state[ps[2]]["momentum_buffer"] + 1.0}


def _drop_state(opt, ps):
    del opt.state[ps[3]]


def _load_state_dict(opt, ps):
    sd = opt.state_dict()
    for st in sd["state"].values():
        st["momentum_buffer"] = st["momentum_buffer"] * 3.0
    opt.load_state_dict(sd)


def _to_float64(opt, ps):
    for p in ps:
        p.data = p.data.double()


def _grad_none(opt, ps):
    ps[1].requires_grad_(False)


def _add_group(opt, ps):
    opt.add_param_group({"params": [torch.nn.Parameter(torch.full((3, 2), 0.5))]})


def _pop_param(opt, ps):
    opt.param_groups[0]["params"].pop()


def _swap_param(opt, ps):
    opt.param_groups[0]["params"][1] = torch.nn.Parameter(torch.full((5,), 2.0))


def _momentum(value):
    def change(opt, ps):
        for g in opt.param_groups:
            g["momentum"] = value

    return change


def _hyper(opt, ps):
    for g in opt.param_groups:
        g["lr"], g["weight_decay"], g["dampening"] = 0.05, 0.0, 0.25


CHANGES = {
    "reshape-in-place": _reshape_in_place,
    "buffer-object-replaced": _replace_buffer_object,
    "buffer-memory-repointed": _repoint_buffer,
    "state-dict-of-a-param-replaced": _replace_state_dict,
    "state-of-a-param-dropped": _drop_state,
    "load-state-dict": _load_state_dict,
    "params-to-float64": _to_float64,
    "requires-grad-off": _grad_none,
    "param-group-added": _add_group,
    "param-removed-from-group": _pop_param,
    "param-replaced-in-group": _swap_param,
    "momentum-off": _momentum(0.0),
    "momentum-changed": _momentum(0.5),
    "hyper-parameters": _hyper,
}


@pytest.mark.parametrize("change", list(CHANGES), ids=list(CHANGES))
def test_a_change_between_steady_steps_is_seen(change):
    torch_run, nm_run = _stepped_twins(CHANGES[change])
    _assert_like_torch(torch_run, nm_run)


def test_an_in_place_reshape_fails_as_torch_on_the_buffer_of_the_old_shape():
    """The param keeps its identity, address and element count; only its shape changes. torch's
    ``buf.mul_(momentum).add_(grad)`` then fails on the [4, 3] buffer of the [3, 4] param; so must
    this step, before anything is written (the flat kernel would read 12 elements either way)."""
    torch_run, nm_run = _stepped_twins(_reshape_in_place)
    assert isinstance(torch_run, RuntimeError)
    _assert_like_torch(torch_run, nm_run)


def test_a_grad_that_becomes_none_or_non_contiguous_is_seen():
    def run(make):
        params = _params()
        opt = make(params)
        for step in range(6):
            _set_grads(params, step)
            if step >= 3:
                params[1].grad = None  # not stepped, as in torch
                params[0].grad = params[0].grad.t().contiguous().t()  # same values, column-major memory
            opt.step()
        return opt, params

    _assert_like_torch(run(lambda ps: torch.optim.SGD(ps, foreach=False, **HYPER)),
                       run(lambda ps: nm_optim.SGD(ps, backend="cpu", **HYPER)))


def test_a_sparse_grad_after_steady_steps_raises_before_anything_is_written():
    params = _params()
    opt = nm_optim.SGD(params, backend="cpu", **HYPER)
    for step in range(3):
        _set_grads(params, step)
        opt.step()
    _set_grads(params, 3)
    params[1].grad = params[1].grad.to_sparse()
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, params))


def test_guards_of_one_optimizer_do_not_vouch_for_another_ones_tracks():
    """Two optimizers over the same params: one without tracks, one tracking every param. After
    a param is reshaped in place, the first steps it (momentum 0: no buffer to reject it) and the
    second must still raise its track error: a guard made by one optimizer's checks says nothing
    about another's tracks."""
    params = _params()
    plain = nm_optim.SGD(params, backend="cpu", lr=0.1)
    tracked = nm_optim.SGD(params, backend="cpu", lr=0.1, track="layers")
    for step in range(3):
        _set_grads(params, step)
        plain.step()
        tracked.step()
    _reshape_in_place(None, params)
    _set_grads(params, 3)
    plain.step()
    with pytest.raises(RuntimeError, match="is tracked"):
        tracked.step()


class _OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def test_a_dispatch_mode_and_the_profiler_still_see_the_op():
    """Without the dispatcher a step would be invisible to what hooks into it: a step under a
    TorchDispatchMode or the profiler goes through it, with the same bits."""
    params = _params()
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt, ref = nm_optim.SGD(params, backend="cpu", **HYPER), nm_optim.SGD(twin, backend="cpu", **HYPER)
    for step in range(3):
        _set_grads(params, step)
        _set_grads(twin, step)
        opt.step()
        ref.step()
    _set_grads(params, 3)
    _set_grads(twin, 3)
    with _OpNames() as mode:
        opt.step()
    assert "nm_optim.sgd_step_.default" in mode.names
    ref.step()
    _set_grads(params, 4)
    _set_grads(twin, 4)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.step()
    assert any(e.name == "nm_optim::sgd_step_" for e in prof.events())
    ref.step()
    assert all(_same(a, b) for a, b in zip(params, twin))


def test_steady_steps_bump_the_versions_of_params_and_buffers():
    """As an in-place op through the dispatcher does: a backward through a param saved before the
    step must fail."""
    params = _params()
    opt = nm_optim.SGD(params, backend="cpu", **HYPER)
    for step in range(3):
        _set_grads(params, step)
        opt.step()
    bufs = [opt.state[p]["momentum_buffer"] for p in params]
    before = [t._version for t in params + bufs]
    _set_grads(params, 3)
    opt.step()
    assert all(t._version > v for t, v in zip(params + bufs, before))
    w = params[0]
    with torch.enable_grad():
        y = (w * w).sum()  # saves w
        _set_grads(params, 4)
        opt.step()
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.backward()


@pytest.mark.parametrize("missing", ["tensor-guards", "dict-version"])
def test_without_torchs_checks_every_step_checks_in_full_and_sees_every_change(monkeypatch, missing):
    """A torch without TensorGuards (or a Python whose dicts have no version tag) gets the full
    checks (or the state lookups) every step, with the same results."""
    if missing == "tensor-guards":
        monkeypatch.setattr(plan, "_TensorGuards", None)
    else:
        monkeypatch.setattr(nm_optim.sgd, "_dict_version", None)
    for change in ("reshape-in-place", "state-dict-of-a-param-replaced", "buffer-object-replaced", "params-to-float64"):
        torch_run, nm_run = _stepped_twins(CHANGES[change])
        _assert_like_torch(torch_run, nm_run)
