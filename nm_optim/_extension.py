"""Loading the compiled kernels (nm_optim._C), and what this build and machine can run.

Import never needs the compiled module, nvcc, a GPU or Triton: a missing piece becomes an error
only when a backend that needs it is asked for.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Any

import torch

try:
    from nm_optim import _C  # type: ignore[attr-defined]

    _C_IMPORT_ERROR: BaseException | None = None
except ImportError as e:  # a source checkout without a build, or a broken build
    _C = None
    _C_IMPORT_ERROR = e

BACKENDS = ("reference", "cpu", "cuda", "triton")

_BUILD_HINT = (
    "build it with `pip install -e .` (or `pip install .`) from the nm_optim source tree; "
    "the 'reference' backend works without it"
)


def extension() -> Any:
    """The compiled module, or an ImportError that says how to build it."""
    if _C is None:
        raise ImportError(f"nm_optim._C is not available ({_C_IMPORT_ERROR}); {_BUILD_HINT}")
    return _C


def build_info() -> dict[str, Any]:
    """How this copy of nm_optim was built: version, CUDA, OpenMP, CPU SIMD dispatch."""
    from nm_optim import __version__

    info: dict[str, Any] = {
        "version": __version__,
        "extension": _C is not None,
        "cuda_compiled": False,
        "cuda_archs": [],
        "cuda_reason": "",
        "openmp": False,
        "torch": torch.__version__,
    }
    if _C is None:
        info["extension_error"] = str(_C_IMPORT_ERROR)
        info["cuda_reason"] = "nm_optim._C is not built"
        return info
    native = dict(_C.build_info())
    archs = native.pop("cuda_archs", "")
    info.update(native)
    info["cuda_archs"] = [a for a in archs.split(",") if a]
    info["cuda_devices"] = _C.cuda_device_count() if info["cuda_compiled"] else 0
    return info


def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    """TRITON_INTERPRET=1: Triton runs kernels on CPU tensors in its interpreter (for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available_backends(device: str | torch.device = "cpu") -> list[str]:
    """The backend names usable for tensors on `device` on this machine.

    - "reference": pure PyTorch, any device, also float64 (the oracle).
    - "cpu": the compiled OpenMP/SIMD kernel, CPU tensors.
    - "cuda": the compiled CUDA kernel, CUDA tensors, when built with nvcc and a GPU is present.
    - "triton": the Triton kernel (needs `triton`), CUDA tensors; CPU tensors too when
      TRITON_INTERPRET=1 (Triton's interpreter: slow, for testing).
    """
    device = torch.device(device)
    names = ["reference"]
    if device.type == "cpu" and _C is not None:
        names.append("cpu")
    if (
        device.type == "cuda"
        and _C is not None
        and _C.build_info()["cuda_compiled"]
        and torch.cuda.is_available()
    ):
        names.append("cuda")
    if _triton_available() and (
        device.type == "cuda" and torch.cuda.is_available() or device.type == "cpu" and triton_interpreting()
    ):
        names.append("triton")
    return names


@functools.lru_cache(maxsize=None)
def require_backend(backend: str, device: torch.device) -> None:
    """Raise a clear error if `backend` cannot run tensors on `device` here."""
    if backend not in BACKENDS:
        raise ValueError(f"Invalid backend: {backend!r}; expected 'auto' or one of {BACKENDS}")
    if backend == "reference":
        return
    if backend == "triton":
        if not _triton_available():
            raise ImportError("backend='triton' needs Triton: `pip install triton` (or nm_optim[triton])")
        if device.type == "cpu" and not triton_interpreting():
            raise ValueError(
                "backend='triton' runs CUDA tensors; CPU tensors only in Triton's interpreter "
                "(set TRITON_INTERPRET=1 before starting Python)"
            )
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"backend='triton' runs CUDA tensors, got a tensor on {device}")
        return
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend='cpu' runs CPU tensors only, got a tensor on {device}")
    if backend == "cuda" and device.type != "cuda":
        raise ValueError(f"backend='cuda' runs CUDA tensors only, got a tensor on {device}")
    mod = extension()
    if backend == "cuda" and not mod.build_info()["cuda_compiled"]:
        raise RuntimeError(
            "backend='cuda' needs nm_optim._C built with CUDA "
            f"({mod.build_info()['cuda_reason']}); reinstall with nvcc on PATH "
            "(NM_OPTIM_CUDA=1 makes a missing nvcc a build error)"
        )


@functools.lru_cache(maxsize=None)
def default_backend(device: torch.device) -> str:
    """What backend='auto' picks for tensors on `device`: the fastest available."""
    names = available_backends(device)
    for name in ("cuda", "cpu"):
        if name in names:
            return name
    return "reference"
