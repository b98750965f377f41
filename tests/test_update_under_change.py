"""The update stays torch.optim.SGD's, bit for bit, when what it steps changes between steps:
params that come to share memory after the first step (late weight tying), momentum buffers that
torch would reject (it must fail as torch does, before anything is written), and params whose
dtype changes mid-training (``model.to(torch.float64)``)."""

from __future__ import annotations

import pytest
import torch

import nm_optim
import nm_optim.sgd

HYPER = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-2}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns of a float tensor (NaN payloads and signs included)."""
    t = t.detach().contiguous()
    return t.view({torch.float64: torch.int64, torch.float32: torch.int32}[t.dtype])


def _assert_bitwise(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype}, torch's {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)}, torch's {tuple(want.shape)}"
    off = int((_bits(got) != _bits(want)).sum())
    assert off == 0, f"{what}: {off} of {got.numel()} elements differ from torch.optim.SGD's"


@pytest.fixture
def calls(monkeypatch):
    """The (start, end) byte spans and dtypes of the params of every kernel call."""
    seen: list[list[tuple[int, int, torch.dtype]]] = []
    real_step = nm_optim.sgd.sgd_step_

    def spy(params, *args):
        seen.append([(t.data_ptr(), t.data_ptr() + t.element_size() * t.numel(), t.dtype) for t in params])
        return real_step(params, *args)

    monkeypatch.setattr(nm_optim.sgd, "sgd_step_", spy)
    return seen


def _assert_no_call_overlaps(calls) -> None:
    for call in calls:
        spans = sorted(s[:2] for s in call)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), "a kernel call got params that share memory"


# -- late weight tying ----------------------------------------------------------------------------

N = 1 << 17  # two such params: above the CPU kernel's serial threshold (its threads would race)


def _tying_run(make_opt, retie, steps=4, n=N):
    """Two params a, b stepped `steps` times; before step 1 `retie(a, b)` re-points their memory."""
    gen = torch.Generator().manual_seed(0)
    a = torch.nn.Parameter(torch.randn(n, generator=gen))
    b = torch.nn.Parameter(torch.randn(n, generator=gen))
    opt = make_opt([a, b])
    for s in range(steps):
        if s == 1:
            retie(a, b)
        a.grad, b.grad = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
        opt.step()
    return a, b, opt


def _tie(a, b):
    b.data = a.data


def _overlap(a, b):
    base = torch.randn(N + N // 3)
    a.data, b.data = base[:N], base[N // 3 :]


def _tie_then_untie(a, b):
    b.data = a.data
    b.data = b.data.clone()


@pytest.mark.parametrize("retie", [_tie, _overlap], ids=["tied", "partial-overlap"])
def test_params_that_come_to_share_memory_after_the_first_step_are_stepped_like_torch(calls, retie):
    """torch.optim.SGD's loop steps b after a, reading a's result where they share memory. The
    plan of kernel calls (cached after the first step) must notice the new addresses, or both go
    into one call, whose threads step the shared memory at once."""
    torch.manual_seed(0)  # _overlap's base
    got = _tying_run(lambda ps: nm_optim.SGD(ps, backend="cpu", **HYPER), retie)
    torch.manual_seed(0)
    want = _tying_run(lambda ps: torch.optim.SGD(ps, foreach=False, **HYPER), retie)
    _assert_no_call_overlaps(calls)
    for name, x, y in zip("ab", got[:2], want[:2]):
        _assert_bitwise(x, y, name)
        _assert_bitwise(got[2].state[x]["momentum_buffer"], want[2].state[y]["momentum_buffer"], f"{name}'s buffer")


def test_untied_params_share_one_kernel_call_again(calls):
    _tying_run(lambda ps: nm_optim.SGD(ps, backend="cpu", **HYPER), _tie_then_untie, steps=3)
    assert [len(c) for c in calls] == [2, 2, 2]


# -- momentum buffers torch would reject ----------------------------------------------------------


def _two_params(names=("w", "v")):
    gen = torch.Generator().manual_seed(1)
    ps = [(n, torch.nn.Parameter(torch.randn(4, 3, generator=gen))) for n in names]
    for _, p in ps:
        p.grad = torch.randn(4, 3, generator=gen)
    return ps


def _raised(opt_cls, bad, at=0, **hyper):
    """(exception type, message, everything written) when the buffer of param `at` is `bad` and
    the other param's buffer is a good one from a previous step."""
    ps = _two_params()
    opt = opt_cls(ps, lr=0.1, momentum=0.9, **hyper)
    opt.step()  # creates good buffers
    opt.state[ps[at][1]]["momentum_buffer"] = bad
    before = [t.detach().clone() for _, p in ps for t in (p, p.grad)]
    before += [opt.state[p]["momentum_buffer"].clone() for i, (_, p) in enumerate(ps) if i != at]
    with pytest.raises(Exception) as info:
        opt.step()
    after = [t.detach() for _, p in ps for t in (p, p.grad)]
    after += [opt.state[p]["momentum_buffer"] for i, (_, p) in enumerate(ps) if i != at]
    written = [i for i, (x, y) in enumerate(zip(before, after)) if not torch.equal(x, y)]
    return info.type, str(info.value), written


BAD_BUFFERS = {
    "same-numel-other-shape": lambda: torch.randn(2, 6),
    "other-shape": lambda: torch.randn(3),
    "leading-dim": lambda: torch.randn(1, 4, 3),
    "string": lambda: "momentum",
    "integer": lambda: torch.zeros(4, 3, dtype=torch.int64),
    "complex": lambda: torch.zeros(4, 3, dtype=torch.complex64),
    "sparse": lambda: torch.randn(4, 3).to_sparse(),
}


@pytest.mark.parametrize("at", [0, 1], ids=["first-param", "second-param"])
@pytest.mark.parametrize("nesterov", [False, True], ids=["plain", "nesterov"])
@pytest.mark.parametrize("bad", list(BAD_BUFFERS), ids=list(BAD_BUFFERS))
def test_a_buffer_torch_rejects_raises_torchs_error_naming_the_param_before_anything_is_written(bad, nesterov, at):
    hyper = {"nesterov": nesterov}
    want_type, want_msg, _ = _raised(torch.optim.SGD, BAD_BUFFERS[bad](), at, foreach=False, **hyper)
    got_type, got_msg, written = _raised(nm_optim.SGD, BAD_BUFFERS[bad](), at, backend="cpu", **hyper)
    assert got_type is want_type, got_msg
    assert want_msg in got_msg
    assert ("'w'" if at == 0 else "'v'") in got_msg
    assert written == [], "a failed step wrote params, grads or the other param's buffer"


def test_a_bad_buffer_loaded_from_a_state_dict_fails_before_any_group_is_stepped():
    """The bad buffer belongs to the second param group; the first group's params and buffers
    stay as they were (each group is its own kernel call)."""
    ps = _two_params()
    opt = nm_optim.SGD([{"params": [ps[0][1]]}, {"params": [ps[1][1]]}], lr=0.1, momentum=0.9)
    opt.step()
    sd = opt.state_dict()
    sd["state"][1]["momentum_buffer"] = torch.randn(2, 6)
    opt.load_state_dict(sd)
    before = [ps[0][1].detach().clone(), opt.state[ps[0][1]]["momentum_buffer"].clone()]
    with pytest.raises(RuntimeError, match=r"#0 of its param group.*The size of tensor a \(6\) must match"):
        opt.step()
    assert torch.equal(ps[0][1].detach(), before[0]) and torch.equal(opt.state[ps[0][1]]["momentum_buffer"], before[1])


# -- a dtype change mid-training ------------------------------------------------------------------

CONFIGS = {
    "momentum": {"lr": 0.1, "momentum": 0.9},
    "wd-dampening": {"lr": 0.05, "momentum": 0.8, "dampening": 0.3, "weight_decay": 1e-2},
    "nesterov-maximize": {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3, "maximize": True},
    "tensor-lr": {"lr": torch.tensor(0.07), "momentum": 0.7, "weight_decay": 1e-2},
}


def _dtype_change_run(make_opt, start, to, convert, steps=5, change_at=2, round_trip=False):
    """A small model in `start`, stepped; before step `change_at`, `convert(model, to)`."""
    gen = torch.Generator().manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3)).to(start)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    opt = make_opt(model.parameters())
    for s in range(steps):
        if s == change_at:
            convert(model, to)
            if round_trip:  # torch's loader casts each buffer to its param's dtype
                opt.load_state_dict(opt.state_dict())
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
        opt.step()
    return model, opt


def _whole_model(model, to):
    model.to(to)


def _first_weight_only(model, to):
    """Only one param of the group changes: the group's cached plan bucketed it with the others."""
    w = model[0].weight
    w.data = w.data.to(to)


def _assert_like_torch(got, want):
    (gm, go), (wm, wo) = got, want
    for (name, p), q in zip(gm.named_parameters(), wm.parameters()):
        _assert_bitwise(p, q, name)
        _assert_bitwise(go.state[p]["momentum_buffer"], wo.state[q]["momentum_buffer"], f"{name}'s buffer")


@pytest.mark.parametrize("convert", [_whole_model, _first_weight_only], ids=["model.to", "one-param"])
@pytest.mark.parametrize("start,to", [(torch.float32, torch.float64), (torch.float64, torch.float32)],
                         ids=["fp32-to-fp64", "fp64-to-fp32"])
@pytest.mark.parametrize("config", list(CONFIGS), ids=list(CONFIGS))
@pytest.mark.parametrize("backend", ["auto", "cpu", "reference"])
def test_a_dtype_change_mid_training_keeps_torchs_bits(backend, config, start, to, convert, calls):
    """torch.optim.SGD keeps each momentum buffer in the dtype it was created in (until
    load_state_dict casts it): ``buf.mul_(momentum)`` rounds to the old dtype, ``add_`` computes
    in the promoted dtype and rounds to the buffer's, ``param.add_`` promotes again."""
    hyper = CONFIGS[config]
    got = _dtype_change_run(lambda ps: nm_optim.SGD(ps, backend=backend, **hyper), start, to, convert)
    want = _dtype_change_run(lambda ps: torch.optim.SGD(ps, foreach=False, **hyper), start, to, convert)
    _assert_like_torch(got, want)
    assert all(len({s[2] for s in call}) == 1 for call in calls), "a kernel call got params of two dtypes"


@pytest.mark.parametrize("start,to", [(torch.float32, torch.float64), (torch.float64, torch.float32)],
                         ids=["fp32-to-fp64", "fp64-to-fp32"])
def test_a_dtype_change_then_a_state_dict_round_trip_keeps_torchs_bits(start, to):
    hyper = CONFIGS["wd-dampening"]
    got = _dtype_change_run(lambda ps: nm_optim.SGD(ps, **hyper), start, to, _whole_model, round_trip=True)
    want = _dtype_change_run(lambda ps: torch.optim.SGD(ps, foreach=False, **hyper), start, to, _whole_model,
                             round_trip=True)
    _assert_like_torch(got, want)
