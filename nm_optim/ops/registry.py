"""The backends of the op, in one table: what each one runs, where it can run, and what
backend="auto" picks. This is the one place that decides what runs where.

    "reference"  nm_optim/ops/reference.py: pure PyTorch, any device, float64 too; the oracle
    "cpu"        nm_optim._C on CPU tensors (csrc/cpu: OpenMP + SIMD)
    "cuda"       nm_optim._C on CUDA tensors (csrc/cuda)
    "triton"     nm_optim/ops/triton on CUDA tensors (CPU tensors under TRITON_INTERPRET=1)

A backend's step function is ``step(bucket: Bucket, args: StepArgs) -> None`` (ops/args.py),
imported on first use, so that importing nm_optim never
needs the compiled module, a GPU or Triton.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from nm_optim._lazy import assume_constant_result, disable
from nm_optim.names import BACKENDS
from nm_optim.ops.extension import cuda_compiled, extension


def triton_interpreting() -> bool:
    """TRITON_INTERPRET=1: Triton runs kernels on CPU tensors in its interpreter (for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _require_reference(device: torch.device) -> None:
    return None


def _require_cpu(device: torch.device) -> None:
    if device.type != "cpu":
        raise ValueError(f"backend='cpu' runs CPU tensors only, got a tensor on {device}")
    extension()


def _require_cuda(device: torch.device) -> None:
    if device.type != "cuda":
        raise ValueError(f"backend='cuda' runs CUDA tensors only, got a tensor on {device}")
    mod = extension()
    if not mod.build_info()["cuda_compiled"]:
        raise RuntimeError(
            "backend='cuda' needs nm_optim._C built with CUDA "
            f"({mod.build_info()['cuda_reason']}); reinstall with nvcc on PATH "
            "(NM_OPTIM_CUDA=1 makes a missing nvcc a build error)"
        )
    if torch.cuda.is_available() and not _cuda_runtime_sees_devices():
        raise RuntimeError(f"backend='cuda': {_NO_RUNTIME_DEVICE}")


_NO_RUNTIME_DEVICE = (
    "torch sees a GPU but nm_optim._C's CUDA runtime (linked statically, CUDA 13) finds none: the "
    "driver is likely older than the runtime needs (CUDA 13: driver >= 580); update the driver, or "
    "use backend='triton' or 'reference'"
)


@functools.lru_cache(maxsize=None)
def _cuda_runtime_sees_devices() -> bool:
    """Probed once: whether the compiled module's own CUDA runtime can use the GPUs torch sees."""
    return extension().cuda_device_count() > 0


def _require_triton(device: torch.device) -> None:
    if not _triton_installed():
        raise ImportError("backend='triton' needs Triton: `pip install triton` (or nm_optim[triton])")
    if device.type == "cpu" and not triton_interpreting():
        raise ValueError(
            "backend='triton' runs CUDA tensors; CPU tensors only in Triton's interpreter "
            "(set TRITON_INTERPRET=1 before starting Python)"
        )
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"backend='triton' runs CUDA tensors, got a tensor on {device}")


def _has_extension() -> bool:
    try:
        extension()
    except ImportError:
        return False
    return True


def _cuda_usable(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_available()


@dataclass(frozen=True)
class Backend:
    """One implementation of the op. `require(device)` raises a clear error when it cannot run
    tensors on `device` here; `usable(device)` says whether it can (without raising); `step` is
    "module:function", imported on first use."""

    name: str
    step_path: str
    require: Callable[[torch.device], None]
    usable: Callable[[torch.device], bool]

    @functools.cached_property
    def step(self) -> Callable:
        module, function = self.step_path.split(":")
        return getattr(importlib.import_module(module), function)


REGISTRY: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("reference", "nm_optim.ops.reference:step_reference", _require_reference, lambda d: True),
        Backend("cpu", "nm_optim.ops.native:sgd_step_native", _require_cpu,
                lambda d: d.type == "cpu" and _has_extension()),
        Backend("cuda", "nm_optim.ops.native:sgd_step_native", _require_cuda,
                lambda d: _cuda_usable(d) and cuda_compiled() and _cuda_runtime_sees_devices()),
        Backend("triton", "nm_optim.ops.triton.launch:sgd_step_triton", _require_triton,
                lambda d: _triton_installed() and (_cuda_usable(d) or d.type == "cpu" and triton_interpreting())),
    )
}
assert tuple(REGISTRY) == BACKENDS, "nm_optim.names.BACKENDS and the registry list the same backends"
# Fastest first: what backend="auto" picks among the usable ones. Triton only on CUDA devices
# (on CPU tensors it is Triton's interpreter, for tests).
AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}


def available_backends(device: str | torch.device = "cpu") -> list[str]:
    """The backend names usable for tensors on `device` on this machine.

    - "reference": pure PyTorch, any device, also float64 (the oracle).
    - "cpu": the compiled OpenMP/SIMD kernel, CPU tensors.
    - "cuda": the compiled CUDA kernel, CUDA tensors, when built with nvcc and a GPU is present.
    - "triton": the Triton kernel (needs `triton`), CUDA tensors; CPU tensors too when
      TRITON_INTERPRET=1 (Triton's interpreter: slow, for testing).
    """
    device = torch.device(device)
    return [name for name, b in REGISTRY.items() if b.usable(device)]


@functools.lru_cache(maxsize=None)
def require_backend(backend: str, device: torch.device) -> None:
    """Raise a clear error if `backend` cannot run tensors on `device` here."""
    if backend not in REGISTRY:
        raise ValueError(f"Invalid backend: {backend!r}; expected 'auto' or one of {BACKENDS}")
    REGISTRY[backend].require(device)


@functools.lru_cache(maxsize=None)
def default_backend(device: torch.device) -> str:
    """What backend='auto' picks for tensors on `device`: the fastest available. When CUDA
    tensors cannot use the compiled kernel although it was built, says why, once."""
    names = available_backends(device)
    choice = next(name for name in AUTO_ORDER.get(device.type, ("reference",)) if name in names)
    if device.type == "cuda" and choice != "cuda" and cuda_compiled() and torch.cuda.is_available():
        warnings.warn(f"nm_optim: backend='auto' uses {choice!r} on {device}: {_NO_RUNTIME_DEVICE}",
                      RuntimeWarning, stacklevel=2)
    return choice


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that runs tensors on `device` for a param group's `backend` setting.

    Under torch.compile the name is a constant of the graph, found on the host while Dynamo
    traces the step (nm_optim.SGD calls this there), so the compiled step neither traces the
    registry's lookups nor guards on them."""
    if torch.compiler.is_compiling():
        name = _backend_at_trace_time(backend, device)
        if name is not None:
            return name
        _resolve_eagerly(backend, device)  # raises the error eager code raises
    return _resolve(backend, device)


def _resolve(backend: str, device: torch.device) -> str:
    if backend == "auto":
        return default_backend(device)
    require_backend(backend, device)
    return backend


# The answer depends only on the two arguments (Dynamo guards them: the param group's setting and
# the params' device are read by the traced step) and on what this process can run, which does
# not change while it lives, so it may be assumed constant.
@assume_constant_result
def _backend_at_trace_time(backend: str, device: torch.device) -> str | None:
    try:
        return _resolve(backend, device)
    except Exception:  # raised again by _resolve_eagerly, with its own type and message
        return None


# Errors: an exception raised inside assume_constant_result reaches the user as an internal
# Dynamo error; raised by eager code (a graph break, on this failing path only) it is the one
# eager code raises.
_resolve_eagerly = disable(_resolve)


def backend_step(name: str) -> Callable:
    """The step function of backend `name`."""
    return REGISTRY[name].step
