"""Loading the compiled kernels (nm_optim._C, built from csrc/ by CMake) and how they were built.

Import never needs the compiled module, nvcc or a GPU: a missing piece becomes an error only when
a backend that needs it is asked for (nm_optim/ops/registry.py).
"""

from __future__ import annotations

from typing import Any

import torch

try:
    from nm_optim import _C  # type: ignore[attr-defined]

    _C_IMPORT_ERROR: BaseException | None = None
except ImportError as e:  # a source checkout without a build, or a broken build
    _C = None
    _C_IMPORT_ERROR = e

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
        info["extension_error"] = str(_C_IMPORT_ERROR)
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
