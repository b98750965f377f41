"""What the tests share: the (device, backend) pairs that exist here, error measures with
readable failure messages, a tiny model and its batches, the statistics checks, and generators of
tiny data sets. Test modules import from here, never from each other."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

import nm_optim
from nm_optim.app import data
from nm_optim.names import BACKENDS
from nm_optim.ops.layout import geometry


def devices() -> list[str]:
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def device_backends() -> list:
    """Every (device, backend) pair, with a skip mark where this machine cannot run it."""
    out = []
    for device in ("cpu", "cuda"):
        here = nm_optim.available_backends(device) if device in devices() else []
        for backend in BACKENDS:
            if backend == "cpu" and device == "cuda" or backend == "cuda" and device == "cpu":
                continue
            marks = []
            if device == "cuda":
                marks.append(pytest.mark.gpu)
            if backend not in here:
                marks.append(pytest.mark.skip(reason=f"backend {backend!r} not available for {device} here"))
            elif backend == "triton" and device == "cpu":
                # Triton's interpreter is ~1000x slower than the kernels: tests/test_triton.py
                # covers the backend in the default run; these broad suites run with -m slow.
                marks.append(pytest.mark.slow)
            out.append(pytest.param(device, backend, id=f"{device}-{backend}", marks=marks))
    return out


def rel_err(actual: torch.Tensor, expected: torch.Tensor, floor: float = 0.0) -> float:
    """max |actual - expected| / max(max |expected|, floor), in float64 (0 for empty tensors).

    `floor` is the size of the terms that formed the value: a momentum buffer that sums O(1)
    gradients and cancels down to 0.2 carries the rounding of the O(1) terms, not of 0.2."""
    if expected.numel() == 0:
        return 0.0
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    scale = max(e.abs().max().item(), floor)
    diff = (a - e).abs().max().item()
    return diff / scale if scale > 0 else diff


def assert_rel_close(
    actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str, floor: float = 0.0
) -> None:
    """Fail with how many elements are off and where the worst one is."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = rel_err(actual, expected, floor)
    if err <= tol:
        return
    a, e = actual.detach().double().cpu().reshape(-1), expected.detach().double().cpu().reshape(-1)
    diff = (a - e).abs()
    scale = max(e.abs().max().item(), floor) or 1.0
    bad = int((diff > tol * scale).sum())
    worst = int(diff.argmax())
    raise AssertionError(
        f"{what}: relative error {err:.3e} > {tol:.1e}; {bad} of {a.numel()} elements off; "
        f"worst at flat index {worst}: got {a[worst].item()!r}, expected {e[worst].item()!r}"
    )


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def batch(step: int):
    gen = torch.Generator().manual_seed(step)
    return torch.randn(16, 5, generator=gen), torch.randint(0, 3, (16,), generator=gen)


SHAPES = [
    (1,),
    (7,),
    (13, 17),
    (278011,),
    (32, 16, 3, 3),
    (3, 40000),  # rows longer than one CPU tile (32768 elements)
    (300, 1),  # a single column
    (1000, 1000),  # 10^6 elements in the "all" group
    (0,),
    (3, 0),
    (2, 3, 0, 4),
]


TOL = 1e-6


def axes_for(shape) -> list[str]:
    return ["rows", "cols", "all"] if len(shape) >= 2 else ["rows", "all"]


def expected_stats(p, g, v, axis, block: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 sums and the sums of absolute terms (the scale of each sum's rounding). `block`: a
    "cols" track's column block (groups of `block` consecutive columns)."""
    d0, d1, rest = geometry(p.shape)
    d1, rest = d1 // block, block * rest  # a group of `block` columns: consecutive in memory order
    terms = torch.stack([p, g, v, p * p, g * g, v * v, p * g, p * v, g * v], -1).reshape(d0, d1, rest, 9)
    dims = {"rows": (1, 2), "cols": (0, 2), "all": (0, 1, 2)}[axis]
    n = {"rows": d0, "cols": d1, "all": 1}[axis]
    return terms.sum(dims).reshape(n, 9), terms.abs().sum(dims).reshape(n, 9)


def assert_stats_close(got, want, scale, what):
    assert got.dtype == torch.float64 and got.device.type == "cpu"
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if got.numel() == 0:
        return
    err = ((got - want).abs() / scale.clamp_min(1e-300)).max().item()
    assert err <= TOL, f"{what}: relative error {err:.3e} (relative to the sum of |terms|)"


def run_and_check(params, opt, tracks, steps, grad_scale=1.0, maximize=False, dtype_tol=None):
    for step in range(steps):
        pre_p = [p.detach().double().cpu().clone() for p in params]
        pre_v = [
            opt.state[p]["momentum_buffer"].double().cpu().clone() if p in opt.state else torch.zeros(p.shape, dtype=torch.float64)
            for p in params
        ]
        gen = torch.Generator().manual_seed(step)
        for p in params:
            p.grad = (torch.randn(p.shape, generator=gen) * grad_scale).to(device=p.device, dtype=p.dtype)
        grads = [p.grad.double().cpu() / grad_scale * (-1 if maximize else 1) for p in params]
        if grad_scale != 1.0:
            opt.grad_scale = torch.tensor(grad_scale, device=params[0].device)
            opt.found_inf = torch.tensor(0.0, device=params[0].device)
        opt.step()
        index = {id(p): i for i, p in enumerate(params)}
        for (p, axis), got in zip(tracks, opt.last_stats()):
            i = index[id(p)]
            want, scale = expected_stats(pre_p[i], grads[i], pre_v[i], axis)
            assert_stats_close(got, want, scale, f"step {step} {tuple(p.shape)}:{axis}")


def dump(obj, path):
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def write_cifar10(root, n_per_batch=6, seed=0, *, skip=(), meta=True):
    """CIFAR-10's python layout: data_batch_1..5 + test_batch, dicts with bytes keys, uint8 [N, 3072]."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    batches = {}
    for name in (*data.CIFAR10_TRAIN, data.CIFAR10_TEST):
        images = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, 10, size=n_per_batch)]
        batches[name] = (images, labels)
        if name in skip:
            continue
        with open(root / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": images,
                         b"filenames": [f"{i}.png".encode() for i in range(n_per_batch)]}, f, protocol=2)
    if meta:
        with open(root / "batches.meta", "wb") as f:
            pickle.dump({b"label_names": [n.encode() for n in data.CIFAR10_CLASSES]}, f)
    return batches


def write_image_folder(root, classes=("cat", "dog", "eel"), per_class=3, size=(10, 7), seed=0, nested=False):
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(seed)
    pixels = {}
    for c in classes:
        folder = root / c / ("images" if nested else "")
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(arr).save(folder / f"{c}_{i}.png")
            pixels[(c, i)] = arr
    return pixels


def op_args(device, backend, momentum, first, n=3, dtype=torch.float32, lr_tensor=False):
    gen = torch.Generator().manual_seed(0)
    shapes = [(5,), (3, 4), (2, 3, 3, 3)][:n]
    params = [torch.randn(s, generator=gen).to(device, dtype) for s in shapes]
    grads = [torch.randn(s, generator=gen).to(device, dtype) for s in shapes]
    bufs = [torch.randn(s, generator=gen).to(device, dtype) for s in shapes] if momentum else []
    is_first = [first] * len(shapes) if momentum else []
    lr_t = torch.tensor(0.05, device=device) if lr_tensor else None
    return (params, grads, bufs, is_first, 0.1, lr_t, 0.01, momentum, 0.0, False, False, None, None, backend)


def run_in_child(code: str, **env: str) -> None:
    """Run `code` in a fresh interpreter with tests/ importable and `env` added to the environment
    (for settings read once per process, such as ATEN_CPU_CAPABILITY); it must print "ok"."""
    import os
    import subprocess
    import sys

    prelude = f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})\n"
    r = subprocess.run([sys.executable, "-c", prelude + code], env=dict(os.environ, **env), capture_output=True,
                       text=True, timeout=300, check=False)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr


def assert_same_record(a, b) -> None:
    """Two records hold the same steps, statistics, hyper-parameters and first-step flags, bit
    for bit."""
    assert np.array_equal(a.steps, b.steps)
    for t, x, y in zip(a.tracks, a.stats, b.stats):
        assert np.array_equal(x, y, equal_nan=True), t["name"]  # product-only tracks: NaN columns
    for k in a.hyper:
        assert np.array_equal(a.hyper[k], b.hyper[k], equal_nan=True), k
    assert np.array_equal(a.first, b.first)


def load_example(name: str):
    """The module examples/<name>.py, imported from its file (examples/ is not a package)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
