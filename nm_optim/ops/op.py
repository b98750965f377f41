"""The one op every backend goes through: ``torch.ops.nm_optim.sgd_step_``.

Registered with torch.library so torch.compile and CUDA graphs see one opaque op that mutates the
params and momentum buffers in place, and with a GradScaler scale the grads too (unscaled and
written back, as torch's fused SGD does; the schema says so, so the dispatcher bumps their version
counters), with a fake implementation that checks its arguments for tracing. The arguments after
the four tensor lists are unpacked once into a StepArgs (nm_optim/ops/args.py) and the backend
named by `backend` runs them (nm_optim/ops/registry.py).

All params of one call share a device and a dtype (nm_optim.SGD buckets them). A tensor that the
flat-memory kernels cannot stream is stepped by the reference instead (nm_optim/ops/layout.py).

The per-step host work is cached where it depends only on tensor metadata (ops/plan.py,
TensorGuard), and nm_optim.SGD calls the implementation without the dispatcher where the
dispatcher would do nothing else (`sgd_step`): with 1000 small tensors both are most of a step.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from itertools import repeat
from operator import attrgetter, eq

import torch
from torch import Tensor

from nm_optim.names import STAT_NAMES, SUM_MASKS
from nm_optim.ops.args import FIELDS, Bucket, StepArgs
from nm_optim.ops.layout import (
    DTYPE_CODES,
    StorageView,
    group_counts,
    kernel_layout_ok,
    storage_view,
    uniform_dense,
)
from nm_optim._lazy import disable
from nm_optim.ops.plan import StatsLayout, TensorGuard, owner_guard, rows_needed, stats_layout, vouched
from nm_optim.ops.registry import backend_step, require_backend

SCHEMA = (
    "sgd_step_(Tensor(a!)[] params, Tensor(d!)[] grads, Tensor(b!)[] momentum_buffers, bool[] is_first, "
    "float lr, Tensor? lr_tensor, float weight_decay, float momentum, float dampening, "
    "bool nesterov, bool maximize, Tensor? grad_scale, Tensor? found_inf, str backend, "
    "Tensor(c!)? stats=None, int[] stats_offsets=[], int[] stats_sums=[], int[] stats_blocks=[]) -> ()"
)

_lib = torch.library.Library("nm_optim", "DEF")  # noqa: TOR901 (the op is defined once, here)
_lib.define(SCHEMA)


def _check_lists(params: Sequence[Tensor], grads: Sequence[Tensor], momentum_buffers: Sequence[Tensor],
                 is_first: Sequence[bool], args: StepArgs, numels: tuple[int, ...] | None = None
                 ) -> StatsLayout | None:
    """The list lengths and the statistics rows, checked before any kernel reads a pointer.
    `numels` and the result: see _check_stats."""
    n = len(params)
    # torch._check only on failure: it costs microseconds per call, and these hold on every step.
    if len(grads) != n:
        torch._check(False, lambda: f"sgd_step_: got {n} params but {len(grads)} grads")
    if args.has_momentum and (len(momentum_buffers) != n or len(is_first) != n):
        torch._check(
            False,
            lambda: "sgd_step_: momentum != 0 needs one momentum buffer and one is_first flag per param, "
            f"got {n} params, {len(momentum_buffers)} buffers, {len(is_first)} flags",
        )
    if args.stats_sums:
        _check_sums(n, args.stats_sums)
    if args.stats_blocks:
        _check_blocks(params, args.stats_blocks)
    if args.stats is None:
        return None
    return _check_stats(params, args.stats, args.stats_offsets, numels, args.stats_sums, args.stats_blocks)


_SUM_MASK_SET = frozenset(SUM_MASKS)


def _check_sums(n: int, sums: Sequence[int]) -> None:
    """stats_sums: empty (all 9 for every param) or one mask per param, each one of
    names.SUM_MASKS (the sets the kernels have variants for)."""
    # One C-level pass on every step; the loop runs only to name the culprit.
    if len(sums) == n and _SUM_MASK_SET.issuperset(sums):
        return
    if len(sums) != n:
        torch._check(False, lambda: f"sgd_step_: stats_sums needs one mask per param, got {len(sums)} for {n}")
    for i, m in enumerate(sums):
        if m not in _SUM_MASK_SET:
            torch._check(False, lambda: f"sgd_step_: stats_sums[{i}] (param {i}) is {m!r}, not one of the sum sets' "
                                        f"masks {SUM_MASKS} (nm_optim.names.SUM_MASKS)")


def _check_blocks(params: Sequence[Tensor], blocks: Sequence[int]) -> None:
    """stats_blocks: empty (1 for every param) or one column block per param, each >= 1 and, for
    a param of 2 or more dims, a divisor of its size(1) (a block of whole columns)."""
    n = len(params)
    if len(blocks) != n:
        torch._check(False, lambda: f"sgd_step_: stats_blocks needs one block per param, got {len(blocks)} for {n}")
    for i, b in enumerate(blocks):
        if b == 1:
            continue
        p = params[i]
        if b < 1 or p.dim() < 2 or p.shape[1] % b:
            torch._check(False, lambda: f"sgd_step_: stats_blocks[{i}] (param {i}, shape {tuple(p.shape)}) is {b}: "
                                        "a column block is >= 1 and divides the param's size(1)")


def _step(params: Sequence[Tensor], grads: Sequence[Tensor], momentum_buffers: Sequence[Tensor],
          is_first: Sequence[bool], rest: tuple, guard: TensorGuard | None) -> None:
    """The op's implementation. `guard`: a TensorGuard that holds for params, grads and
    momentum_buffers now (from the caller, ops/plan.py `vouched`), or None: then the op's own
    per-bucket guard finds the metadata checks' result when nothing changed since the last call."""
    args = StepArgs(*rest)
    if not params:
        _check_lists(params, grads, momentum_buffers, is_first, args)
        return
    dtype = params[0].dtype
    native = args.backend != "reference" and dtype in DTYPE_CODES
    bufs = momentum_buffers if args.has_momentum else ()
    # Metadata only, nothing read through a pointer: when every tensor is dense on params[0]'s
    # device (the common case), the checks below compare lists against the bucket's cached layout.
    numels = _dense_numels(params, grads, bufs, dtype, guard) if native else None
    layout = _check_lists(params, grads, momentum_buffers, is_first, args, numels)
    if not (layout.tracked if layout is not None else args.with_stats):
        layout = None
        if args.stats_offsets:
            args = args.subset(())
    if not native:
        backend_step("reference")(Bucket(params, grads, momentum_buffers, is_first), args)
        return
    device = params[0].device
    require_backend(args.backend, device)
    step = backend_step(args.backend)
    bucket = Bucket(params, grads, momentum_buffers, is_first, numels, stats_layout=layout)
    if numels is not None:
        step(bucket, args)
        return
    # Rare: some tensor is not contiguous. Dense tensors in another dimension order go to the
    # kernel (through their storage view when tracked); anything else to the reference.
    ok = list(map(kernel_layout_ok, params, grads, bufs if args.has_momentum else repeat(None),
                  repeat(dtype), repeat(device)))
    permuted = [i for i, good in enumerate(ok)
                if good and args.with_stats and max(args.offsets_of(i)) >= 0 and not params[i].is_contiguous()]
    if permuted:
        _step_permuted(step, bucket.subset(permuted, args.has_momentum), args.subset(permuted))
        for i in permuted:
            ok[i] = None
    for want in (True, False):
        idx = [i for i, good in enumerate(ok) if good is want]
        if idx:
            run = step if want else backend_step("reference")
            run(bucket.subset(idx, args.has_momentum), args.subset(idx))


def _dense_numels(params: Sequence[Tensor], grads: Sequence[Tensor], bufs: Sequence[Tensor], dtype: torch.dtype,
                  guard: TensorGuard | None) -> tuple[int, ...] | None:
    """uniform_dense (ops/layout.py): the element counts when every tensor is contiguous, of
    `dtype`, on params[0]'s device, with its param's element count; else None. A function of the
    tensors' metadata only, so it is kept with a TensorGuard (`guard`, or the bucket's own) and
    computed again only when the metadata changed."""
    def derive() -> tuple[int, ...] | None:
        return uniform_dense(params, grads, bufs, dtype, params[0].get_device())

    if guard is None:
        return owner_guard(params[0], params, grads, bufs, derive)
    facts = guard.facts
    if "dense" not in facts:
        facts["dense"] = derive()
    return facts["dense"]  # type: ignore[return-value]


# The implementation runs as eager code even inside torch.compile (the compiled graph calls the op
# as one node, and the dispatcher calls this function): Dynamo must not try to compile its frames
# (tables, raw pointers, the pybind call), which would only add graph breaks and recompiles.
@disable
def _sgd_step_impl(params: Sequence[Tensor], grads: Sequence[Tensor], momentum_buffers: Sequence[Tensor],
                   is_first: Sequence[bool], *rest) -> None:
    _step(params, grads, momentum_buffers, is_first, rest, None)


# The same, called by sgd_step without the dispatcher (eager code, as above).
_step_eagerly = disable(_step)


def sgd_step(params: Sequence[Tensor], grads: Sequence[Tensor], momentum_buffers: Sequence[Tensor],
             is_first: Sequence[bool], *rest) -> None:
    """``torch.ops.nm_optim.sgd_step_`` with the same arguments, for nm_optim.SGD's step: when
    the dispatcher would only hand the arguments to the implementation, the implementation is
    called directly, else the op.

    Through the dispatcher a call converts every tensor of the lists to C++ and back to Python
    (about 0.5 ms for 1000 params with grads and buffers: a third of a step of 1000 small
    tensors). The dispatcher runs nothing else for this op where (ops/plan.py, TensorGuard, for
    the lists; checked here for the rest): every tensor is a plain Tensor or Parameter whose
    dispatch keys are those of a dense CPU or CUDA tensor (no subclass, Python key, sparse,
    conjugate, inference, functionalization or vmap wrapper), no torch function or dispatch mode
    is active, no functorch transform, no JIT trace, no profiler (which records the op), and grad
    mode is off (autograd's fallback for ops without an autograd kernel then does nothing). Its
    in-place semantics are the implementation's own: it bumps the version counters of what it
    writes, the dispatcher bumps none for this op (tests/test_op.py). Only for lists that
    nm_optim.SGD checked against a guard just before (ops/plan.py, `vouch`); under torch.compile
    the op, always (Dynamo traces through this function to the op)."""
    if torch.compiler.is_compiling():
        return sgd_step_(params, grads, momentum_buffers, is_first, *rest)
    guard = vouched(params, grads, momentum_buffers)
    if guard is None or not _dispatch_free(guard, params, grads, momentum_buffers, rest):
        return sgd_step_(params, grads, momentum_buffers, is_first, *rest)
    if _frame_callback is not None and _frame_callback() is None:
        # No Dynamo frame hook is set (outside torch.compile's regions): the disabled wrapper
        # would only replace no hook by none, and costs microseconds a call.
        _step(params, grads, momentum_buffers, is_first, rest, guard)
    else:
        _step_eagerly(params, grads, momentum_buffers, is_first, rest, guard)


try:  # reads the hook Dynamo sets for the frames of compiled code; part of torch._C
    from torch._C._dynamo.eval_frame import get_eval_frame_callback as _frame_callback
except ImportError:  # a torch without it: always through the disabled wrapper
    _frame_callback = None


# The optional tensors among the arguments after the lists (StepArgs' fields).
_OPTIONAL_TENSORS = tuple(FIELDS.index(f) for f in ("lr_tensor", "grad_scale", "found_inf", "stats"))
_PLAIN_TYPES = (Tensor, torch.nn.Parameter)
_plain_keys: dict[str, int] = {}
# Thread-local dispatch keys that leave the dispatch of a dense tensor's op as it is: BackendSelect
# and ADInplaceOrView are in the default included set (c10/core/impl/LocalDispatchKeySet.h).
_DEFAULT_INCLUDED = (torch._C.DispatchKeySet(torch._C.DispatchKey.BackendSelect)
                     .add(torch._C.DispatchKey.ADInplaceOrView).raw_repr())


def _plain(t: object) -> bool:
    """Whether `t` is a Tensor or Parameter with the dispatch keys of a dense CPU or CUDA tensor."""
    if type(t) not in _PLAIN_TYPES:
        return False
    kind = t.device.type  # type: ignore[attr-defined]
    if kind not in ("cpu", "cuda"):
        return False
    keys = _plain_keys.get(kind)
    if keys is None:
        keys = _plain_keys[kind] = torch._C._dispatch_keys(torch.empty(0, device=kind)).raw_repr()
    return torch._C._dispatch_keys(t).raw_repr() == keys


def _dispatch_free(guard: TensorGuard, params: Sequence[Tensor], grads: Sequence[Tensor],
                   bufs: Sequence[Tensor], rest: tuple) -> bool:
    """Whether the dispatcher would call the implementation with these arguments and do nothing
    else (see sgd_step). `guard` holds for the lists."""
    facts = guard.facts
    plain = facts.get("plain")
    if plain is None:  # once per guard: a function of the guarded metadata (type and keys)
        plain = facts["plain"] = all(map(_plain, (*params, *grads, *bufs)))
    if not plain or torch.is_grad_enabled() or torch._C._is_torch_function_mode_enabled():
        return False
    if torch._C._len_torch_dispatch_stack() or torch._C._get_tracing_state() is not None:
        return False
    if torch.autograd._profiler_enabled():
        return False
    if torch._C._dispatch_tls_local_include_set().raw_repr() & ~_DEFAULT_INCLUDED:
        return False  # a functorch transform, the Python dispatcher, ...
    for i in _OPTIONAL_TENSORS:
        if i < len(rest) and rest[i] is not None and not _plain(rest[i]):
            return False
    return True


def _step_permuted(step, bucket: Bucket, args: StepArgs) -> None:
    """Dense tracked tensors whose memory is not in row-major order (channels_last, ``.t()``):
    the kernel steps their row-major storage views and reduces the views' groups into a
    temporary block, and each logical group is the sum of its view groups (ops/layout.py,
    StorageView). The update itself is element-wise, so it is the same in any order. The views
    keep their params' sums masks (args.stats_sums): a column the kernel leaves NaN in the
    temporary block sums to NaN."""
    views: list[StorageView] = [storage_view(p) for p in bucket.params]
    tmp_offsets: list[int] = []
    # (stats row, groups, tmp row, view groups, block): a "cols" track of column block b sums
    # the b consecutive logical columns of each group, after the view groups are folded.
    folds: list[tuple[int, int, int, int, int]] = []
    tmp_rows = 0
    for i, sv in enumerate(views):
        rows_at, cols_at, all_at = args.offsets_of(i)
        want = [-1, -1, -1]
        for at, src, n, b in ((rows_at, sv.rows_from, bucket.params[i].shape[0], 1),
                              (cols_at, sv.cols_from, bucket.params[i].shape[1] if bucket.params[i].dim() > 1 else 1,
                               args.block_of(i)),
                              (all_at, 2, 1, 1)):
            if at < 0:
                continue
            if want[src] < 0:
                want[src] = tmp_rows
                tmp_rows += sv.shape[src] if src < 2 else 1
            folds.append((at, n, want[src], sv.shape[src] if src < 2 else 1, b))
        tmp_offsets += want
    tmp = torch.full((tmp_rows, len(STAT_NAMES)), float("nan"), dtype=torch.float64, device=args.stats.device)
    view_bucket = Bucket(
        [sv.view(t) for sv, t in zip(views, bucket.params)],
        [sv.view(t) for sv, t in zip(views, bucket.grads)],
        [sv.view(t) for sv, t in zip(views, bucket.momentum_buffers)] if args.has_momentum else [],
        bucket.is_first,
        owner=bucket.params[0],  # the views are new objects every step; the param is not
    )
    step(view_bucket, dataclasses.replace(args, stats=tmp, stats_offsets=tmp_offsets, stats_blocks=()))
    for at, n, tmp_at, g, b in folds:
        logical = tmp[tmp_at : tmp_at + g].view(g // n, n, len(STAT_NAMES)).sum(0)
        args.stats[at : at + n // b] = logical.view(n // b, b, len(STAT_NAMES)).sum(1) if b > 1 else logical


def _check_stats(params: Sequence[Tensor], stats: Tensor, offsets: Sequence[int],
                 numels: tuple[int, ...] | None = None, sums: Sequence[int] = (),
                 blocks: Sequence[int] = ()) -> StatsLayout | None:
    """Every tracked group must land inside `stats` (a float64 [rows, 9] tensor on the params'
    device): the kernels write there through raw pointers.

    `numels`: the element counts from uniform_dense (every tensor dense on params[0]'s device),
    when the real op found them; then the result is the bucket's StatsLayout (ops/plan.py),
    checked here and handed to the kernels, else None. `sums`: the params' sums masks, part of
    the layout (the kernels' variants and the reduction's NaN columns follow them); `blocks`:
    their column blocks (checked by _check_blocks), part of it too (the geometry follows them)."""
    if len(offsets) not in (0, 3 * len(params)):
        torch._check(
            False, lambda: f"sgd_step_: stats_offsets needs 3 entries per param, got {len(offsets)} for {len(params)}")
    if not (stats.dtype == torch.float64 and stats.dim() == 2 and stats.shape[1] == len(STAT_NAMES)
            and stats.is_contiguous()):
        torch._check(False, lambda: f"sgd_step_: stats must be a contiguous float64 [rows, 9] tensor, got "
                                    f"{stats.dtype} {tuple(stats.shape)}")
    if not offsets:
        return None
    # The common case in a few C-level passes: every step checks every tracked tensor, and 1000
    # of them cost 2.5 ms through a Python loop. The rows a layout needs are cached per layout;
    # the loop below runs only to name the culprit.
    rows, device = stats.shape[0], stats.device
    if numels is not None:
        # uniform_dense found every param on params[0]'s device: one comparison checks them all.
        layout = stats_layout(params[0], params, numels, offsets, params[0].device, sums=sums, blocks=blocks)
        if layout.rows_needed <= rows and stats.get_device() == params[0].get_device():
            return layout
    else:
        try:
            need = _rows_needed(tuple(map(_shape, params)), tuple(offsets), tuple(blocks))
        except TypeError:  # symbolic sizes (tracing with dynamic shapes) are not hashable: the loop
            need = None
        if need is not None and need <= rows and all(map(eq, map(_get_device, params), repeat(stats.get_device()))):
            return None
    for i in range(len(params)):
        r, c, a = offsets[3 * i : 3 * i + 3]
        if r < 0 and c < 0 and a < 0:
            continue
        p = params[i]
        for off, n in zip((r, c, a), group_counts(p.shape, blocks[i] if blocks else 1)):
            if off >= 0 and off + n > rows:
                torch._check(False, lambda: f"sgd_step_: param {i} (shape {tuple(p.shape)}) needs stats rows "
                                            f"[{off}, {off + n}) but stats has {rows}")
        if p.device != device:
            torch._check(False, lambda: f"sgd_step_: stats is on {device}, param {i} on {p.device}")


_shape = attrgetter("shape")
_get_device = Tensor.get_device


@functools.lru_cache(maxsize=64)
def _rows_needed(shapes: tuple[torch.Size, ...], offsets: tuple[int, ...], blocks: tuple[int, ...] = ()) -> int:
    """rows_needed (ops/plan.py), cached per layout for the paths without a StatsLayout."""
    return rows_needed(shapes, offsets, blocks)


def _sgd_step_fake(params: Sequence[Tensor], grads: Sequence[Tensor], momentum_buffers: Sequence[Tensor],
                   is_first: Sequence[bool], *rest) -> None:
    """What tracing needs to know: the op returns nothing and mutates in place; the arguments are
    checked as the real op checks them (lengths, stats rows), plus devices and dtypes."""
    args = StepArgs(*rest)
    _check_lists(params, grads, momentum_buffers, is_first, args)
    for i, (p, g) in enumerate(zip(params, grads)):
        torch._check(g.shape == p.shape, lambda: f"sgd_step_: grad {i} has shape {tuple(g.shape)}, "
                     f"param {tuple(p.shape)}")
        torch._check(g.device == p.device and p.device == params[0].device,
                     lambda: f"sgd_step_: param {i} and its grad must be on {params[0].device}")
        if args.has_momentum:
            # A buffer of another floating dtype is torch's (kept in the dtype it was created in
            # after `model.double()`): the reference steps it with torch's ops (ops/reference.py).
            v = momentum_buffers[i]
            torch._check(v.shape == p.shape and v.device == p.device and v.dtype.is_floating_point,
                         lambda: f"sgd_step_: momentum buffer {i} must match its param's shape and device, "
                         "and be floating point")


_lib.impl("sgd_step_", _sgd_step_impl, "CPU")
_lib.impl("sgd_step_", _sgd_step_impl, "CUDA")
torch.library.register_fake("nm_optim::sgd_step_", _sgd_step_fake, lib=_lib)

sgd_step_ = torch.ops.nm_optim.sgd_step_
"""``sgd_step_(params, grads, momentum_buffers, is_first, lr, lr_tensor, weight_decay, momentum,
dampening, nesterov, maximize, grad_scale, found_inf, backend, stats=None, stats_offsets=[],
stats_sums=[], stats_blocks=[])``: one fused SGD step, in place, over tensors of one device and dtype (the
arguments after the lists are StepArgs' fields; stats_sums[i] is the bit mask of the sums param
i's tracks hold, the other columns written NaN: see nm_optim.names.SUM_MASKS; stats_blocks[i] the
columns per group of its "cols" track: see nm_optim/tracks.py). ``momentum_buffers`` and
``is_first`` are empty when momentum == 0; otherwise
``is_first[i]`` says buffer i is created by this step (v' = d, its old contents unread).
"""

assert tuple(a.name for a in sgd_step_.default._schema.arguments)[4:] == FIELDS, "StepArgs follows the schema"
