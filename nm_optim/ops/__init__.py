"""The op and its backends: everything between ``nm_optim.SGD.step()`` and the kernels.

    op.py         torch.ops.nm_optim.sgd_step_: schema, implementation, checking fake
    args.py       StepArgs: the op's arguments after the tensor lists, unpacked once
    registry.py   the backends, what each runs and where; backend="auto"
    reference.py  the oracle in plain PyTorch (float64-capable)
    native.py     the "cpu" and "cuda" backends (nm_optim._C, built from csrc/)
    triton/       the "triton" backend (kernels.py, launch.py)
    plan.py       tiles, the GPU statistics plan shared by CUDA and Triton, address tables
    layout.py     dtypes, the [d0, d1, rest] view, which tensors the kernels can stream
    extension.py  loading nm_optim._C, build_info()
"""

from nm_optim.ops.args import StepArgs
from nm_optim.ops.extension import build_info
from nm_optim.ops.op import sgd_step_
from nm_optim.ops.reference import sgd_step_reference
from nm_optim.ops.registry import available_backends, default_backend, require_backend, resolve_backend

__all__ = [
    "StepArgs",
    "available_backends",
    "build_info",
    "default_backend",
    "require_backend",
    "resolve_backend",
    "sgd_step_",
    "sgd_step_reference",
]
