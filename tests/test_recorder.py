"""The recorder keeps every record_every-th step's statistics with the hyper-parameters that step
used, in bounded device memory, and saves them atomically to one self-describing file. On a real
network the records obey the one-step identities of docs/architecture.md ("The theory") exactly (to rounding)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import nm_optim
from helpers import device_backends


def mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)
    )


def all_tracks(model) -> list:
    tracks = []
    for p in model.parameters():
        tracks += [(p, "rows"), (p, "all")] + ([(p, "cols")] if p.dim() >= 2 else [])
    return tracks


def train(model, opt, steps, scheduler=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(16, 4, generator=gen)
    device = next(model.parameters()).device
    for _ in range(steps):
        x = torch.randn(32, 16, generator=gen)
        y = (x @ teacher).argmax(1)
        x, y = x.to(device), y.to(device)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


def test_save_load_round_trip(tmp_path):
    model = mlp()
    opt = nm_optim.SGD(model.named_parameters(), lr=torch.tensor(0.1), momentum=0.9, track=all_tracks(model))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    train(model, opt, 10, sched)
    record = opt.recorder.snapshot()
    path = opt.recorder.save(tmp_path / "run" / "record.npz")
    loaded = nm_optim.load_record(path)
    assert [t["name"] for t in loaded.tracks] == [t.name for t in opt.tracks]
    assert loaded.tracks[0] == {"name": "0.weight:rows", "axis": "rows", "shape": [32, 16], "num_groups": 32,
                                "dtype": "float32", "sums": list(nm_optim.STAT_NAMES), "block": 1, "param_group": 0}
    assert loaded.meta["stat_names"] == list(nm_optim.STAT_NAMES) and loaded.meta["nm_optim"] == nm_optim.__version__
    for a, b in zip(record.stats, loaded.stats):
        assert np.array_equal(a, b)
    assert np.array_equal(loaded.steps, np.arange(10))
    assert np.allclose(loaded.hyper["lr"][:, 0], [0.1] * 4 + [0.05] * 4 + [0.025] * 2)
    assert np.array_equal(loaded.hyper["momentum"][:, 0], [0.9] * 10)
    assert loaded.first[0].all() and not loaded.first[1:].any()
    assert not loaded.skipped.any()
    arrays = loaded.to_numpy()
    assert arrays["0.weight:cols"].shape == (10, 16, 9) and arrays["4.bias:all"].shape == (10, 1, 9)
    assert list(tmp_path.joinpath("run").iterdir()) == [path], "no temporary files left behind"


def test_record_every_and_the_last_record_equals_last_stats():
    model = mlp()
    opt = nm_optim.SGD(model.parameters(), lr=0.1, track=all_tracks(model), record_every=3)
    train(model, opt, 10)
    record = opt.recorder.snapshot()
    assert list(record.steps) == [0, 3, 6, 9]
    for s, last in zip(record.stats, opt.last_stats()):
        assert np.array_equal(s[-1], last.numpy())


def test_a_long_run_keeps_device_memory_bounded():
    lin = torch.nn.Linear(4, 2)
    opt = nm_optim.SGD(lin.parameters(), lr=1e-3, momentum=0.9, track=[(lin.weight, "rows"), (lin.bias, "all")])
    opt.recorder.chunk = 128
    sizes = set()
    for step in range(10_000):
        for p in lin.parameters():
            p.grad = torch.full_like(p, 1e-3)
        opt.step()
        if step % 500 == 499:
            sizes.add(opt.recorder.device_bytes)
    assert sizes == {128 * 3 * 9 * 8}, "one chunk of 128 steps x 3 groups x 9 float64, whatever the length"
    record = opt.recorder.snapshot()
    assert len(record) == 10_000 and record.stats[0].shape == (10_000, 2, 9)
    assert np.array_equal(record.steps, np.arange(10_000))


def test_skipped_steps_are_recorded():
    # fused=True: as with torch.optim.SGD, GradScaler then hands the step found_inf and the step
    # is recorded as skipped; without it GradScaler unscales first and calls no step() at all.
    model = mlp()
    opt = nm_optim.SGD(model.parameters(), lr=0.1, momentum=0.9, track=all_tracks(model), fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
    for step in range(4):
        opt.zero_grad()
        scaler.scale(torch.nn.functional.cross_entropy(model(x), y)).backward()
        if step in (0, 2):
            model[0].weight.grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()
    record = opt.recorder.snapshot()
    assert list(record.skipped) == [True, False, True, False]
    assert list(record.first.any(axis=1)) == [False, True, False, False]
    assert np.isnan(record.stats[0][0]).all() and not np.isnan(record.stats[0][1]).any()


def test_save_is_atomic(tmp_path, monkeypatch):
    model = mlp()
    opt = nm_optim.SGD(model.parameters(), lr=0.1, track="layers")
    train(model, opt, 3)
    path = opt.recorder.save(tmp_path / "record.npz")
    before = path.read_bytes()
    train(model, opt, 3)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(OSError, match="disk full"):
        opt.recorder.save(path)
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]


def test_load_rejects_other_files(tmp_path):
    np.savez(tmp_path / "x.npz", meta=np.array('{"format": "something else"}'))
    with pytest.raises(ValueError, match="not an nm_optim record"):
        nm_optim.load_record(tmp_path / "x.npz")


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("nesterov", [False, True], ids=["momentum", "nesterov"])
def test_one_step_identities_predict_the_next_record(device, backend, nesterov):
    """docs/architecture.md's one-step identities, per group, 120 steps of a real MLP with momentum, dampening
    and weight decay: Σv', Σp', Σp'², Σp'v', Σv'² computed from record k match record k+1.

    Errors are relative to the size of the terms that form each new value: the kernel computes
    d = g + wd p, v' = mom v + (1 - damp) d and p' = p - lr u per element in float32, so a result
    that cancels to nearly zero keeps the rounding of its larger terms. With n elements per
    group, Cauchy-Schwarz bounds Σ|terms|: |d| <= sqrt(n Σg²) + wd sqrt(n Σp²), |v'| <=
    mom sqrt(n Σv²) + c |d|, |p'| <= sqrt(n Σp²) + lr |u|; second moments use the products."""
    lr, mom, damp, wd = 0.05, 0.9, 0.0 if nesterov else 0.3, 5e-3
    model = mlp().to(device)
    opt = nm_optim.SGD(model.parameters(), lr=lr, momentum=mom, dampening=damp, weight_decay=wd,
                       nesterov=nesterov, backend=backend, track=all_tracks(model))
    train(model, opt, 121)
    record = opt.recorder.snapshot()
    worst = 0.0
    for track, s in zip(record.tracks, record.stats):
        n = np.prod(track["shape"]) / track["num_groups"]  # elements per group
        p, g, v, pp, gg, vv, pg, pv, gv = (s[:-1, :, k] for k in range(9))
        first = np.arange(len(p))[:, None] == 0  # step 0 creates the buffers: v' = d
        c = np.where(first, 1.0, 1.0 - damp)
        m = np.where(first, 0.0, mom)
        v1 = m * v + c * (g + wd * p)
        pv1 = m * pv + c * (pg + wd * pp)
        vv1 = m**2 * vv + 2 * m * c * (gv + wd * pv) + c**2 * (gg + 2 * wd * pg + wd**2 * pp)
        if nesterov:  # u = d + mom v'
            d, pd = g + wd * p, pg + wd * pp
            dd = gg + 2 * wd * pg + wd**2 * pp
            dv1 = m * (gv + wd * pv) + c * dd  # Σ d v'
            u, pu, uu = d + mom * v1, pd + mom * pv1, dd + 2 * mom * dv1 + mom**2 * vv1
            uv1 = dv1 + mom * vv1
        else:
            u, pu, uu, uv1 = v1, pv1, vv1, vv1
        predictions = {
            "v": v1,
            "vv": vv1,
            "p": p - lr * u,
            "pp": pp - 2 * lr * pu + lr**2 * uu,
            "pv": pv1 - lr * uv1,
        }
        nxt = {name: s[1:, :, k] for k, name in enumerate(nm_optim.STAT_NAMES)}
        d_scale = np.sqrt(n * gg) + wd * np.sqrt(n * pp)
        v_scale = m * np.sqrt(n * vv) + c * d_scale
        u_scale = d_scale + mom * v_scale if nesterov else v_scale
        p_scale = np.sqrt(n * pp) + lr * u_scale
        scales = {"v": v_scale, "vv": v_scale**2 / n, "p": p_scale, "pp": p_scale**2 / n, "pv": p_scale * v_scale / n}
        for name, pred in predictions.items():
            err = np.abs(pred - nxt[name]) / (scales[name] + 1e-30)
            worst = max(worst, float(err.max()))
    assert worst <= 1e-5, f"worst relative error of a one-step identity: {worst:.2e}"


def _same_record(a, b):
    assert np.array_equal(a.steps, b.steps)
    for t, x, y in zip(a.tracks, a.stats, b.stats):
        assert np.array_equal(x, y, equal_nan=True), t["name"]
    for k in a.hyper:
        assert np.array_equal(a.hyper[k], b.hyper[k], equal_nan=True), k
    assert np.array_equal(a.first, b.first) and np.array_equal(a.skipped, b.skipped)


def test_dcp_get_state_dict_records_no_step():
    """torch.distributed.checkpoint's get_state_dict steps a fresh optimizer once, with zero
    grads and every lr set to 0, to create its state (state_dict.py, _init_optim_state): not a
    training step, so the recorder neither records nor counts it. A step of the run itself with
    lr 0 (a warmup from 0) is a step, and is recorded."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = mlp()
    opt = nm_optim.SGD(model.parameters(), lr=0.1, momentum=0.9, track="layers")
    with torch.no_grad():
        before = [p.clone() for p in model.parameters()]
    get_state_dict(model, opt)
    assert opt.state, "torch created the momentum buffers"
    assert opt.recorder.steps_done == 0 and len(opt.recorder) == 0
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    train(model, opt, 3)
    assert list(opt.recorder.snapshot().steps) == [0, 1, 2]

    model = mlp()
    opt = nm_optim.SGD(model.parameters(), lr=0.0, momentum=0.9, track="layers")
    opt.zero_grad()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # the run's own zero-lr step, grads zero and all
    assert opt.recorder.steps_done == 1 and list(opt.recorder.snapshot().steps) == [0]


@pytest.mark.parametrize("streamed", [False, True], ids=["in-memory", "streamed"])
def test_recorder_is_a_dcp_stateful(tmp_path, streamed):
    """The recorder goes into a torch.distributed.checkpoint state dict as it is (a Stateful):
    dcp.load into a fresh optimizer's recorder continues the record, which ends equal to an
    uninterrupted run's."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.checkpoint.stateful import Stateful

    def make():
        model = mlp()
        opt = nm_optim.SGD(model.parameters(), lr=0.05, momentum=0.9, track="layers")
        opt.recorder.chunk = 3
        return model, opt

    whole_model, whole = make()
    train(whole_model, whole, 8)

    model, opt = make()
    if streamed:
        opt.recorder.stream_to(tmp_path / "record", fsync=False)
    train(model, opt, 5)
    assert isinstance(opt.recorder, Stateful)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is ... uninitialized": one process
        model_state, optim_state = get_state_dict(model, opt)
        dcp.save({"model": model_state, "optim": optim_state, "recorder": opt.recorder},
                 checkpoint_id=tmp_path / "ckpt")
        train(model, opt, 2)  # past the checkpoint, then lost
        model, opt = make()
        model_state, optim_state = get_state_dict(model, opt)  # steps the fresh optimizer (lr 0)
        state = {"model": model_state, "optim": optim_state, "recorder": opt.recorder}
        dcp.load(state, checkpoint_id=tmp_path / "ckpt")
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    assert opt.recorder.steps_done == 5 and len(opt.recorder) == 5
    assert (opt.recorder.stream is not None) == streamed
    gen = torch.Generator().manual_seed(0)
    teacher = torch.randn(16, 4, generator=gen)
    xs = [torch.randn(32, 16, generator=gen) for _ in range(8)]
    for x in xs[5:]:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), (x @ teacher).argmax(1)).backward()
        opt.step()
    _same_record(whole.recorder.snapshot(), opt.recorder.snapshot())
