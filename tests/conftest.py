"""Shared helpers: which (device, backend) pairs exist here, and error measures with readable
failure messages. Unavailable backends are skipped with the reason, never silently dropped."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

# Without a GPU, the Triton backend runs on CPU tensors in Triton's interpreter. It must be
# switched on before the kernels are defined (nm_optim._triton is imported lazily, on first use).
if importlib.util.find_spec("triton") is not None and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import nm_optim
from nm_optim._extension import BACKENDS


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


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
