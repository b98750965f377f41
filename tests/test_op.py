"""The op ``torch.ops.nm_optim.sgd_step_``: torch.library.opcheck passes for every backend, and
one step makes one kernel call per bucket, whatever the number of tensors, from a table that is
built once."""

from __future__ import annotations

import pytest
import torch

import nm_optim
from nm_optim import ops
from nm_optim.ops import extension, native, plan
from helpers import device_backends, op_args


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize(
    "momentum,first,lr_tensor",
    [(0.0, False, False), (0.9, True, False), (0.9, False, True)],
    ids=["plain", "first_momentum_step", "momentum_tensor_lr"],
)
def test_opcheck(device, backend, momentum, first, lr_tensor):
    args = op_args(device, backend, momentum, first, lr_tensor=lr_tensor)
    torch.library.opcheck(ops.sgd_step_, args)


@pytest.mark.parametrize("device,backend", device_backends())
def test_op_mutates_only_params_and_buffers_and_bumps_their_versions(device, backend):
    params, grads, bufs, *rest = op_args(device, backend, 0.9, False)
    g0 = [g.clone() for g in grads]
    v_before = [p._version for p in params] + [b._version for b in bufs]
    ops.sgd_step_(params, grads, bufs, *rest)
    assert all(torch.equal(g, h) for g, h in zip(grads, g0))
    assert all(after > before for after, before in zip([p._version for p in params] + [b._version for b in bufs], v_before))


def count_kernel_calls(monkeypatch):
    calls = []
    C = extension.extension()
    real = C.sgd_step_cpu

    class Spy:
        def __getattr__(self, name):
            return getattr(C, name)

        @staticmethod
        def sgd_step_cpu(**kwargs):
            calls.append(kwargs["n_tensors"])
            return real(**kwargs)

    monkeypatch.setattr(native, "extension", lambda: Spy())
    return calls


@pytest.mark.skipif("cpu" not in nm_optim.available_backends("cpu"), reason="nm_optim._C not built")
@pytest.mark.parametrize("n_tensors", [1, 10, 1000])
def test_one_kernel_call_per_bucket_whatever_the_number_of_tensors(monkeypatch, n_tensors):
    calls = count_kernel_calls(monkeypatch)
    fp32 = [torch.nn.Parameter(torch.randn(17)) for _ in range(n_tensors)]
    bf16 = [torch.nn.Parameter(torch.randn(9, dtype=torch.bfloat16)) for _ in range(n_tensors)]
    opt = nm_optim.SGD([{"params": fp32}, {"params": bf16, "lr": 0.5}], lr=0.1, momentum=0.9, backend="cpu")
    for p in fp32 + bf16:
        p.grad = torch.ones_like(p)
    opt.step()
    assert sorted(calls) == [n_tensors, n_tensors], "one call for each (group, dtype) bucket"


@pytest.mark.skipif("cpu" not in nm_optim.available_backends("cpu"), reason="nm_optim._C not built")
def test_the_tile_table_is_built_once_and_rebuilt_when_params_change(monkeypatch):
    built = []
    real = plan.TileTable

    def spy(numels, *args):
        built.append(numels)
        return real(numels, *args)

    monkeypatch.setattr(plan, "TileTable", spy)
    monkeypatch.setattr(plan, "_tables", type(plan._tables)())
    params = [torch.nn.Parameter(torch.randn(n)) for n in (3, 100_000, 7)]
    opt = nm_optim.SGD(params, lr=0.1, momentum=0.9, backend="cpu")
    for _ in range(5):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    assert built == [(3, 100_000, 7)]
    extra = torch.nn.Parameter(torch.randn(11))
    extra.grad = torch.randn(11)
    opt.param_groups[0]["params"].append(extra)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert built == [(3, 100_000, 7), (3, 100_000, 7, 11)]


def test_the_fake_checks_what_the_kernels_assume():
    """Under tracing (fake tensors) the op checks its lists as the real op does, so a mistake
    fails at compile time with a message instead of inside a kernel."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    hyper = (0.1, None, 0.0, 0.9, 0.0, False, False, None, None, "reference")
    with FakeTensorMode():
        p, g, v = torch.empty(3), torch.empty(4), torch.empty(3)
        with pytest.raises(RuntimeError, match="grad 0 has shape"):
            ops.sgd_step_([p], [g], [v], [False], *hyper)
        with pytest.raises(RuntimeError, match="one momentum buffer and one is_first flag per param"):
            ops.sgd_step_([p], [torch.empty(3)], [], [], *hyper)
        stats = torch.empty(2, 9, dtype=torch.float64)
        with pytest.raises(RuntimeError, match=r"needs stats rows \[0, 3\)"):
            ops.sgd_step_([p], [torch.empty(3)], [v], [False], *hyper, stats, [0, -1, -1])


@pytest.mark.skipif("cpu" not in nm_optim.available_backends("cpu"), reason="nm_optim._C not built")
def test_a_cached_stats_layout_is_checked_again_every_call():
    """A tracked bucket's checked layout is cached (ops/plan.py, StatsLayout) and found again by
    list comparisons: the same tensor reshaped in place (same element count), other offsets or a
    smaller stats tensor are checked again, and the statistics follow the new layout."""
    hyper = (0.1, None, 1e-2, 0.9, 0.0, False, False, None, None)
    torch.manual_seed(0)
    p, g, v = torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 3)

    def step(offsets, rows):
        want = torch.full((rows, 9), float("nan"), dtype=torch.float64)
        ops.sgd_step_([p.clone()], [g], [v.clone()], [False], *hyper, "reference", want, offsets)
        got = torch.full((rows, 9), float("nan"), dtype=torch.float64)
        ops.sgd_step_([p], [g], [v], [False], *hyper, "cpu", got, offsets)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, equal_nan=True)

    step([0, -1, -1], 4)  # rows: 4 groups
    for t in (p, g, v):
        t.resize_(6, 2)  # the same tensors, 12 elements still
    with pytest.raises(RuntimeError, match=r"needs stats rows \[0, 6\)"):
        step([0, -1, -1], 4)
    step([0, -1, -1], 6)
    with pytest.raises(RuntimeError, match=r"needs stats rows \[2, 8\)"):
        step([2, -1, -1], 6)
    step([2, 0, -1], 8)  # rows and cols
    step([-1, -1, 0], 1)  # "all": one row of 12 elements, whatever the shape
    for t in (p, g, v):
        t.resize_(12)
    step([-1, -1, 0], 1)
    with pytest.raises(RuntimeError, match=r"needs stats rows \[1, 2\)"):
        step([-1, -1, 1], 1)


def test_step_args_follow_the_op_schema():
    """The arguments after the four tensor lists are StepArgs' fields, in order: a new
    hyper-parameter is one schema entry and one field, and every backend receives it."""
    from nm_optim.ops.args import FIELDS

    names = [a.name for a in ops.sgd_step_.default._schema.arguments]
    assert names[:4] == ["params", "grads", "momentum_buffers", "is_first"]
    assert tuple(names[4:]) == FIELDS


@pytest.mark.skipif("cpu" not in nm_optim.available_backends("cpu"), reason="nm_optim._C not built")
def test_many_buckets_keep_their_tables(monkeypatch):
    """Tables are cached per bucket, not in one global LRU: 100 per-layer param groups (100
    buckets, each with tracks) build their tables on the first step only."""
    built = []
    real = plan.TileTable
    monkeypatch.setattr(plan, "TileTable", lambda numels, *a: built.append(numels) or real(numels, *a))
    params = [torch.nn.Parameter(torch.randn(4, 3)) for _ in range(100)]
    opt = nm_optim.SGD([{"params": [p]} for p in params], lr=0.1, momentum=0.9, backend="cpu",
                       track=[(p, "cols") for p in params])
    for step in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        assert len(built) == 100, f"step {step}: {len(built)} tables built"


@pytest.mark.skipif("cpu" not in nm_optim.available_backends("cpu"), reason="nm_optim._C not built")
def test_a_buckets_tables_go_with_its_params():
    import gc

    p = torch.nn.Parameter(torch.randn(10))
    p.grad = torch.randn(10)
    opt = nm_optim.SGD([p], lr=0.1, backend="cpu")
    opt.step()
    key = id(p)
    assert key in plan._tables
    del opt, p
    gc.collect()
    assert key not in plan._tables


def test_a_driver_too_old_for_the_cuda_runtime_falls_back_with_one_warning(monkeypatch):
    """torch sees a GPU, the module's static CUDA 13 runtime does not (driver < 580): 'cuda' is
    not offered, 'auto' picks another backend and says why, 'cuda' asked for says why."""
    from nm_optim.ops import extension, registry

    if not nm_optim.build_info()["cuda_compiled"]:
        pytest.skip("nm_optim._C built without CUDA")
    real = extension.extension()

    class OldDriver:
        def __getattr__(self, name):
            return getattr(real, name)

        @staticmethod
        def cuda_device_count():
            return 0

    monkeypatch.setattr(registry, "extension", lambda: OldDriver())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for f in (registry._cuda_runtime_sees_devices, registry.default_backend, registry.require_backend):
        f.cache_clear()
    try:
        cuda = torch.device("cuda", 0)
        assert "cuda" not in nm_optim.available_backends(cuda)
        with pytest.warns(RuntimeWarning, match="driver"):
            assert registry.default_backend(cuda) in ("triton", "reference")
        with pytest.raises(RuntimeError, match="driver"):
            registry.require_backend("cuda", cuda)
    finally:
        for f in (registry._cuda_runtime_sees_devices, registry.default_backend, registry.require_backend):
            f.cache_clear()
