"""Loading the compiled kernels (nm_optim._C, built from csrc/ by CMake) and how they were built.

Import never needs the compiled module, nvcc or a GPU: a missing piece becomes an error only when
a backend that needs it is asked for (nm_optim/ops/registry.py). A missing or broken module is
said once, at first use (the first step or backend query), with the error that loading it raised
and how to build it: backend="auto" then runs the pure-PyTorch reference, several times slower.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from typing import Any

import torch


def _load() -> tuple[Any, BaseException | None]:
    # importlib, not `from nm_optim import _C`: nm_optim is still initializing here, and for a
    # missing submodule the `from` form reports "cannot import name '_C' from partially
    # initialized module 'nm_optim' (most likely due to a circular import)" instead of the cause.
    try:
        return importlib.import_module("nm_optim._C"), None
    except ImportError as e:  # a source checkout without a build, or a broken build
        return None, e


_C, _C_IMPORT_ERROR = _load()

_BUILD_HINT = (
    "build it with `pip install -e .` (or `pip install .`) from the nm_optim source tree; "
    "the 'reference' backend works without it"
)
_warned = False


def _describe(error: BaseException | None) -> str:
    return f"{type(error).__name__}: {error}" if error is not None else "unknown error"


def _outside_package_stacklevel() -> int:
    """The warnings.warn stacklevel, for a warning raised by this function's caller, of the first
    frame outside nm_optim and torch (the user's `opt.step()`), or of the outermost frame."""
    roots = tuple(os.path.dirname(m.__file__ or "") + os.sep for m in (sys.modules["nm_optim"], torch))
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(roots):
        frame, level = frame.f_back, level + 1
    return level


def extension() -> Any:
    """The compiled module, or an ImportError that says how to build it."""
    if _C is None:
        _warn_once()
        raise ImportError(f"nm_optim._C is not available ({_describe(_C_IMPORT_ERROR)}); {_BUILD_HINT}")
    return _C


def _warn_once() -> None:
    """The first use without the compiled module says so (a RuntimeWarning, once per process):
    the steps still run, on the reference backend, so nothing else would tell."""
    global _warned
    if _warned:
        return
    _warned = True
    warnings.warn(
        f"nm_optim: the compiled kernels nm_optim._C cannot be loaded ({_describe(_C_IMPORT_ERROR)}), "
        "so backend='auto' runs the pure-PyTorch 'reference' backend, several times slower; "
        + _BUILD_HINT, RuntimeWarning, stacklevel=_outside_package_stacklevel())


def build_info() -> dict[str, Any]:
    """How this copy of nm_optim was built: version, CUDA, OpenMP, CPU SIMD dispatch."""
    from nm_optim._version import __version__

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
        info["extension_error"] = _describe(_C_IMPORT_ERROR)
        info["cuda_reason"] = "nm_optim._C is not built"
        return info
    native = dict(_C.build_info())
    archs = native.pop("cuda_archs", "")
    info.update(native)
    info["cuda_archs"] = [a for a in archs.split(",") if a]
    info["cuda_devices"] = _C.cuda_device_count() if info["cuda_compiled"] else 0
    return info


def cuda_compiled() -> bool:
    """Whether nm_optim._C was built with the CUDA kernels (nvcc was found at build time)."""
    return _C is not None and bool(_C.build_info()["cuda_compiled"])
