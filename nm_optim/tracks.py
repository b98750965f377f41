"""Tracks: which per-group statistics the fused step reduces, and where they land.

A track is (param, axis): "rows" gives one group per index of dim 0 (an output neuron or channel),
"cols" one per index of dim 1 (an input neuron or channel), "all" one group for the whole tensor.
For every group the kernel emits sums of the pre-step values (STAT_NAMES): g is the gradient
after AMP unscaling and the maximize sign, before weight decay; v is the momentum buffer before
the step (zeros on the first step and when momentum is 0).

Statistics by need: a track (param, axis, sums) asks for some of the 9 sums; (param, axis) asks
for all 9. A track reduces one of names.SUM_SETS (all 9, or the 6 products that the scale and
rescale laws read), the smallest holding what was asked; the columns of the other sums read NaN.
The kernels pick one variant per tensor, so every track of one param reduces the same set: the
union of the asks of all its tracks, rounded up to a set (names.sum_set). Fewer sums are less
work where the column partials' traffic bounds the kernel (docs/architecture.md).

Column blocks: a track (param, "cols", sums, block) makes each group `block` consecutive columns
of dim 1 (the 49 columns a conv channel feeds into the Linear after a Flatten: VGG-16's fc1
[4096, 25088] has 512 such groups). The kernels then reduce the tensor as [d0, d1 / block,
block × rest] (ops/layout.py, geometry): the same memory order, but 512 column sums to fold
instead of 25,088, the fold that bounds the CPU kernel on fc1. A param has one "cols" track: its
block is the greatest common divisor of the blocks asked for it (1 when any ask has none), and a
reader with a larger block sums the track's groups further (nm_optim.symmetry, Member.fold). A
sharded param's "cols" track keeps block 1 (its shards need not split at a block's edge).

Each distinct (param, axis) owns a fixed block of rows in a float64 [rows, 9] tensor on its
param's device; the kernel writes it in place every step, so nothing moves to the host in
`step()`. Two tracks that name the same (param, axis) share one block (no duplicate work).

A DTensor param sharded over one mesh dimension (FSDP2, tensor parallel) is tracked as the whole
tensor: its rows are sized from the global shape, each rank's kernel writes its shard's groups at
their global offsets (partial sums for the groups that span shards) into a block of sharded rows
that starts at zero every step, and one all-reduce (SUM) per device after the kernels makes every
rank's block the whole tensor's statistics (nm_optim/distributed.py).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from nm_optim._lazy import disable
from nm_optim.distributed import all_reduce_sum, group_ranks, shard_layout
from nm_optim.names import AXES, STAT_INDEX, STAT_NAMES, sum_set, sums_mask
from nm_optim.ops.layout import group_counts
from nm_optim.symmetry.base import Symmetry


def describe_value(x: Any) -> str:
    """`x` for an error message: a tensor by its shape and dtype (its repr prints the values,
    thousands of lines for a weight matrix), a sequence item by item, anything else by repr."""
    if isinstance(x, Tensor):
        return f"a tensor of shape {tuple(x.shape)} ({str(x.dtype).removeprefix('torch.')})"
    if isinstance(x, tuple | list):
        inner = ", ".join(describe_value(v) for v in x)
        return f"({inner}{',' if len(x) == 1 else ''})" if isinstance(x, tuple) else f"[{inner}]"
    return repr(x)


def num_groups(shape: Sequence[int], axis: str, block: int = 1) -> int:
    return group_counts(shape, block)[AXES.index(axis)]


def track_asks(spec: Any, param_groups: Sequence[dict[str, Any]]) -> list[tuple[Tensor, Any, Any, Any]]:
    """The (param, axis, sums, block) asks of a `track` argument: None, "layers" (an "all" track
    of all 9 sums for every param) or an iterable of (param, axis) pairs (all 9 sums),
    (param, axis, sums) triples and (param, "cols", sums, block) quadruples. `sums` and `block`
    are as given (None: all 9; no block: None); TrackTable checks them, naming the track."""
    if spec is None:
        return []
    if isinstance(spec, str):
        if spec != "layers":
            raise ValueError(f"track must be 'layers' or a list of (param, axis) pairs, got {spec!r}")
        return [(p, "all", None, None) for group in param_groups for p in group["params"]]
    asks = []
    for item in spec:
        if not (isinstance(item, tuple | list) and len(item) in (2, 3, 4) and isinstance(item[0], Tensor)):
            raise TypeError(f"each track must be a (param, axis) pair, a (param, axis, sums) triple or a "
                            f"(param, 'cols', sums, block) quadruple, got {describe_value(item)}")
        asks.append((item[0], item[1], item[2] if len(item) >= 3 else None, item[3] if len(item) == 4 else None))
    return asks


def _check_block(name: str, axis: str, shape: tuple[int, ...], block: Any) -> int:
    """The column block a track asks for (None: 1); ValueError naming the track otherwise."""
    if block is None:
        return 1
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"track {name}:{axis}: block must be a positive int, got {describe_value(block)}")
    if block != 1 and axis != "cols":
        raise ValueError(f"track {name}:{axis}: block groups columns: it applies to axis 'cols' only")
    if block != 1 and shape[1] % block:
        raise ValueError(f"track {name}:{axis}: the {shape[1]} columns of shape {shape} do not split into blocks "
                         f"of {block}")
    return block


def _check_sums(name: str, axis: str, sums: Any) -> tuple[str, ...]:
    """The sums a track asks for, as a tuple of names (None: all 9); ValueError naming the track
    and the bad name otherwise."""
    if sums is None:
        return STAT_NAMES
    if isinstance(sums, str) or not isinstance(sums, Sequence) or not sums:
        raise ValueError(f"track {name}:{axis}: sums must be a non-empty sequence of names from {STAT_NAMES}, "
                         f"e.g. ('pp', 'gg'), got {describe_value(sums)}")
    bad = [s for s in sums if not isinstance(s, str) or s not in STAT_NAMES]
    if bad:
        raise ValueError(f"track {name}:{axis}: unknown sum {describe_value(bad[0])} in sums {describe_value(sums)}; "
                         f"the sums are {STAT_NAMES}")
    return tuple(sums)


@dataclass(frozen=True)
class Track:
    """One resolved track: a block of `num_groups` rows starting at `row` in the stats tensor of
    `device`. `sums`: the names of the sums its groups hold (one of names.SUM_SETS; the other
    columns read NaN), the same for every track of its param. `block`: the columns per group of a
    "cols" track (1 for the other axes)."""

    name: str
    param: Tensor
    axis: str
    shape: tuple[int, ...]
    num_groups: int
    device: torch.device
    row: int
    sums: tuple[str, ...] = STAT_NAMES
    block: int = 1

    def describe(self) -> dict[str, Any]:
        """The track in a record's meta: "sums" names the columns that hold sums (names.track_sums
        reads a record written before it as all 9), "block" the columns per group (absent in a
        record written before column blocks: 1, nm_optim/record/format.py)."""
        return {
            "name": self.name,
            "axis": self.axis,
            "shape": list(self.shape),
            "num_groups": self.num_groups,
            "dtype": str(self.param.dtype).removeprefix("torch."),
            "sums": list(self.sums),
            "block": self.block,
        }


def _param_names(param_groups: Sequence[dict[str, Any]], fallback: dict[int, str] | None = None) -> dict[int, str]:
    """id(param) -> name: the param group's names, else `fallback` (e.g. a symmetry member's
    name), else "group{i}.param{j}"."""
    names: dict[int, str] = {}
    fallback = fallback or {}
    for gi, group in enumerate(param_groups):
        given = group.get("param_names")
        for pi, p in enumerate(group["params"]):
            names[id(p)] = given[pi] if given is not None else fallback.get(id(p), f"group{gi}.param{pi}")
    return names


def _check_axis(name: str, shape: tuple[int, ...], axis: Any) -> None:
    if axis not in AXES:
        raise ValueError(
            f"track {name!r}: axis must be one of {AXES}, got {describe_value(axis)} (param shape {shape})"
        )
    if axis == "rows" and len(shape) < 1:
        raise ValueError(f"track {name!r}: axis 'rows' needs a tensor with at least 1 dimension, got shape {shape}")
    if axis == "cols" and len(shape) < 2:
        raise ValueError(
            f"track {name!r}: axis 'cols' needs a tensor with at least 2 dimensions, got shape {shape}"
        )


class TrackTable:
    """The optimizer's tracks, their rows in the per-device stats tensors, and the lookup the
    step uses (param -> the first row of its rows / cols / all track, -1 where absent)."""

    def __init__(self, spec: str | Iterable[tuple[Any, ...]] | None, param_groups: Sequence[dict[str, Any]],
                 names: dict[int, str] | None = None):
        self._names = names = _param_names(param_groups, names)
        asks = track_asks(spec, param_groups)
        self._shard_lo: dict[torch.device, int] = {}

        self.tracks: list[Track] = []
        self._slots: dict[tuple[int, str], Track] = {}
        self._rows_used: dict[torch.device, int] = {}
        # Sharded DTensor params: id -> (global offset of this rank's shard, process group).
        shards: dict[int, tuple[tuple[int, ...], Any]] = {}
        # The sums each param's tracks reduce: the union of all its asks, rounded up to a set.
        wanted: dict[int, set[str]] = {}
        # The column block of each param's "cols" track: the gcd of the blocks asked for it.
        blocks: dict[int, int] = {}
        pairs: list[tuple[Tensor, str]] = []
        for p, axis, sums, block in asks:
            if id(p) not in names:
                raise ValueError(
                    f"track on a tensor of shape {tuple(p.shape)} that is not a parameter of this optimizer"
                )
            name = names[id(p)]
            _check_axis(name, tuple(p.shape), axis)
            wanted.setdefault(id(p), set()).update(_check_sums(name, axis, sums))
            b = _check_block(name, axis, tuple(p.shape), block)
            if axis == "cols":
                blocks[id(p)] = math.gcd(blocks.get(id(p), b), b)
            pairs.append((p, axis))
            layout = shard_layout(p, name)
            if layout is not None:
                shards[id(p)] = layout
        self._blocks = {pid: b for pid, b in blocks.items() if b != 1 and pid not in shards}
        self._sums = {pid: sum_set(sorted(want)) for pid, want in wanted.items()}
        self._masks = {pid: sums_mask(sums) for pid, sums in self._sums.items()}
        # Rows: first the tracks of unsharded params, then one block per device of the sharded
        # ones (the block the all-reduce sums); the track list keeps the order of `pairs`.
        for sharded in (False, True):
            for p, axis in pairs:
                if (id(p) in shards) != sharded or (id(p), axis) in self._slots:
                    continue
                if sharded:
                    self._shard_lo.setdefault(p.device, self._rows_used.get(p.device, 0))
                row = self._rows_used.get(p.device, 0)
                shape = tuple(p.shape)
                block = self._blocks.get(id(p), 1) if axis == "cols" else 1
                n = num_groups(shape, axis, block)
                self._slots[(id(p), axis)] = Track(f"{names[id(p)]}:{axis}", p, axis, shape, n, p.device, row,
                                                   self._sums[id(p)], block)
                self._rows_used[p.device] = row + n
        self.tracks = [self._slots[(id(p), axis)] for p, axis in pairs]
        # The op's rows for each param: a shard's "rows" / "cols" groups start at its global
        # offset along dim 0 / 1 (0 for a dim that is not sharded: partial sums, summed by the
        # all-reduce), its "all" group is the track's row.
        self._offsets: dict[int, tuple[int, int, int]] = {}
        for (pid, axis), t in self._slots.items():
            off = shards[pid][0] if pid in shards else ()
            at = t.row + (off[AXES.index(axis)] if axis != "all" and len(off) > AXES.index(axis) else 0)
            r, c, a = self._offsets.get(pid, (-1, -1, -1))
            r, c, a = (at if axis == "rows" else r, at if axis == "cols" else c, at if axis == "all" else a)
            self._offsets[pid] = (r, c, a)
        self._shard_groups: dict[torch.device, Any] = {}
        for (pid, _), t in self._slots.items():
            if pid in shards:
                group = self._shard_groups.setdefault(t.device, shards[pid][1])
                if group is not shards[pid][1] and group_ranks(group) != group_ranks(shards[pid][1]):
                    raise NotImplementedError(
                        f"nm_optim.SGD: tracked params on {t.device} are sharded over different process groups "
                        f"(ranks {group_ranks(group)} and, for {self._names[pid]!r}, "
                        f"{group_ranks(shards[pid][1])}): the statistics of sharded params are combined by one "
                        "all-reduce, over one group")
        self._sharded_tracks = [t for (pid, _), t in self._slots.items() if pid in shards]
        self._checked_params = [t.param for t in self._slots.values()]
        self._checked_shapes = [t.shape for t in self._slots.values()]
        self._checked_devices = [t.device for t in self._slots.values()]
        self.sharded = bool(self._sharded_tracks)
        self._stats: dict[torch.device, Tensor] = {}

    def __len__(self) -> int:
        return len(self.tracks)

    def param_name(self, p: Tensor) -> str:
        """The name this table gives `p` (its tracks are f"{name}:{axis}")."""
        return self._names[id(p)]

    def offsets(self, p: Tensor) -> tuple[int, int, int] | None:
        return self._offsets.get(id(p))

    def sums_mask(self, p: Tensor) -> int | None:
        """The op's bit mask of the sums `p`'s tracks reduce (names.SUM_MASKS), None if untracked."""
        return self._masks.get(id(p))

    def block(self, p: Tensor) -> int:
        """The column block of `p`'s "cols" track (the op's stats_blocks; 1 without one)."""
        return self._blocks.get(id(p), 1)

    def stats(self, device: torch.device) -> Tensor:
        """The float64 [rows, 9] tensor the kernel writes for params on `device`."""
        t = self._stats.get(device)
        if t is None:
            t = torch.full((self._rows_used.get(device, 0), len(STAT_NAMES)), float("nan"),
                           dtype=torch.float64, device=device)
            self._stats[device] = t
        return t

    def begin_step(self, skipped: bool = False) -> None:
        """Groups not stepped this time (no grad, or a step skipped by found_inf) read NaN. The
        sharded block starts at zero (each rank writes only its shards' groups) unless the step
        is `skipped` (then nothing is reduced across ranks and everything reads NaN)."""
        for t in self._stats.values():
            t.fill_(float("nan"))
        if self.sharded and not skipped:
            for device, lo in self._shard_lo.items():
                self.stats(device)[lo:].zero_()

    @disable
    def reduce_across_ranks(self) -> None:
        """After the kernels of a step: the sharded params' statistics of the whole tensors, the
        same on every rank. A sharded param this rank did not step (no grad) makes its groups NaN
        (NaN + x = NaN); then one all-reduce (SUM) per device of the sharded block."""
        for t in self._sharded_tracks:
            if t.param.grad is None:
                r, c, a = self._offsets[id(t.param)]
                at = {"rows": r, "cols": c, "all": a}[t.axis]
                local = t.param._local_tensor.shape  # type: ignore[attr-defined]
                n = 1 if t.axis == "all" else num_groups(local, t.axis)
                self.stats(t.device)[at : at + n] = float("nan")
        for device, lo in self._shard_lo.items():
            all_reduce_sum(self.stats(device)[lo:], self._shard_groups[device])

    def devices(self) -> list[torch.device]:
        return list(self._rows_used)

    def last_stats(self) -> list[Tensor]:
        """One float64 CPU tensor [num_groups, 9] per track, aligned with the track list (NaN in
        the columns of the sums the track does not reduce)."""
        host = {d: self.stats(d).cpu() for d in self._rows_used}
        return [host[t.device][t.row : t.row + t.num_groups].clone() for t in self.tracks]

    def check_unchanged(self) -> None:
        """RuntimeError if a tracked param's shape or device is no longer the one its track's
        rows were laid out for (e.g. ``p.data = smaller``). Called by every step, before it writes
        anything, so the statistics recorded so far all describe the shapes of the tracks."""
        # Two list comparisons per step (a loop comparing each track costs 1000 tracks 0.5 ms);
        # comprehensions, not map(attrgetter): torch.compile traces them.
        params = self._checked_params
        if [p.shape for p in params] != self._checked_shapes or [p.device for p in params] != self._checked_devices:
            for t in self._slots.values():
                p = t.param
                if p.shape != t.shape or p.device != t.device:
                    self._changed(t)

    def _changed(self, t: Track) -> None:
        name = self._names[id(t.param)]
        axes = sorted(a for (pid, a) in self._slots if pid == id(t.param))
        raise RuntimeError(
            f"parameter {name!r} is tracked ({', '.join(axes)}) with shape {t.shape} on {t.device}, the "
            f"shape it had when the optimizer was created, but it is now {tuple(t.param.shape)} on "
            f"{t.param.device}. A track's groups are fixed when the optimizer is created: save the history "
            "recorded so far with opt.recorder.save(path), then re-track the parameter at its new shape by "
            "creating a new nm_optim.SGD with track=[...]."
        )


def with_symmetries(
    track: Any, symmetries: Iterable[Symmetry] | None, param_groups: list[dict[str, Any]]
) -> tuple[Any, dict[int, str] | None, list[Symmetry]]:
    """The track spec with the symmetries' (param, axis) pairs appended where not already there,
    the names the members give their params, and the symmetries as a list.

    A member whose tensor is not a param of this optimizer is matched by its name, which is its
    parameter name in the model (FSDP2's fully_shard replaces a model's Parameter objects and keeps
    their names): to the param the groups name so (named parameters: torch keeps ``param_names``
    in the groups), else to ``model.get_parameter(name)`` of the model find_symmetries found it on
    (nm_optim.symmetry.found_on), when that is a param of this optimizer. The matched param must
    have the member's shape (a DTensor's shape is the whole tensor's). Such a symmetry is replaced
    by a copy on the matched params; the others are kept as they are."""
    import copy
    import dataclasses

    from nm_optim.symmetry.detect import found_on

    syms = list(symmetries) if symmetries is not None else []
    if not syms:
        return track, None, []
    in_optimizer = {id(p) for group in param_groups for p in group["params"]}
    by_name: dict[str, Tensor] = {}
    for group in param_groups:
        if group.get("param_names") is not None:
            by_name.update(zip(group["param_names"], group["params"]))

    def match(sym: Symmetry, m: Any) -> Tensor:
        p = by_name.get(m.name)
        model = found_on(sym)
        if p is None and model is not None:
            try:
                p = model.get_parameter(m.name)
            except AttributeError:
                p = None
        if p is None or id(p) not in in_optimizer:
            raise ValueError(
                f"{sym.kind} {sym.name!r}: member {m.name!r} is not a parameter of this optimizer, and no parameter "
                f"of it is named {m.name!r}. Pass the parameters of the model the symmetries were found on "
                "(nm_optim.SGD(model.parameters(), symmetries=syms), or model.named_parameters()); where the "
                "model's parameters were replaced since (FSDP2's fully_shard does: find the symmetries before "
                "it, build the optimizer after it), members are matched by name through that model or through "
                "named parameters (the only way for symmetries built by hand)"
            )
        if tuple(p.shape) != tuple(m.shape):
            raise ValueError(
                f"{sym.kind} {sym.name!r}: member {m.name!r} has shape {tuple(m.shape)}, the parameter of this "
                f"optimizer named so has shape {tuple(p.shape)}: find the symmetries again on the model as it is"
            )
        return p

    for i, sym in enumerate(syms):
        if not isinstance(sym, Symmetry):
            raise TypeError(f"symmetries must be nm_optim Symmetry objects, got {type(sym).__name__}")
        if any(m.param is not None and id(m.param) not in in_optimizer for m in sym.members):
            bound = copy.copy(sym)
            bound.members = tuple(
                m if m.param is None or id(m.param) in in_optimizer else dataclasses.replace(m, param=match(sym, m))
                for m in sym.members
            )
            syms[i] = bound
    asks: list[Any] = track_asks(track, param_groups)
    # A symmetry's track asks for the sums its law reads, and a "cols" track for the column block
    # of its member (the columns after a Flatten that one channel feeds: fewer groups to reduce,
    # nm_optim/tracks.py); one already asked for (by `track` or another symmetry) keeps its place
    # and asks for the union of the sums and the gcd of the blocks.
    at: dict[tuple[int, str], int] = {}
    for i, (p, axis, _, _) in enumerate(asks):
        at.setdefault((id(p), axis), i)
    names: dict[int, str] = {}
    for sym in syms:
        for p, axis, law, block in sym.track_asks():
            i = at.get((id(p), axis))
            if i is None:
                at[(id(p), axis)] = len(asks)
                asks.append((p, axis, law, block))
                continue
            _, _, sums, had = asks[i]
            if _names_only(sums):  # None: all 9 already; a bad ask stays, for TrackTable to name
                sums = tuple(dict.fromkeys((*sums, *law)))
            if axis == "cols" and (had is None or (isinstance(had, int) and not isinstance(had, bool) and had >= 1)):
                had = math.gcd(1 if had is None else had, block)
            asks[i] = (p, axis, sums, had)
        for m in sym.members:
            if names.setdefault(id(m.param), m.name) != m.name:
                raise ValueError(f"{sym.kind} {sym.name!r}: one parameter is named both {names[id(m.param)]!r} and "
                                 f"{m.name!r} by the symmetries")
    taken = Counter(names.values())
    if any(k > 1 for k in taken.values()):
        twice = sorted(n for n, k in taken.items() if k > 1)
        raise ValueError(f"symmetries give different parameters the same name: {twice}")
    return asks, names, syms


def _names_only(sums: Any) -> bool:
    """Whether a track's `sums` is a non-empty sequence of STAT_NAMES (not None, not a str)."""
    return (isinstance(sums, Sequence) and not isinstance(sums, str) and len(sums) > 0
            and all(isinstance(n, str) and n in STAT_INDEX for n in sums))
