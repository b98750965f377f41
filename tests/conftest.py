"""pytest set-up: Triton's interpreter on machines without a GPU, and `gpu` tests skipped there.
What the tests share lives in tests/helpers.py."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

# Without a GPU, the Triton backend runs on CPU tensors in Triton's interpreter. It must be
# switched on before the kernels are defined (nm_optim._triton is imported lazily, on first use).
if importlib.util.find_spec("triton") is not None and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
