"""nm_optim.SGD: a drop-in torch.optim.SGD whose step is one fused kernel per bucket."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from itertools import repeat
from operator import is_, is_not
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

from nm_optim._lazy import assume_constant_result, disable
from nm_optim.aliasing import call_levels
from nm_optim.distributed import check_not_zero_partition, has_dtensors, local_tensors
from nm_optim.names import ALL_SUMS_MASK, check_backend_name
from nm_optim.ops import plan as _ops_plan
from nm_optim.ops import resolve_backend
from nm_optim.ops.op import sgd_step as sgd_step_  # the op; straight to its implementation where that is the same
from nm_optim.param_checks import DTYPES, buffer_ok, check_differentiable, check_param, raise_buffer_error
from nm_optim.recorder import Recorder
from nm_optim.symmetry import Symmetry
from nm_optim.tracks import Track, TrackTable, with_symmetries

_data_ptr = Tensor.data_ptr
_UNTRACKED = (-1, -1, -1)
# Backends that read a CPU lr tensor as the float64 it holds, as they read a float lr.
_EXACT_LR_TENSOR = ("cpu", "reference")


class SGD(Optimizer):
    r"""Stochastic gradient descent (optionally with momentum), with PyTorch's semantics exactly.

    For each parameter p with gradient grad (divided by GradScaler's scale, negated if maximize)::

        d  = grad + weight_decay * p
        v' = d                                   on the step that creates the buffer
        v' = momentum * v + (1 - dampening) * d  afterwards
        u  = d + momentum * v'  if nesterov  else  v'
        p' = p - lr * u

    One kernel call per (param group, device, dtype) bucket reads p, grad and v once and writes
    p and v once. On the CPU, fp32 and fp64 params and momentum buffers are bitwise equal to
    torch.optim.SGD's default step (the same operations, in the same order, with the same
    roundings); on CUDA and Triton the update follows torch's fused CUDA kernel. fp16 / bf16 params
    are updated in float32 and rounded once per step (torch rounds after every operation): each
    step is torch's float32 step on the upcast values, rounded once.

    Args:
        params: iterable of parameters, named parameters, or param-group dicts.
        lr (float or Tensor): learning rate (default: 1e-3). A tensor lr is read on the device.
        momentum (float): momentum factor (default: 0).
        dampening (float): dampening for momentum (default: 0).
        weight_decay (float): L2 penalty, coupled as in torch.optim.SGD (default: 0).
        nesterov (bool): Nesterov momentum (default: False).
        maximize (bool): maximize the objective instead of minimizing (default: False).
        backend (str): "auto" (default: the fastest available for each param's device),
            "reference" (pure PyTorch), "cpu" or "cuda" (the compiled kernels). See
            :func:`nm_optim.available_backends`.
        track: statistics to reduce in the same pass: a list of ``(param, axis)`` with axis
            "rows", "cols" or "all", or "layers" (an "all" track for every param). For each
            group of each track the step emits the 9 sums of ``nm_optim.STAT_NAMES`` of the
            pre-step p, g (grad after unscaling and the maximize sign, before weight decay) and
            v (the momentum buffer before the step); read them with :meth:`last_stats`. A
            triple ``(param, axis, sums)`` asks for only some of them (names of STAT_NAMES):
            the track reduces the smallest of ``nm_optim.names.SUM_SETS`` holding them (the 6
            products, or all 9), the same set for every track of one param (the union of their
            asks), and its other columns read NaN (see nm_optim.tracks). A quadruple
            ``(param, "cols", sums, block)`` makes each group ``block`` consecutive columns
            (sums None: all 9): e.g. the 49 columns one channel feeds after a Flatten.
        foreach (bool, optional): accepted for drop-in compatibility and kept in the param groups
            (and state dicts) as torch.optim.SGD keeps it; it chooses nothing here: every step is
            one fused kernel per bucket (``backend`` chooses the implementation).
        fused (bool, optional): kept in the param groups as torch.optim.SGD keeps it, and, as
            there, decides only who undoes torch.amp.GradScaler's scale (see below); the update
            is the same kernel either way. As in torch, fused and foreach both True is an error.
        differentiable (bool): must be False (default); differentiating through the step is not
            supported (the kernels write in place through raw pointers).
        record_every (int): with tracks, ``opt.recorder`` keeps the statistics and
            hyper-parameters of one step in every ``record_every`` (steps 0, record_every, ...;
            see nm_optim.recorder; default: 1). Any integral value (numpy's too), not a bool.
        symmetries: nm_optim.Translation / Scale / Rescale objects (e.g. from
            :func:`nm_optim.find_symmetries`): their (param, axis) tracks are added after the
            `track` items, each distinct (param, axis) once, so two symmetries sharing a tensor
            cost one pass. Params of unnamed param groups are named by the members' names, and
            the record's ``meta["symmetries"]`` describes them, so ``sym.group_stats(record)``
            and :func:`nm_optim.symmetry.symmetries_from_record` work on a loaded file. A member
            whose tensor is not one of these params is matched by its name (its parameter name
            in the model): find the symmetries on the plain model, shard it (FSDP2's
            ``fully_shard`` replaces the Parameter objects, keeping the names), then pass
            ``model.parameters()`` (matched through the model the symmetries were found on) or
            ``model.named_parameters()``; the shapes must agree (a DTensor's is the whole
            tensor's), and the tracks then report whole-tensor statistics. A symmetry's tracks
            ask for the sums its law reads (``nm_optim.names.LAW_SUMS``): the 6 products for
            scale and rescale, all 9 for translation (joined with any other ask of the param).

    The state dict has torch.optim.SGD's format and keys exactly (``momentum_buffer`` per param;
    no ``backend``, which is a choice of this process, not training state), so state moves between
    the two optimizers in both directions, also through torch.distributed.checkpoint; loading
    keeps each param group's backend.

    torch.amp.GradScaler, as with torch.optim.SGD: by default the scaler unscales the grads itself
    (``scaler.unscale_``, or inside ``scaler.step``) and skips ``step()`` when it found an inf or
    a NaN, so params, buffers and grads are bitwise those of torch.optim.SGD's default path (and
    gradient clipping after ``unscale_`` works, e.g. Lightning's ``gradient_clip_val`` with
    ``precision="16-mixed"``). With ``fused=True`` the optimizer sets
    ``_step_supports_amp_scaling``, as torch's fused SGD does: the scaler hands ``grad_scale``
    and ``found_inf`` to ``step()``, the kernel divides the grads by the scale in the same pass
    and writes the unscaled grads back to ``p.grad`` (bitwise torch's fused SGD, before the
    maximize sign), and a step with ``found_inf`` set writes nothing (grads included) and
    creates no state, also on the first step.

    A param listed twice in one group is stepped twice, in order, as torch.optim.SGD does (both
    warn at construction): the second update sees the first's result. Each kernel call sees a
    tensor once (the occurrences go to successive calls); a tracked param's statistics are those
    of its first occurrence, i.e. of the pre-step values. Likewise params whose memory overlaps
    (views of one buffer) are stepped one after the other, in order, like torch's loop, each
    tracked with its own values; disjoint views of one buffer share a kernel call. That holds
    also when params come to share memory after the first step (late weight tying,
    ``b.data = a.data``): the step notices re-pointed memory.

    A momentum buffer torch.optim.SGD's step would reject (not a tensor; another shape, device or
    layout; a dtype its ops cannot cast, such as an integer one) raises torch's exception type
    and message, naming the param, before anything is written. A buffer of another floating
    dtype is stepped as torch steps it: after ``model.to(torch.float64)`` torch keeps each
    float32 buffer (until ``load_state_dict`` casts it), rounds ``buf.mul_(momentum)`` to float32
    and the rest in float64; so does this step, bitwise.

    Distributed (nm_optim.distributed):

    - DDP: params, momentum buffers and the all-reduced grads are the same on every rank, and
      the kernels' reductions are deterministic, so the statistics (and ``opt.recorder``'s
      records) are identical on every rank, without any communication by the optimizer.
    - FSDP2 (``fully_shard``) and other DTensor params: each rank steps its local shards (one
      op per bucket, as without DTensors); momentum buffers are DTensors with their params'
      placements, as torch.optim.SGD's are, so state dicts and torch.distributed.checkpoint see
      torch's layout. A track on a param sharded with ``Shard(d)`` over one mesh dimension (any
      d, uneven and empty shards included) reports the statistics of the **whole** tensor,
      identical on every rank: each rank reduces its shard at its global group offsets and one
      all-reduce (SUM) per step (per device) combines the shards of all tracks. Replicated
      DTensors need no communication (every rank holds the whole tensor).
    - torch.distributed.optim.ZeroRedundancyOptimizer(optimizer_class=nm_optim.SGD): supported
      without tracks; ``track=`` / ``symmetries=`` raise NotImplementedError at construction,
      on every rank (each rank's optimizer holds only its partition of the params).
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float | Tensor = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        backend: str = "auto",
        track: str | Iterable[tuple[Tensor, str] | tuple[Tensor, str, Sequence[str]]] | None = None,
        record_every: int = 1,
        symmetries: Iterable[Symmetry] | None = None,
    ) -> None:
        # The same checks, order, exception types and messages as torch.optim.SGD.
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        check_differentiable(differentiable)
        check_backend_name(backend)
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "maximize": maximize,
            "foreach": foreach,
            "differentiable": differentiable,
            "fused": fused,
            "backend": backend,
        }
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        super().__init__(params, defaults)
        if fused and foreach:  # torch.optim.SGD's check and message
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        if fused:
            # As torch.optim.SGD: only fused=True tells GradScaler (and Lightning) that step()
            # unscales the grads itself; otherwise the scaler unscales them before the step, so
            # gradient clipping after unscale_ works and the bits are torch's default path's.
            self._step_supports_amp_scaling = True
        check_not_zero_partition(track is not None or bool(symmetries))
        spec, names, self.symmetries = with_symmetries(track, symmetries, self.param_groups)
        self._tracks = TrackTable(spec, self.param_groups, names)
        self.recorder = self._new_recorder(record_every)

    def _new_recorder(self, record_every: int) -> Recorder:
        return Recorder(self._tracks, lambda: self.param_groups, record_every, meta=self._record_meta)

    @property
    def tracks(self) -> list[Track]:
        """The resolved tracks, aligned with the `track` argument (see nm_optim.tracks)."""
        return self._tracks.tracks

    def last_stats(self) -> list[Tensor]:
        """The statistics of the last step: one float64 CPU tensor [num_groups, 9] per track
        (columns in nm_optim.STAT_NAMES order; NaN for groups that were not stepped). This
        call synchronises with the device; step() never does."""
        return self._tracks.last_stats()

    def _record_meta(self) -> dict[str, Any]:
        """What the record's meta says of this optimizer: describe() of each symmetry, member
        names as this optimizer's tracks name them."""
        if not self.symmetries:
            return {}
        out = []
        for sym in self.symmetries:
            d = sym.describe()
            for md, m in zip(d["members"], sym.members):
                md["name"] = self._tracks.param_name(m.param)
            out.append(d)
        return {"symmetries": out}

    def __getstate__(self) -> dict[str, Any]:
        # Tracks survive deepcopy / pickling (their params map to the copies); the recorded
        # history does not: save it with opt.recorder.save(path).
        state = super().__getstate__()
        state["_track_spec"] = [(t.param, t.axis, t.sums) for t in self._tracks.tracks]
        state["_record_every"] = self.recorder.record_every
        state["_symmetries"] = list(self.symmetries)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        spec = state.pop("_track_spec", None)
        record_every = state.pop("_record_every", 1)
        symmetries = state.pop("_symmetries", None)
        super().__setstate__(state)
        if "_tracks" not in self.__dict__:
            spec, names, self.symmetries = with_symmetries(spec, symmetries, self.param_groups)
            self._tracks = TrackTable(spec, self.param_groups, names)
            self.recorder = self._new_recorder(record_every)
        self._nm_dtensors = has_dtensors(self.param_groups)
        for group in self.param_groups:
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)
            # As torch.optim.SGD.__setstate__ (which also runs at the end of load_state_dict).
            group.setdefault("foreach", None)
            group.setdefault("differentiable", False)
            group.setdefault("fused", False)
            group.setdefault("backend", "auto")
        # The constructor's fused (defaults) decides, so a deepcopy or pickle keeps the AMP
        # contract (torch's own attribute is lost there) and loading a state dict, which runs this
        # too, does not change it (as in torch).
        if self.defaults.get("fused"):
            self._step_supports_amp_scaling = True

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "backend" in param_group:
            check_backend_name(param_group["backend"])
        if "differentiable" in param_group:
            check_differentiable(param_group["differentiable"])
        super().add_param_group(param_group)
        # Checked when the param set changes, so that step() reads one attribute (and the
        # single-process step, compiled or not, meets no distributed code).
        self._nm_dtensors = self.__dict__.get("_nm_dtensors", False) or has_dtensors(self.param_groups[-1:])

    def state_dict(self) -> dict[str, Any]:
        """torch.optim.SGD's state dict, keys included: the param groups carry no ``backend`` (it
        says how this process runs the step, not what training reached; loading keeps the
        backend each group has here), so torch's loader and torch.distributed.checkpoint meet
        exactly the keys torch.optim.SGD saves."""
        state = super().state_dict()
        for group in state["param_groups"]:  # fresh dicts, built by Optimizer.state_dict
            group.pop("backend", None)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of nm_optim.SGD or torch.optim.SGD (they have the same format).

        Each param group keeps the backend it has here (a ``backend`` key in a state dict saved
        by an older nm_optim is ignored)."""
        backends = [g.get("backend", "auto") for g in self.param_groups]
        groups = state_dict.get("param_groups")
        if isinstance(groups, list) and any(isinstance(g, dict) and "backend" in g for g in groups):
            state_dict = dict(state_dict, param_groups=[
                {k: v for k, v in g.items() if k != "backend"} if isinstance(g, dict) else g for g in groups
            ])
        super().load_state_dict(state_dict)
        # New buffers and param group dicts: let the old ones go now (the checked buffers, the
        # steady calls' state dicts).
        self.__dict__.pop("_nm_checked_buffers", None)
        self.__dict__.pop("_nm_steady", None)
        for group, backend in zip(self.param_groups, backends):
            group["backend"] = backend

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform a single optimization step.

        Args:
            closure (Callable, optional): A closure that reevaluates the model and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        grad_scale: Tensor | None = getattr(self, "grad_scale", None)
        found_inf: Tensor | None = getattr(self, "found_inf", None)
        calls = []
        checked = []  # per call: (TensorGuard, addresses) where _steady_buckets checked it, else None
        new_buffers: list[tuple[Tensor, Tensor]] = []
        every_param_guarded = True
        for gi, group in enumerate(self.param_groups):
            buckets, guarded = self._buckets(gi, group, new_buffers)
            every_param_guarded &= guarded
            for device, bucket, check in buckets:
                calls.append((group, device, *bucket))
                checked.append(check)
        if self._tracks and not every_param_guarded:
            # Before anything is written: a tracked param whose shape or device changed would
            # have its groups reduced into rows laid out for the old shape. After the groups are
            # read: Dynamo guards a param's identity only where it first meets it, so a compiled
            # step must meet the params in the groups (which the plan follows), not in this
            # check's list, or a param replaced in a group would reuse the old graph. Not needed
            # when every param of the optimizer passed a guard made after this check passed
            # (_steady_buckets: then no shape or device changed since).
            self._tracks.check_unchanged()
        if not (all(checked) or self._nm_dtensors or torch.compiler.is_compiling()):
            self._remember_checked(calls, checked)

        # A step that would create momentum buffers while GradScaler found an inf or nan: skip
        # it before any state exists. This reads found_inf on the host, once, and only on the
        # step that creates state (torch's fused SGD instead keeps uninitialised buffers).
        if new_buffers and found_inf is not None and bool(found_inf.detach().reshape(-1).ne(0).any()):
            if self._tracks:
                self._tracks.begin_step(skipped=True)  # this step's statistics: none (NaN)
                self.recorder.after_step(set(), found_inf)
            return loss

        tracks = self._tracks
        if tracks:
            tracks.begin_step()
        vouch = _ops_plan.vouch
        for (group, device, params, grads, bufs, is_first, offsets, sums, blocks), check in zip(calls, checked):
            lr = group["lr"]
            lr_tensor = lr if isinstance(lr, Tensor) else None
            backend = resolve_backend(group["backend"], device)
            compiling = torch.compiler.is_compiling()
            if compiling and lr_tensor is None and backend in _EXACT_LR_TENSOR and device.type == "cpu":
                # A float passed to a custom op is a constant of the graph: Dynamo guards on it
                # and recompiles for every value a scheduler sets (then, past its recompile limit,
                # runs the step eagerly). As a tensor it is a graph input once Dynamo sees it
                # change, as for torch.optim.SGD. Bitwise the same: these backends read a CPU lr
                # tensor as the float64 it holds (CUDA and Triton read a tensor lr as float32).
                lr_tensor = torch.scalar_tensor(lr, dtype=torch.float64)
            wd = group["weight_decay"]
            if check is not None:  # checked above, just now: the op need not check again
                vouch(check[0], params, grads, bufs, check[1])
            sgd_step_(
                params,
                grads,
                bufs,
                is_first,
                0.0 if lr_tensor is not None else float(lr),
                lr_tensor,
                float(wd),
                float(group["momentum"]),
                float(group["dampening"]),
                bool(group["nesterov"]),
                bool(group["maximize"]),
                grad_scale,
                found_inf,
                backend,
                tracks.stats(device) if offsets else None,
                offsets,
                sums,
                blocks,
            )
        if any(checked):
            vouch(None)  # a voucher the op did not use (a spy) must not outlive the step
        for p, buf in new_buffers:
            self.state[p]["momentum_buffer"] = buf
        if tracks:
            if tracks.sharded:
                tracks.reduce_across_ranks()  # one all-reduce: whole-tensor statistics on every rank
            self.recorder.after_step({id(p) for p, _ in new_buffers}, found_inf)
        return loss

    def _buckets(self, gi: int, group: dict[str, Any], new_buffers: list[tuple[Tensor, Tensor]]) -> tuple[list, bool]:
        """(device, bucket, check) for each kernel call, in order: params with a grad, split by
        (device, dtype), with their buffers, is_first flags, statistics offsets and sums masks
        (both empty when no param of the bucket is tracked); and whether every param of the group is in a bucket that
        passed its guard (see _steady_buckets: check is its (TensorGuard, addresses); None:
        checked in full here, not yet guarded).
        A param listed k times in the group is in k successive calls."""
        all_params = group["params"]
        compiling = torch.compiler.is_compiling()
        # Comprehensions rather than map(attrgetter): as fast eagerly, and torch.compile traces them.
        grads = [p.grad for p in all_params]
        if all(g is not None for g in grads) if compiling else all(map(is_not, grads, repeat(None))):
            params, index = all_params, None
        else:
            index = [i for i, g in enumerate(grads) if g is not None]
            params = [all_params[i] for i in index]
            grads = [grads[i] for i in index]
        if not (self._nm_dtensors or compiling):
            steady = self._steady_buckets(group, params, grads)
            if steady is not None:
                return steady, index is None
        sparse = [g.is_sparse for g in grads]
        if any(sparse):
            i = sparse.index(True)
            check_param(group, i if index is None else index[i], params[i], grads[i])

        buckets = []
        if torch.compiler.is_compiling():
            plan = _plan_at_trace_time(self, gi)
            if plan is None:  # planning raised: raise it as eager code does
                plan = _plan_eagerly(self, group, params, index)
        else:
            plan = self._plan(group, params, index)
        for k, (device, members, offsets, sums, blocks) in enumerate(plan):
            if members is None:
                bparams, bgrads = params, grads
            else:
                bparams = [params[i] for i in members]
                bgrads = [grads[i] for i in members]
            bufs: list[Tensor] = []
            is_first: list[bool] = []
            if group["momentum"] != 0:
                state = self.state
                for p in bparams:
                    st = state.get(p)
                    buf = st.get("momentum_buffer") if st else None
                    if buf is None:
                        buf = torch.empty_like(p, memory_format=torch.preserve_format)
                        new_buffers.append((p, buf))
                        is_first.append(True)
                    else:
                        is_first.append(False)
                    bufs.append(buf)
                # Every call's buffers before any call runs (step() runs them after _buckets).
                self._check_buffers((gi, k), plan, group, bparams, bufs, members, index)
            if self._nm_dtensors:  # the op steps the local shards; the state keeps the DTensors
                bparams, bgrads, bufs = local_tensors(bparams, bgrads, bufs)
            buckets.append((device, (bparams, bgrads, bufs, is_first, offsets, sums, blocks), None))
        return buckets, False

    def _steady_buckets(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> list | None:
        """_buckets' result without its checks, when nothing they read changed since a step that
        made them all (None otherwise: check in full).

        That step's plan is found again (the same params with a grad, in order, at the same
        addresses: _plan's key), and for each of its calls a TensorGuard (ops/plan.py), made after
        every check of that step passed, holds for the call's params, grads and momentum buffers
        (read from the state again: a buffer replaced, or loaded by load_state_dict, is what is
        stepped). It compares each tensor's type, dispatch keys, dtype, device, requires_grad,
        sizes and strides: a grad that is None or sparse, a param or buffer of another dtype,
        device or shape (also one reshaped in place, its element count and address unchanged), a
        missing buffer, momentum turned on or off (buffers or none) fails it. Every check of the
        full path depends on those only, so it would pass again: the sparse grads (check_param),
        the dtypes (_build_plan), each buffer against its param (_check_buffers: buffer_ok), each
        tracked param's shape and device (TrackTable.check_unchanged, which step() skips when
        every param of the optimizer is in such a call). Buffers all exist: is_first is all False.

        The op is vouched these very tuples with their addresses (ops/plan.py, vouch), read here
        right after the guard while those tensors are in the cache: it neither checks nor reads
        them again. The guards are this optimizer's own: another optimizer over the same params
        has other tracks to check."""
        plan = self._plan_of(group, params)
        steady = self.__dict__.get("_nm_steady", {}).get(id(group))
        if plan is None or steady is None or steady.group is not group or steady.plan is not plan[0]:
            return None
        momentum = group["momentum"] != 0
        if momentum:
            state_dicts = steady.state_dicts(self.state, params)
            if state_dicts is None:
                return None
        out = []
        where: tuple[int, ...] = ()
        placed: list[tuple[int, int]] = []  # (position in params, address) of calls with members
        for k, ((device, members, offsets, sums, blocks), guard) in enumerate(zip(plan[0], steady.guards)):
            bparams = tuple(params) if members is None else tuple([params[i] for i in members])
            bgrads = tuple(grads) if members is None else tuple([grads[i] for i in members])
            bufs: tuple = ()
            if momentum:
                try:
                    bufs = tuple([st["momentum_buffer"] for st in state_dicts[k]])
                except KeyError:  # no buffer yet: this step creates it
                    return None
            if not guard.holds(bparams, bgrads, bufs):
                return None
            # The addresses right after the guard read the same tensors (in the cache now); the
            # op gets them with the voucher.
            # A tuple of the params' addresses: where it equals the plan's, the plan's own tuple
            # goes to the op, the same object every step (the op compares it by identity then).
            param_ptrs = tuple(map(_data_ptr, bparams))
            if members is None:
                where = param_ptrs = plan[1] if param_ptrs == plan[1] else param_ptrs
            else:
                placed += zip(members, param_ptrs)
            ptrs = (param_ptrs, list(map(_data_ptr, bgrads)), list(map(_data_ptr, bufs)))
            out.append((device, (bparams, bgrads, bufs, guard.facts["is_first"], offsets, sums, blocks),
                        (guard, ptrs)))
        if placed:  # the params' addresses in the group's order, as _plan keys them
            where = tuple(ptr for _, ptr in sorted(placed))
        return out if where == plan[1] else None

    def _remember_checked(self, calls: list, checked: list) -> None:
        """After the full checks of a step passed: a TensorGuard for each call's tensors, which
        later steps check instead (_steady_buckets); the calls become tuples, for the op's voucher.
        Only when every call of a param group has one, with the group's cached plan."""
        plans = self.__dict__.get("_nm_plans", {})
        by_group: dict[int, list[int]] = {}
        for i, call in enumerate(calls):
            by_group.setdefault(id(call[0]), []).append(i)
        store = self.__dict__.setdefault("_nm_steady", {})
        live = {id(g) for g in self.param_groups}
        for gid in [gid for gid in store if gid not in live]:  # groups replaced since
            del store[gid]
        for gid, idx in by_group.items():
            if any(checked[i] is not None for i in idx):
                continue  # the group's steady calls: guarded already
            cached = plans.get(gid)
            group = calls[idx[0]][0]
            store.pop(gid, None)
            if cached is None or cached[0] is not group or len(cached[2]) != len(idx):
                continue
            made = []
            for i in idx:
                group, device, params, grads, bufs, is_first, offsets, sums, blocks = calls[i]
                call = (group, device, tuple(params), tuple(grads), tuple(bufs), tuple(is_first), offsets, sums,
                        blocks)
                guard = _ops_plan.tensor_guard(call[2], call[3], call[4])
                if guard is None:
                    break
                guard.facts["is_first"] = (False,) * len(call[5])  # later steps: every buffer exists
                calls[i], checked[i] = call, (guard, None)
                made.append(guard)
            if len(made) == len(idx):
                store[gid] = _Steady(group, cached[2], made)

    def _check_buffers(self, key: tuple[int, int], plan: list, group: dict[str, Any], params: list[Tensor],
                       bufs: list[Any], members: list[int] | None, index: list[int] | None) -> None:
        """Raise what torch.optim.SGD's step would raise for a momentum buffer it cannot use (not a
        tensor; a shape, device or dtype its ops reject, e.g. a [2, 6] buffer for a [4, 3] param,
        which the flat kernels, reading 12 elements, would accept), naming the param. step() calls
        this for every call before any runs, so a failing step writes nothing (torch's for-loop has
        already stepped the params before the bad one, and scaled the bad buffer by momentum).
        A buffer of another floating dtype is valid, as in torch (e.g. after ``model.double()``).

        Eagerly (where _steady_buckets' guards did not hold) the check runs when a call's buffers
        are not the very objects checked last time for the same plan (the plan is rebuilt when a
        param's memory is re-pointed), or a param's shape changed since (a param reshaped in
        place keeps its plan, and a buffer of its old shape must fail as in torch): identities
        and shapes, two C-level passes. Under torch.compile the metadata comparisons are traced
        (Dynamo guards what they read)."""
        if torch.compiler.is_compiling():
            bad = [i for i, (p, b) in enumerate(zip(params, bufs)) if not buffer_ok(p, b)]
        else:
            checked = self.__dict__.setdefault("_nm_checked_buffers", {})
            last = checked.get(key)
            shapes = [p.shape for p in params]
            if (last is not None and last[0] is plan and len(last[1]) == len(bufs) and all(map(is_, bufs, last[1]))
                    and last[2] == shapes):
                return
            bad = [i for i, (p, b) in enumerate(zip(params, bufs)) if not buffer_ok(p, b)]
            if not bad:
                # Holds the buffers, so an id cannot be reused by another object while cached.
                checked[key] = (plan, list(bufs), shapes)
        if bad and self._tracks:
            self._tracks.check_unchanged()  # a tracked param's new shape: its own, more useful error
        for i in bad:
            j = members[i] if members is not None else i
            raise_buffer_error(group, index[j] if index is not None else j, params[i], bufs[i])

    def _plan(self, group: dict[str, Any], params: list[Tensor], index: list[int] | None) -> list:
        """The kernel calls of a group: (device, positions in `params` or None for all, statistics
        offsets, sums masks), one per (device, dtype), in order; cached per param group and rebuilt
        when the set of params with a grad changes (offsets and sums are fixed with the tracks, at
        construction).

        A param listed several times (torch warns, and steps it once per occurrence, in order)
        goes into one call per occurrence: in one call the kernel's threads would step the same
        memory at once, a data race. So does a param whose memory may overlap an earlier one's
        (views of one storage: see call_levels), so that it sees that one's result, as in
        torch.optim.SGD's loop.

        The cache is keyed on the params' identities and on where their memory starts, so that
        memory re-pointed after the plan was built (late weight tying, ``b.data = a.data``; a
        partial overlap; ``p.data = p.data.double()``, which moves it) is planned afresh. Two
        C-level passes (1000 params: about 65 us). Memory that grows or shrinks where it starts
        (``p.data = base[:2 * n]`` after ``base[:n]``) keeps the plan: the op checks every call's
        memory spans itself when an address or size changed (ops/plan.py, AddressCheck), and steps
        params that overlap one after the other. A param reshaped in place (``p.data =
        p.data.view(...)``) keeps the plan too; its momentum buffer is checked again against the
        new shape (_check_buffers compares the shapes)."""
        result = self._cached_plan(group, params)
        if result is not None:
            return result
        result = self._build_plan(group, params, index)
        # The plan holds the group and its params, so their ids cannot be reused while cached.
        where = None if self._nm_dtensors else tuple(map(_data_ptr, params))
        self.__dict__.setdefault("_nm_plans", {})[id(group)] = (group, list(params), result, where)
        return result

    def _cached_plan(self, group: dict[str, Any], params: list[Tensor]) -> list | None:
        """_plan's cached result for these params (the same objects, in order, at the same
        addresses), or None."""
        found = self._plan_of(group, params)
        # A DTensor has no address of its own here (the op steps its local shard; aliasing.memory_span).
        where = None if self._nm_dtensors else tuple(map(_data_ptr, params))
        return found[0] if found is not None and found[1] == where else None

    def _plan_of(self, group: dict[str, Any], params: list[Tensor]) -> tuple[list, list[int] | None] | None:
        """_plan's cached result for these params (the same objects, in order) and the params'
        addresses it was built for; the caller compares those."""
        cached = self.__dict__.get("_nm_plans", {}).get(id(group))
        if cached is None or cached[0] is not group:
            return None
        known = cached[1]
        if len(known) != len(params) or not all(map(is_, params, known)):
            return None
        return cached[2], cached[3]

    def _build_plan(self, group: dict[str, Any], params: list[Tensor], index: list[int] | None) -> list:
        """_plan's result, built afresh (eagerly _plan caches it; under torch.compile it is built
        while Dynamo traces the step: _plan_at_trace_time)."""
        plan: dict[tuple[int, torch.device, torch.dtype], list[int]] = {}
        seen: Counter[int] = Counter()
        occurrence = []
        for i, p in enumerate(params):
            if p.dtype not in DTYPES:
                check_param(group, i if index is None else index[i], p, p)
            occurrence.append(seen[id(p)])
            seen[id(p)] += 1
        repeated = [k > 0 for k in occurrence]
        # The k-th occurrence of a param goes to call k or later even where its memory span is
        # unknown (a DTensor: aliasing.memory_span), so that no call sees one tensor twice.
        for i, (p, level) in enumerate(zip(params, call_levels(params))):
            plan.setdefault((max(level, occurrence[i]), p.device, p.dtype), []).append(i)
        # All calls of level 0, then of level 1, ...; a stable sort keeps the group's order within
        # each (params of one level are independent, so only overlapping params' order matters).
        result = [(device, None if len(v) == len(params) else v,
                   *self._offsets([params[i] for i in v], [repeated[i] for i in v]))
                  for (_, device, _), v in sorted(plan.items(), key=lambda kv: kv[0][0])]
        return result

    def _offsets(self, params: list[Tensor], repeats: list[bool]) -> tuple[list[int], list[int], list[int]]:
        """The op's stats_offsets, stats_sums and stats_blocks for one call: 3 offsets per param
        (rows, cols, all; -1 untracked), one mask per param (the sums its tracks reduce; all 9
        for an untracked one, which the kernels do not read) and one column block per param (1
        but for a "cols" track with a block), or all empty when no param of the call is tracked.
        The masks are empty too where every one is all 9, the blocks where every one is 1 (the
        op reads empty so): such a call is the one it was before tracks could ask for fewer sums
        or column blocks. A repeated occurrence (repeats[i]) is stepped untracked: the statistics
        are of the pre-step values."""
        if not self._tracks:
            return [], [], []
        found = [None if again else self._tracks.offsets(p) for p, again in zip(params, repeats)]
        if all(o is None for o in found):
            return [], [], []
        masks = [ALL_SUMS_MASK if o is None else self._tracks.sums_mask(p) for p, o in zip(params, found)]
        blocks = [1 if o is None else self._tracks.block(p) for p, o in zip(params, found)]
        offsets = [x for o in found for x in (o if o is not None else _UNTRACKED)]
        return (offsets, masks if any(m != ALL_SUMS_MASK for m in masks) else [],  # type: ignore[return-value]
                blocks if any(b != 1 for b in blocks) else [])


class _Steady:
    """A param group's calls as a step that checked them in full made them (SGD._steady_buckets):
    its cached plan, a TensorGuard per call, and the param's state dicts per call, read again from
    ``opt.state`` only when that dict changed.

    A lookup ``state.get(p)`` costs a Python call of Tensor.__hash__ per param (about 90 us for
    1000 params); the state dicts are found again instead where the state is the same dict object
    with the same version (PEP 509's version tag, which CPython changes on every insertion,
    replacement or deletion: torch._C._dynamo.guards.dict_version reads it). A buffer replaced in
    a param's own state dict is read from it every step."""

    __slots__ = ("group", "plan", "guards", "_state", "_version", "_dicts")

    def __init__(self, group: dict[str, Any], plan: list, guards: list) -> None:
        self.group, self.plan, self.guards = group, plan, guards
        self._state: Any = None
        self._version = -1
        self._dicts: list[tuple[dict, ...]] = []

    def state_dicts(self, state: dict, params: list[Tensor]) -> list[tuple[dict, ...]] | None:
        """Each call's params' state dicts, or None where a param has none."""
        version = _dict_version(state) if _dict_version is not None else -1
        if state is self._state and version == self._version and version >= 0:
            return self._dicts
        dicts = []
        for _, members, _, _, _ in self.plan:
            found = tuple(map(state.get, params if members is None else [params[i] for i in members]))
            if None in found:
                return None
            dicts.append(found)
        self._state, self._version, self._dicts = state, version, dicts
        return dicts


def _version_tag() -> Callable[[dict], int] | None:
    """torch's reader of a dict's version tag, where it works on this Python: the tag must change
    on every kind of change (CPython 3.12 deprecated it; a Python without it gets None)."""
    try:
        from torch._C._dynamo.guards import dict_version
    except ImportError:
        return None
    try:
        d: dict = {}
        seen = [dict_version(d)]
        d[0] = 0
        seen.append(dict_version(d))
        d[0] = 1
        seen.append(dict_version(d))
        del d[0]
        seen.append(dict_version(d))
    except Exception:
        return None
    return dict_version if len(set(seen)) == len(seen) else None


_dict_version = _version_tag()


# Under torch.compile the plan is computed on the host, with the real tensors, while Dynamo traces
# the step, and is a constant of the graph. Planning cannot be traced: it reads memory addresses
# (data_ptr) that fake tensors do not have and that a graph could not inspect anyway. It may be
# assumed constant because what it depends on is guarded by the traced step itself: which params
# of the group have a grad (the step reads every p.grad: Dynamo guards None-ness and each grad's
# metadata), each param's dtype and device (tensor guards on the op's inputs), and the params
# themselves (Dynamo guards the optimizer's params by identity where the step first meets them:
# in the groups, see step()), shape and strides (tensor guards). A change recompiles and plans
# again, from scratch: the eager plan cache is not consulted. Not guarded: where a param's memory
# is. Dynamo deliberately installs no aliasing guards on Parameters
# (torch._dynamo.config.skip_no_tensor_aliasing_guards_on_parameters), so memory re-pointed without
# changing those (late weight tying, `b.data = a.data`) keeps the traced plan, where the eager
# plan cache (keyed on addresses too: SGD._plan) plans afresh. The op guards that case itself:
# params of one call that share memory are stepped in successive calls, in order
# (ops/plan.py, AddressCheck), so the compiled step stays torch's.
@assume_constant_result
def _plan_at_trace_time(opt: SGD, gi: int) -> list | None:
    """SGD._plan's result for param group `gi` (the group as the traced step sees it), or None if
    planning raised (a param of an unsupported dtype): then _plan_eagerly raises it."""
    group = opt.param_groups[gi]
    all_params = group["params"]
    index = [i for i, p in enumerate(all_params) if p.grad is not None]
    try:
        if len(index) == len(all_params):
            return opt._build_plan(group, all_params, None)
        return opt._build_plan(group, [all_params[i] for i in index], index)
    except Exception:
        return None


# An exception raised inside assume_constant_result reaches the user as an internal Dynamo error;
# raised by eager code (a graph break, on this failing path only) it is the one eager code raises.
@disable
def _plan_eagerly(opt: SGD, group: dict[str, Any], params: list[Tensor], index: list[int] | None) -> list:
    return opt._build_plan(group, params, index)

