"""What torch.optim.SGD's step would refuse, refused before anything is written, with torch's
exception type and message and the parameter's name: sparse gradients, dtypes the kernels do not
step, differentiable=True, and momentum buffers torch's ops would reject."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from nm_optim._lazy import disable

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_differentiable(differentiable: Any) -> None:
    if differentiable:
        raise NotImplementedError(
            "nm_optim.SGD does not support differentiable=True: its kernels update params in "
            "place outside autograd; use torch.optim.SGD(..., differentiable=True) for that"
        )


def param_name(group: dict[str, Any], i: int, p: Tensor) -> str:
    names = group.get("param_names")
    if names is not None and i < len(names):
        return repr(names[i])
    return f"#{i} of its param group (shape {tuple(p.shape)})"


def check_param(group: dict[str, Any], i: int, p: Tensor, g: Tensor) -> None:
    if g.is_sparse:
        raise RuntimeError(
            f"nm_optim.SGD does not support sparse gradients; parameter {param_name(group, i, p)} "
            "has one (use dense gradients, e.g. nn.Embedding(sparse=False))"
        )
    if p.dtype not in DTYPES:
        raise TypeError(
            f"nm_optim.SGD supports float32, float16, bfloat16 and float64 parameters; parameter "
            f"{param_name(group, i, p)} is {p.dtype} (complex parameters are not supported: "
            "use torch.view_as_real on a real parameter instead)"
        )


def buffer_ok(p: Tensor, buf: Any) -> bool:
    """Whether torch.optim.SGD's ops surely accept `buf` as `p`'s momentum buffer: a strided tensor
    of p's shape and device, of p's dtype or another floating one (torch's in-place ops compute a
    float64 buffer with a float32 param in float64: the reference follows them)."""
    return (isinstance(buf, Tensor) and buf.layout == torch.strided and buf.shape == p.shape
            and buf.device == p.device and (buf.dtype == p.dtype or buf.dtype.is_floating_point))


def _broadcast_error(out: Sequence[int], other: Sequence[int], in_place: bool) -> tuple[str | None, list[int]]:
    """torch's message for ``out.add_(other)`` (in_place) or ``out.add(other)`` when the shapes do
    not fit (ATen's infer_size and TensorIterator's in-place check), or None; and the shape of
    the result."""
    ndim = max(len(out), len(other))
    shape = [0] * ndim
    for i in reversed(range(ndim)):  # from the last dim, as infer_size
        a = out[len(out) - ndim + i] if len(out) - ndim + i >= 0 else 1
        b = other[len(other) - ndim + i] if len(other) - ndim + i >= 0 else 1
        if a != b and a != 1 and b != 1:
            return f"The size of tensor a ({a}) must match the size of tensor b ({b}) at non-singleton dimension {i}", []
        shape[i] = b if a == 1 else a
    if in_place and shape != list(out):
        return f"output with shape {list(out)} doesn't match the broadcast shape {shape}", shape
    return None, shape


def buffer_error(group: dict[str, Any], i: int, p: Tensor, buf: Any) -> Exception | None:
    """The exception torch.optim.SGD's step raises for param `i` of `group` with momentum buffer
    `buf` (torch/optim/sgd.py, _single_tensor_sgd: ``buf.mul_(momentum).add_(grad, alpha=1 -
    dampening)``, ``grad.add(buf, alpha=momentum)`` if nesterov, ``param.add_(grad, alpha=-lr)``),
    with torch's type and message, naming the param; None if torch's ops accept it."""
    name = param_name(group, i, p)

    def error(kind: type, message: str) -> Exception:
        desc = (f"a {tuple(buf.shape)} {buf.dtype} tensor ({buf.layout}) on {buf.device}" if isinstance(buf, Tensor)
                else f"a {type(buf).__name__}")
        text = (f"momentum buffer of parameter {name}: {message} (the buffer is {desc}, the parameter a "
                f"{tuple(p.shape)} {p.dtype} tensor on {p.device}; nothing was stepped)")
        try:
            return kind(text)
        except Exception:  # an exception type with another constructor
            return RuntimeError(text)

    if not isinstance(buf, Tensor):
        return error(AttributeError, f"'{type(buf).__name__}' object has no attribute 'mul_'")
    mom, damp, nesterov = float(group["momentum"]), float(group["dampening"]), bool(group["nesterov"])
    lr = group["lr"]
    lr = float(lr) if not isinstance(lr, Tensor) else 1.0
    if buf.layout != torch.strided:  # torch's ops on a copy (the error path only)
        try:
            v, d, q = buf.detach().clone(), torch.zeros_like(p.detach()), p.detach().clone()
            v.mul_(mom).add_(d, alpha=1 - damp)
            q.add_(d.add(v, alpha=mom) if nesterov else v, alpha=-lr)
        except Exception as e:
            return error(type(e), str(e))
        return None
    # Shapes as ATen checks them; dtypes and devices by torch's own ops on one-element stand-ins
    # (dimensioned, so that they promote as the real tensors do), op by op in torch's order.
    v1 = torch.zeros(1, dtype=buf.dtype, device=buf.device)
    d1 = torch.zeros(1, dtype=p.dtype, device=p.device)
    try:
        v1.mul_(mom)
    except Exception as e:
        return error(type(e), str(e))
    message, _ = _broadcast_error(buf.shape, p.shape, in_place=True)
    if message:
        return error(RuntimeError, message)
    try:
        v1.add_(d1, alpha=1 - damp)
        u1, u_shape = v1, list(buf.shape)
        if nesterov:
            message, u_shape = _broadcast_error(p.shape, buf.shape, in_place=False)
            if message:
                return error(RuntimeError, message)
            u1 = d1.add(v1, alpha=mom)
        message, _ = _broadcast_error(p.shape, u_shape, in_place=True)
        if message:
            return error(RuntimeError, message)
        d1.add_(u1, alpha=-lr)
    except Exception as e:
        return error(type(e), str(e))
    return None


# Eager code: under torch.compile a graph break on this failing path only (the stand-in ops and
# the exception are not traced).
@disable
def raise_buffer_error(group: dict[str, Any], i: int, p: Tensor, buf: Any) -> None:
    error = buffer_error(group, i, p, buf)
    if error is not None:
        raise error
