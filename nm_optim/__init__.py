"""nm_optim: a fused SGD for PyTorch that measures the Neural Mechanics conservation laws.

    import nm_optim
    opt = nm_optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)

`nm_optim.SGD` is a drop-in torch.optim.SGD (same semantics, state dict and hooks) whose step is
one fused kernel per (param group, device, dtype). `available_backends()` and `build_info()` say
what this build and machine can run.
"""

from types import ModuleType
from typing import TYPE_CHECKING

from nm_optim._version import __version__
from nm_optim.names import AXES, STAT_NAMES
from nm_optim.ops import available_backends, build_info, sgd_step_reference
from nm_optim.record import Record, RecordError, load_record
from nm_optim.recorder import Recorder
from nm_optim.sgd import SGD
from nm_optim.symmetry import Rescale, Scale, Symmetry, Translation, find_symmetries, verify_symmetries  # noqa: E402
from nm_optim import models  # noqa: E402
from nm_optim import theory  # noqa: E402  (numpy only; nm_optim.plot imports matplotlib lazily)
from nm_optim.tracks import Track  # noqa: E402

if TYPE_CHECKING:  # what __getattr__ below imports on first use, declared for type checkers
    from nm_optim import app, plot  # noqa: F401

__all__ = [
    "AXES",
    "Record",
    "Recorder",
    "RecordError",
    "Rescale",
    "SGD",
    "STAT_NAMES",
    "Scale",
    "Symmetry",
    "Track",
    "Translation",
    "available_backends",
    "build_info",
    "find_symmetries",
    "load_record",
    "models",
    "sgd_step_reference",
    "theory",
    "verify_symmetries",
    "__version__",
]


def __getattr__(name: str) -> ModuleType:
    """Documented submodules that import optional dependencies lazily are reachable as
    attributes (``nm_optim.plot.figure(...)`` after ``import nm_optim``)."""
    if name in ("plot", "app", "ops"):
        import importlib

        return importlib.import_module(f"nm_optim.{name}")
    raise AttributeError(f"module 'nm_optim' has no attribute {name!r}")
