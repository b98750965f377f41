"""nm_optim.SGD under torch.distributed (docs/architecture.md, "Distributed"): two CPU processes, gloo on loopback.

One launch of two worker processes (this file run as a script) runs every scenario and saves what
each rank saw; the tests compare. Scenarios:

- FSDP2 (``fully_shard``, params sharded on dim 0, uneven and empty shards): nm_optim.SGD steps
  the local shards and equals torch.optim.SGD under FSDP2; its momentum buffers are DTensors as
  torch's are. Tracks (rows, cols, all) on sharded params are the statistics of the whole tensors,
  equal to a float64 computation on the gathered tensors and identical on both ranks, with one
  all-reduce per step (none without tracks).
- DTensors built by ``distribute_tensor`` directly: Shard(1) and Replicate params.
- FSDP2 with symmetries, the public path: find_symmetries on the plain model, fully_shard, then
  nm_optim.SGD(model.parameters(), symmetries=syms) (members matched by name) records what a
  1-process run on the global batch records; find_symmetries on the sharded model says to find
  before sharding.
- DDP: records identical on both ranks, and the optimizer communicates nothing.
- ZeroRedundancyOptimizer(optimizer_class=nm_optim.SGD): equals torch's without tracks; with
  tracks, a NotImplementedError at construction on every rank.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

WORLD = 2
STEPS = 4
HYPER = {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-2}


# --------------------------------------------------------------------------------------------
# The workers (run as `python tests/test_distributed.py RANK WORLD INIT_FILE OUT_DIR`)
# --------------------------------------------------------------------------------------------


def _model():
    # dim 0 of the weights: 5 (shards 3 + 2), 3 (2 + 1), 1 (1 + an empty shard)
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3), torch.nn.ReLU(),
                               torch.nn.Linear(3, 1))


def _batch(rank, step):
    gen = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(8, 6, generator=gen), torch.randn(8, 1, generator=gen)


def _loss(m, rank, step):
    x, y = _batch(rank, step)
    return (m(x) - y).square().mean()


def _fsdp(mesh):
    from torch.distributed.fsdp import fully_shard

    m = _model()
    for layer in m:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(m, mesh=mesh)


class _CountAllReduce:
    """Counts torch.distributed.all_reduce calls while active."""

    def __init__(self):
        import torch.distributed as dist

        self.dist, self.calls, self.real = dist, 0, dist.all_reduce

    def __enter__(self):
        def counting(*a, **k):
            self.calls += 1
            return self.real(*a, **k)

        self.dist.all_reduce = counting
        return self

    def __exit__(self, *exc):
        self.dist.all_reduce = self.real


def _full64(t):
    from torch.distributed.tensor import DTensor

    t = t.full_tensor() if isinstance(t, DTensor) else t
    return t.detach().to(torch.float64).clone()


def _expected(params, opt, axes):
    """float64 statistics of the whole (gathered) tensors before the step, per track."""
    from helpers import expected_stats

    out = []
    for p, axis in axes:
        buf = opt.state[p].get("momentum_buffer") if p in opt.state else None
        pv = _full64(p)
        gv = _full64(p.grad)
        vv = _full64(buf) if buf is not None else torch.zeros_like(pv)
        out.append(expected_stats(pv, gv, vv, axis))
    return out


def _scenario_fsdp(rank, mesh, res):
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    import nm_optim

    # Parity with torch.optim.SGD, no tracks (and then no collective in the step).
    runs = {}
    for name, cls in (("torch", torch.optim.SGD), ("nm", nm_optim.SGD)):
        m = _fsdp(mesh)
        opt = cls(m.parameters(), nesterov=True, **HYPER)
        calls = 0
        for step in range(STEPS):
            _loss(m, rank, step).backward()
            with _CountAllReduce() as c:
                opt.step()
            calls += c.calls
            opt.zero_grad()
        bufs = [opt.state[p]["momentum_buffer"] for p in m.parameters()]
        runs[name] = ([_full64(p) for p in m.parameters()], [_full64(b) for b in bufs])
        res[f"fsdp_{name}_collectives"] = calls
        res[f"fsdp_{name}_buffer_layout"] = [(type(b).__name__, str(tuple(b.placements)), tuple(b.to_local().shape))
                                             for b in bufs]
        res[f"fsdp_{name}_state_keys"] = sorted(opt.state_dict()["param_groups"][0])
        sd = get_optimizer_state_dict(m, opt)  # torch.distributed.checkpoint's view
        res[f"fsdp_{name}_dcp"] = {k: {s: (type(v).__name__, tuple(v.shape), str(getattr(v, "placements", None)))
                                       for s, v in st.items()} for k, st in sd["state"].items()}
    res["fsdp_params"] = runs

    # Tracks on sharded weights (uneven dim 0, an empty shard) and biases.
    m = _fsdp(mesh)
    named = dict(m.named_parameters())
    axes = [(p, ax) for n, p in named.items() for ax in (("rows", "cols", "all") if p.dim() == 2 else ("rows", "all"))]
    opt = nm_optim.SGD(list(named.items()), track=axes, **HYPER)
    got, want, calls = [], [], []
    for step in range(STEPS):
        _loss(m, rank, step).backward()
        want.append(_expected(named.values(), opt, axes))
        with _CountAllReduce() as c:
            opt.step()
        calls.append(c.calls)
        got.append(opt.last_stats())
        opt.zero_grad()
    rec = opt.recorder.snapshot()
    res["tracks"] = [t.name for t in opt.tracks]
    res["tracks_local_shapes"] = [tuple(p.to_local().shape) for p, _ in axes]
    res["tracks_got"], res["tracks_want"], res["tracks_collectives"] = got, want, calls
    res["tracks_record"] = (rec.steps, [np.asarray(s) for s in rec.stats])


def _classifier():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))


def _labels(rank, step):
    return torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(100 + 1000 * rank + step))


def _record(opt):
    rec = opt.recorder.snapshot()
    return {"steps": rec.steps, "stats": [np.asarray(s) for s in rec.stats], "tracks": rec.tracks,
            "symmetries": rec.meta["symmetries"]}


def _scenario_fsdp_symmetries(rank, mesh, res):
    """find_symmetries -> fully_shard -> nm_optim.SGD(model.parameters(), symmetries=syms), and
    the same run in one process on the global batch (both ranks' examples)."""
    import torch.nn.functional as F
    from torch.distributed.fsdp import fully_shard

    import nm_optim

    x0 = _batch(rank, 0)[0]
    m = _classifier()
    syms = nm_optim.find_symmetries(m, x0, loss=F.cross_entropy)
    for layer in m:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(m, mesh=mesh)
    try:
        nm_optim.find_symmetries(m, x0, loss=F.cross_entropy)
        res["sym_find_sharded"] = None
    except nm_optim.symmetry.SymmetryDetectionError as e:
        res["sym_find_sharded"] = str(e)
    opt = nm_optim.SGD(m.parameters(), symmetries=syms, **HYPER)
    named = nm_optim.SGD(m.named_parameters(), symmetries=syms, **HYPER)  # matched through param_names
    res["sym_named_tracks"] = [t.name for t in named.tracks]
    res["sym_dtensor_tracks"] = [type(t.param).__name__ for t in opt.tracks]
    for step in range(STEPS):
        F.cross_entropy(m(_batch(rank, step)[0]), _labels(rank, step)).backward()
        opt.step()
        opt.zero_grad()
    res["sym_fsdp"] = _record(opt)

    single = _classifier()
    opt = nm_optim.SGD(single.parameters(), symmetries=nm_optim.find_symmetries(single, x0, loss=F.cross_entropy),
                       **HYPER)
    for step in range(STEPS):
        x = torch.cat([_batch(r, step)[0] for r in range(WORLD)])
        y = torch.cat([_labels(r, step) for r in range(WORLD)])
        F.cross_entropy(single(x), y).backward()
        opt.step()
        opt.zero_grad()
    res["sym_single"] = _record(opt)


def _scenario_dtensor(rank, mesh, res):
    """DTensors made by distribute_tensor: Shard(1) (rows are partial sums, cols at an offset),
    Shard(0) and Replicate in one optimizer."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    import nm_optim

    torch.manual_seed(1)
    full = [torch.randn(4, 7, 2), torch.randn(3, 5), torch.randn(6)]
    placements = [[Shard(1)], [Shard(0)], [Replicate()]]
    params = [torch.nn.Parameter(distribute_tensor(t, mesh, pl)) for t, pl in zip(full, placements)]
    axes = [(p, ax) for p in params for ax in (("rows", "cols", "all") if p.dim() >= 2 else ("rows", "all"))]
    opt = nm_optim.SGD(params, track=axes, **HYPER)
    ref = [torch.nn.Parameter(t.clone()) for t in full]
    ref_opt = torch.optim.SGD(ref, **HYPER)
    got, want = [], []
    for step in range(STEPS):
        gen = torch.Generator().manual_seed(step)
        grads = [torch.randn(t.shape, generator=gen) for t in full]
        for p, r, g, pl in zip(params, ref, grads, placements):
            p.grad = distribute_tensor(g, mesh, pl)
            r.grad = g.clone()
        want.append(_expected(params, opt, axes))
        opt.step()
        ref_opt.step()
        got.append(opt.last_stats())
    res["dtensor_got"], res["dtensor_want"] = got, want
    res["dtensor_params"] = ([_full64(p) for p in params], [_full64(r) for r in ref])
    params[1].grad = None  # a sharded param without a grad: its statistics are NaN on every rank
    with _CountAllReduce() as c:
        opt.step()
    res["dtensor_nograd"] = (opt.last_stats(), c.calls)


def _scenario_ddp(rank, res):
    from torch.nn.parallel import DistributedDataParallel as DDP

    import nm_optim

    m = DDP(_model())
    named = dict(m.module.named_parameters())
    axes = [(p, ax) for p in named.values() for ax in (("rows", "cols", "all") if p.dim() == 2 else ("all",))]
    opt = nm_optim.SGD(list(named.items()), track=axes, **HYPER)
    calls = 0
    for step in range(STEPS):
        _loss(m, rank, step).backward()  # a different batch on each rank
        with _CountAllReduce() as c:
            opt.step()
        calls += c.calls
        opt.zero_grad()
    rec = opt.recorder.snapshot()
    res["ddp_record"] = (rec.steps, [np.asarray(s) for s in rec.stats], [t.name for t in opt.tracks])
    res["ddp_collectives"] = calls


def _scenario_zero(rank, res):
    from torch.distributed.optim import ZeroRedundancyOptimizer

    import nm_optim

    out = {}
    for name, cls in (("torch", torch.optim.SGD), ("nm", nm_optim.SGD)):
        m = _model()
        opt = ZeroRedundancyOptimizer(m.parameters(), optimizer_class=cls, **HYPER)
        for step in range(STEPS):
            x, y = _batch(0, step)  # the same batch everywhere: no DDP here
            (m(x) - y).square().mean().backward()
            opt.step()
            opt.zero_grad()
        out[name] = [p.detach().clone() for p in m.parameters()]
    res["zero_params"] = out
    errors = []
    for track in ("layers", "explicit"):
        m = _model()
        spec = "layers" if track == "layers" else [(m[0].weight, "rows")]
        try:
            ZeroRedundancyOptimizer(m.parameters(), optimizer_class=nm_optim.SGD, track=spec, **HYPER)
            errors.append(None)
        except NotImplementedError as e:
            errors.append(str(e))
    res["zero_errors"] = errors


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    res: dict = {}
    _scenario_fsdp(rank, mesh, res)
    _scenario_fsdp_symmetries(rank, mesh, res)
    _scenario_dtensor(rank, mesh, res)
    _scenario_ddp(rank, res)
    _scenario_zero(rank, res)
    torch.save(res, Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()
    # gloo's threads outlive the process group here (the mesh holds it) and may abort the
    # interpreter's finalisation: end as `nm-optim train --distributed` does (see there)
    from nm_optim.app.distributed import end_process

    end_process(0)


# --------------------------------------------------------------------------------------------
# The tests
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ranks():
    """Runs the workers once; the results of rank 0 and rank 1."""
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"), OMP_NUM_THREADS="1")
        init = Path(tmp) / "init"
        procs = [subprocess.Popen([sys.executable, __file__, str(r), str(WORLD), str(init), tmp], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for r in range(WORLD)]
        outs = []
        for p in procs:
            try:
                outs.append(p.communicate(timeout=120)[0])
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                pytest.fail("distributed workers timed out")
        for r, (p, out) in enumerate(zip(procs, outs)):
            assert p.returncode == 0, f"rank {r} failed:\n{out[-6000:]}"
        return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_fsdp2_steps_like_torch_sgd_under_fsdp2(ranks):
    for res in ranks:
        (p_t, b_t), (p_n, b_n) = res["fsdp_params"]["torch"], res["fsdp_params"]["nm"]
        for a, b in zip(p_n + b_n, p_t + b_t):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        # momentum buffers are DTensors sharded like their params, as torch's are
        assert res["fsdp_nm_buffer_layout"] == res["fsdp_torch_buffer_layout"]
        assert all(kind == "DTensor" for kind, _, _ in res["fsdp_nm_buffer_layout"])
        assert res["fsdp_nm_state_keys"] == res["fsdp_torch_state_keys"]
        assert res["fsdp_nm_dcp"] == res["fsdp_torch_dcp"] and "0.weight" in res["fsdp_nm_dcp"]
        assert res["fsdp_nm_collectives"] == 0  # no tracks: no communication


def test_fsdp2_tracks_are_whole_tensor_statistics_identical_on_every_rank(ranks):
    from helpers import assert_stats_close

    r0, r1 = ranks
    # uneven shards and an empty one are part of the run
    assert (0, 3) in r1["tracks_local_shapes"] and (3, 6) in r0["tracks_local_shapes"]
    assert (2, 6) in r1["tracks_local_shapes"]
    for res in ranks:
        assert res["tracks_collectives"] == [1] * STEPS  # one all-reduce per step for all tracks
        for step, (got, want) in enumerate(zip(res["tracks_got"], res["tracks_want"])):
            for name, g, (w, scale) in zip(res["tracks"], got, want):
                assert_stats_close(g, w, scale, f"step {step} {name}")
    assert r0["tracks"] == r1["tracks"]
    assert all(torch.equal(a, b) for s0, s1 in zip(r0["tracks_got"], r1["tracks_got"]) for a, b in zip(s0, s1))
    (steps0, rec0), (steps1, rec1) = r0["tracks_record"], r1["tracks_record"]
    assert np.array_equal(steps0, np.arange(STEPS)) and np.array_equal(steps0, steps1)
    assert all(np.array_equal(a, b) and np.isfinite(a).all() for a, b in zip(rec0, rec1))


def _scale(record, i):
    """Each statistic's scale in track i, per step and column, maxed over the track's groups: a
    bound on the sum of |terms| (Cauchy-Schwarz: sum|x| <= sqrt(n sum x^2), sum|x y| <=
    sqrt(sum x^2 sum y^2)). Σg of a translation group cancels to rounding: its own size is no scale."""
    t, s = record["tracks"][i], record["stats"][i]
    shape, axis = t["shape"], t["axis"]
    n = int(np.prod(shape)) // (shape[0] if axis == "rows" else shape[1] if axis == "cols" else 1)
    pp, gg, vv = s[..., 3], s[..., 4], s[..., 5]
    bound = np.stack([np.sqrt(n * pp), np.sqrt(n * gg), np.sqrt(n * vv), pp, gg, vv,
                      np.sqrt(pp * gg), np.sqrt(pp * vv), np.sqrt(gg * vv)], -1)
    return bound.max(axis=1, keepdims=True)


def test_fsdp2_with_symmetries_found_before_sharding_records_the_one_process_run(ranks):
    """The public path: syms = find_symmetries(model, x, loss=...); fully_shard(...);
    nm_optim.SGD(model.parameters(), symmetries=syms). The members are matched to the sharded
    params by name; the record (whole-tensor statistics, identical on both ranks) equals a
    1-process run's on the global batch, to the rounding of the gradient's other reduction order."""
    r0, r1 = ranks
    fsdp, single = r0["sym_fsdp"], r0["sym_single"]
    names = [t["name"] for t in fsdp["tracks"]]
    assert names == ["0.weight:rows", "0.bias:rows", "2.weight:cols", "2.bias:all"]
    assert names == [t["name"] for t in single["tracks"]] == r0["sym_named_tracks"]
    assert r0["sym_dtensor_tracks"] == ["DTensor"] * 4, "the tracks are the sharded params"
    assert [d["kind"] for d in fsdp["symmetries"]] == ["rescale", "translation"]
    assert fsdp["symmetries"] == single["symmetries"]
    assert [t["shape"] for t in fsdp["tracks"]] == [t["shape"] for t in single["tracks"]], "whole-tensor shapes"
    assert np.array_equal(fsdp["steps"], np.arange(STEPS)) and np.array_equal(fsdp["steps"], single["steps"])
    for a, b in zip(fsdp["stats"], r1["sym_fsdp"]["stats"]):
        assert np.array_equal(a, b, equal_nan=True), "identical on every rank"
    for i, (a, b) in enumerate(zip(fsdp["stats"], single["stats"])):
        # The rescale tracks reduce the products only: the other columns NaN in both runs.
        assert np.array_equal(np.isnan(a), np.isnan(b)), names[i]
        err = float(np.nanmax(np.abs(a - b) / np.maximum(_scale(single, i), 1e-300)))
        assert err <= 1e-5, f"{names[i]}: error {err:.2e} of the track's scale"
    for res in ranks:
        assert "find the symmetries before sharding" in res["sym_find_sharded"]
        assert "FSDP2's fully_shard" in res["sym_find_sharded"]


def test_dtensors_sharded_on_dim_1_and_replicated(ranks):
    from helpers import assert_stats_close

    for res in ranks:
        mine, ref = res["dtensor_params"]
        for a, b in zip(mine, ref):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        for step, (got, want) in enumerate(zip(res["dtensor_got"], res["dtensor_want"])):
            for i, (g, (w, scale)) in enumerate(zip(got, want)):
                assert_stats_close(g, w, scale, f"step {step} track {i}")
    assert all(torch.equal(a, b) for s0, s1 in zip(ranks[0]["dtensor_got"], ranks[1]["dtensor_got"])
               for a, b in zip(s0, s1))
    for res in ranks:
        stats, calls = res["dtensor_nograd"]
        assert calls == 1
        assert all(s.isnan().all() for s in stats[3:6])  # params[1]: rows, cols, all
        assert all(s.isfinite().all() for s in stats[:3] + stats[6:])


def test_ddp_statistics_are_identical_on_every_rank_without_communication(ranks):
    (steps0, rec0, names0), (steps1, rec1, names1) = ranks[0]["ddp_record"], ranks[1]["ddp_record"]
    assert names0 == names1 and names0[0] == "0.weight:rows"
    assert np.array_equal(steps0, steps1) and len(steps0) == STEPS
    assert all(np.array_equal(a, b) and np.isfinite(a).all() for a, b in zip(rec0, rec1))
    assert ranks[0]["ddp_collectives"] == ranks[1]["ddp_collectives"] == 0


def test_zero_redundancy_optimizer_without_tracks_equals_torch_and_refuses_tracks_on_every_rank(ranks):
    for res in ranks:
        for a, b in zip(res["zero_params"]["nm"], res["zero_params"]["torch"]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        assert all(e is not None and "ZeroRedundancyOptimizer" in e and "FSDP2" in e for e in res["zero_errors"])


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
