"""torch.compiler's markers, applied without importing torch._dynamo when nm_optim is imported.

``torch.compiler.disable`` and ``torch.compiler.assume_constant_result`` import ``torch._dynamo``
the moment they decorate a function (torch/compiler/__init__.py): about a second, and Triton with
it where Triton is installed, paid by every ``import nm_optim`` although most programs never
compile. The two functions here mark a function the same way at no import cost:

- ``disable(fn)``: Dynamo never traces into ``fn`` (a graph break at the call, which runs
  eagerly) nor compiles the frames ``fn`` calls, as with ``torch.compiler.disable``. Dynamo's
  tracer recognizes a disabled function by its ``_torchdynamo_disable`` attribute
  (torch/_dynamo/variables/functions.py), which the wrapper carries from the start; the real
  ``torch.compiler.disable(fn)`` that runs ``fn`` with Dynamo's frame hook off is made at the
  first call after ``torch._dynamo`` was imported. Before that no frame hook can be installed
  (``torch.compile`` imports ``torch._dynamo``), so calling ``fn`` directly is the same.
- ``assume_constant_result(fn)``: sets the attribute that ``torch._dynamo.assume_constant_result``
  sets (torch/_dynamo/decorators.py) and nothing else.

tests/test_import.py checks that these carry the markers torch's own decorators set, and
tests/test_compile.py that a compiled step still has the op in its graph with the same breaks.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])


def disable(fn: F) -> F:
    """``torch.compiler.disable(fn)`` (recursive), without importing ``torch._dynamo`` now."""
    eager: list[Callable[..., Any]] = []  # torch.compiler.disable(fn), made once Dynamo is imported

    @functools.wraps(fn)
    def disabled(*args: Any, **kwargs: Any) -> Any:
        if eager:
            return eager[0](*args, **kwargs)
        if "torch._dynamo" not in sys.modules:
            return fn(*args, **kwargs)
        eager.append(torch.compiler.disable(fn))
        return eager[0](*args, **kwargs)

    # What Dynamo's tracer reads (the same attributes torch._dynamo.disable sets): a call of
    # `disabled` in a traced frame is a graph break and runs eagerly; guards are on fn's code.
    disabled._torchdynamo_disable = True  # type: ignore[attr-defined]
    disabled._torchdynamo_disable_msg = None  # type: ignore[attr-defined]
    disabled._torchdynamo_disable_recursive = True  # type: ignore[attr-defined]
    disabled._torchdynamo_orig_callable = fn  # type: ignore[attr-defined]
    disabled._torchdynamo_wrapper_id = id(disabled)  # type: ignore[attr-defined]
    return disabled  # type: ignore[return-value]


def _skip_wrapper_frames() -> None:
    """Dynamo's frame hook must not compile the frame of ``disabled`` itself (called eagerly at a
    graph break, under the hook) any more than the frame of torch's own wrapper, which lives in
    torch/_dynamo and is skipped as such. One code object serves every wrapper: it is marked as
    torch._dynamo.eval_frame.skip_code marks a code object, through the same C function, which
    torch loads with torch._C (no torch._dynamo import)."""
    try:
        from torch._C._dynamo.eval_frame import _FrameAction, _FrameExecStrategy, set_code_exec_strategy
    except ImportError:  # a torch without it: the wrapper's frame is traced and breaks at the call
        return
    code = disable(lambda: None).__code__
    set_code_exec_strategy(code, _FrameExecStrategy(_FrameAction.SKIP, _FrameAction.DEFAULT))


_skip_wrapper_frames()


def assume_constant_result(fn: F) -> F:
    """``torch.compiler.assume_constant_result(fn)`` without importing ``torch._dynamo``: Dynamo
    calls ``fn`` while tracing and uses its result as a constant of the graph."""
    fn._dynamo_marked_constant = True  # type: ignore[attr-defined]
    return fn
