"""The symmetry data model: a `Symmetry` is a set of `Member`s (parameter, kernel track axis,
role), built by hand (`Translation`, `Scale`, `Rescale`), by `find_symmetries` or from a record's
descriptions (`symmetries_from_record`), and read back from a record as per-group sums
(`Symmetry.group_stats`, `hyper`, `first`). See docs/architecture.md, "Symmetries".

This module needs torch only for the members' tensors; it imports nothing from the optimizer, the
op or the recorder (a record is anything with the attributes read below: meta, steps, tracks,
stats, hyper, first), so the optimizer may import it without a cycle.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from nm_optim.names import AXES, HYPER_NAMES, KINDS, LAW_SUMS, ROLES, STAT_NAMES, track_sums

__all__ = ["Member", "Rescale", "Scale", "Symmetry", "Translation", "symmetries_from_record"]


@dataclass(frozen=True, eq=False)
class Member:
    """One parameter's part in a symmetry: its groups are the kernel track (param, axis).

    `role` is "A" (translation, scale) or "A1" (incoming) / "A2" (outgoing) for a rescale.
    `block` (axis "cols" only): that many consecutive columns form one group, e.g. a conv channel's
    H*W inputs of the Linear after a Flatten. `index` (axis "rows" or "cols"): the symmetry group
    of every row (column) of the track, -1 for one that is not a member: a slice of a fused
    projection (the key rows E..2E-1 of nn.MultiheadAttention's in_proj_weight), the rows of one
    attention head as one group, the two rotary dimensions of a pair, the query heads sharing one
    key head. Groups are sums over the track's rows (columns): no new kernel work, the kernel
    reduces every row and `group_stats` adds them up. `shape` is filled from `param`; it is needed
    only when `param` is None (a member rebuilt from a record's description)."""

    param: Tensor | None
    name: str
    axis: str
    role: str
    block: int = 1
    shape: tuple[int, ...] | None = None
    index: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Member name must be a non-empty str, got {self.name!r}")
        if self.axis not in AXES:
            raise ValueError(f"Member {self.name!r}: axis must be one of {AXES}, got {self.axis!r}")
        if self.role not in ("A", "A1", "A2"):
            raise ValueError(f"Member {self.name!r}: role must be 'A', 'A1' or 'A2', got {self.role!r}")
        if isinstance(self.block, bool) or not isinstance(self.block, int) or self.block < 1:
            raise ValueError(f"Member {self.name!r}: block must be a positive int, got {self.block!r}")
        if self.block != 1 and self.axis != "cols":
            raise ValueError(f"Member {self.name!r}: block applies to axis 'cols' only (axis is {self.axis!r})")
        if self.param is not None:
            if not isinstance(self.param, Tensor):
                raise TypeError(f"Member {self.name!r}: param must be a tensor or None, got {type(self.param).__name__}")
            shape = tuple(self.param.shape)
            if self.shape is not None and tuple(self.shape) != shape:
                raise ValueError(f"Member {self.name!r}: shape {tuple(self.shape)} != the param's shape {shape}")
            object.__setattr__(self, "shape", shape)
        elif self.shape is None:
            raise ValueError(f"Member {self.name!r}: give a param or its shape")
        else:
            object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        need = {"rows": 1, "cols": 2, "all": 0}[self.axis]
        if len(self.shape) < need:
            raise ValueError(f"Member {self.name!r}: axis {self.axis!r} needs >= {need} dims, got shape {self.shape}")
        if self.axis == "cols" and self.shape[1] % self.block:
            raise ValueError(f"Member {self.name!r}: {self.shape[1]} columns do not split into blocks of {self.block}")
        if self.index is not None:
            self._check_index()

    def _check_index(self) -> None:
        if self.axis == "all" or self.block != 1:
            raise ValueError(f"Member {self.name!r}: index applies to axis 'rows' or 'cols' without block")
        index = tuple(int(i) for i in self.index)
        length = self.shape[0] if self.axis == "rows" else self.shape[1]
        if len(index) != length:
            raise ValueError(f"Member {self.name!r}: index has {len(index)} entries, the track has {length} {self.axis}")
        used = sorted({i for i in index if i != -1})
        if any(i < -1 for i in index) or not used or used != list(range(len(used))):
            raise ValueError(f"Member {self.name!r}: index must map every {self.axis[:-1]} to a group 0..n-1 (each "
                             "used) or -1")
        object.__setattr__(self, "index", index)

    @property
    def track(self) -> str:
        """The name of this member's track in a record: f"{name}:{axis}"."""
        return f"{self.name}:{self.axis}"

    @property
    def num_groups(self) -> int:
        if self.axis == "all":
            return 1
        if self.index is not None:
            return max(self.index) + 1
        return self.shape[0] if self.axis == "rows" else self.shape[1] // self.block

    def _index_tensor(self, device: torch.device) -> Tensor:
        return torch.tensor(self.index, dtype=torch.long, device=device)

    def reduce(self, t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """Per-group sums [num_groups] of an elementwise quantity `t` of the member's shape
        (accumulated in `dtype` if given)."""
        if self.axis == "all":
            return t.sum(dtype=dtype).reshape(1)
        d0, d1 = t.shape[0], t.shape[1] if t.dim() > 1 else 1
        if self.axis == "rows":
            s = t.reshape(d0, d1 * math.prod(t.shape[2:])).sum(1, dtype=dtype)
        else:
            s = t.reshape(d0, d1, math.prod(t.shape[2:])).sum((0, 2), dtype=dtype)
        if self.index is not None:
            idx = self._index_tensor(s.device)
            keep = idx >= 0
            return torch.zeros(self.num_groups, dtype=s.dtype, device=s.device).index_add_(0, idx[keep], s[keep])
        return s.reshape(-1, self.block).sum(1) if self.block > 1 else s

    def expand(self, c: Tensor) -> Tensor:
        """Per-group values [num_groups] broadcast to the member's shape (0 on the rows or
        columns that `index` leaves out)."""
        dims = len(self.shape)
        if self.axis == "all":
            return c.reshape([1] * dims).expand(self.shape)
        if self.index is not None:
            idx = self._index_tensor(c.device)
            c = torch.where(idx >= 0, c[idx.clamp_min(0)], torch.zeros((), dtype=c.dtype, device=c.device))
        if self.axis == "rows":
            return c.reshape(-1, *[1] * (dims - 1)).expand(self.shape)
        if self.block > 1:
            c = c.repeat_interleave(self.block)
        return c.reshape(1, -1, *[1] * (dims - 2)).expand(self.shape)

    def fold(self, s: np.ndarray) -> np.ndarray:
        """A record's per-row (per-column) statistics [steps, rows, 9] of the member's track
        summed into its groups [steps, num_groups, 9]. A "cols" track may hold a column block of
        its own (nm_optim/tracks.py): a divisor of the member's, whose groups are then summed
        block / track's block at a time (none when the track's block is the member's)."""
        steps = s.shape[0]
        if self.index is not None:
            idx = np.asarray(self.index)
            keep = np.flatnonzero(idx >= 0)
            order = keep[np.argsort(idx[keep], kind="stable")]
            starts = np.flatnonzero(np.r_[True, np.diff(idx[order]) != 0])
            return np.add.reduceat(s[:, order], starts, axis=1)
        if self.axis == "cols" and self.block > 1 and s.shape[1] != self.num_groups:
            if s.shape[1] % self.num_groups:
                raise ValueError(f"member {self.track!r}: its track holds {s.shape[1]} column groups, which do not "
                                 f"fold into its {self.num_groups} groups of {self.block} columns")
            return s.reshape(steps, self.num_groups, s.shape[1] // self.num_groups, s.shape[-1]).sum(2)
        return s

    def describe(self) -> dict[str, Any]:
        """JSON-able. An index map is written as runs [first, length, step] of arithmetic
        progressions (a fused projection's slice is 2-3 runs, not 3E numbers)."""
        out = {"name": self.name, "axis": self.axis, "role": self.role, "block": self.block, "shape": list(self.shape)}
        if self.index is not None:
            out["index_runs"] = index_runs(self.index)
        return out

    def __repr__(self) -> str:
        block = f", block={self.block}" if self.block != 1 else ""
        if self.index is not None:
            used = sum(i >= 0 for i in self.index)
            block += f", {used} of {len(self.index)} {self.axis} in {self.num_groups} groups"
        return f"Member({self.track}, role={self.role}, shape={self.shape}{block})"


def index_runs(index: Sequence[int]) -> list[list[int]]:
    """`index` as runs [first, length, step]: index[p + i] = first + i * step."""
    runs: list[list[int]] = []
    p = 0
    while p < len(index):
        step = index[p + 1] - index[p] if p + 1 < len(index) else 0
        n = 1
        while p + n < len(index) and index[p + n] - index[p + n - 1] == step:
            n += 1
        runs.append([int(index[p]), n, int(step) if n > 1 else 0])
        p += n
    return runs


def index_from_runs(runs: Sequence[Sequence[int]]) -> tuple[int, ...]:
    """The index map `index_runs` wrote."""
    out: list[int] = []
    for run in runs:
        if len(run) != 3 or int(run[1]) < 1:
            raise ValueError(f"an index run must be [first, length >= 1, step], got {run!r}")
        first, n, step = (int(v) for v in run)
        out += [first + i * step for i in range(n)]
    return tuple(out)


class Symmetry:
    """Base of Translation, Scale and Rescale: a kind, a readable name, members and groups.

    Build the subclasses by hand (their constructors take the tensors) or with `find_symmetries`;
    `Symmetry.from_description(d)` rebuilds one from `describe()` (e.g. from a saved record's
    ``meta["symmetries"]``) without tensors, enough for `group_stats`, `hyper` and `first`."""

    kind: ClassVar[str] = ""

    def _setup(self, name: str, members: Sequence[Member]) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"{type(self).__name__}: name must be a non-empty str, got {name!r}")
        self.name = name
        self.members: tuple[Member, ...] = tuple(members)
        roles = ROLES[self.kind]
        for m in self.members:
            if not isinstance(m, Member):
                raise TypeError(f"{self.kind} {name!r}: members must be Member objects, got {type(m).__name__}")
            if m.role not in roles:
                raise ValueError(f"{self.kind} {name!r}: member {m.name!r} has role {m.role!r}, expected one of {roles}")
        for role in roles:
            if not any(m.role == role for m in self.members):
                raise ValueError(f"{self.kind} {name!r}: no member with role {role!r}")
        self._offsets, self.num_groups = self._layout()

    def _layout(self) -> tuple[list[int], int]:
        """Where each member's groups start among the symmetry's groups, and how many there are:
        every member covers all groups (scale, rescale); translation puts "all" members after the
        columns."""
        counts = {m.num_groups for m in self.members if self.kind != "translation" or m.axis != "all"}
        if len(counts) != 1:
            detail = ", ".join(f"{m.track}: {m.num_groups}" for m in self.members)
            raise ValueError(f"{self.kind} {self.name!r}: members have different numbers of groups ({detail})")
        n = counts.pop()
        if self.kind == "translation" and any(m.axis == "all" for m in self.members):
            return [n if m.axis == "all" else 0 for m in self.members], n + 1
        return [0] * len(self.members), n

    @classmethod
    def from_members(cls, kind: str, name: str, members: Sequence[Member]) -> Symmetry:
        """A symmetry of `kind` made of the given members: what the constructors build, for the
        groups they do not spell (a slice of a fused projection, a group of rows per attention
        head, several tensors scaled together), e.g. the key rows of a fused in_proj_weight
        rescaled against the query rows (nm_optim.symmetry.structural builds these)."""
        classes = {c.kind: c for c in (Translation, Scale, Rescale)}
        if kind not in classes:
            raise ValueError(f"unknown symmetry kind {kind!r} (expected one of {KINDS})")
        sym = classes[kind].__new__(classes[kind])
        sym._setup(name, members)
        return sym

    # -- what the optimizer needs ----------------------------------------------------------------
    def tracks(self) -> list[tuple[Tensor, str]]:
        """(param, axis) pairs for nm_optim.SGD's track list, without duplicates."""
        out: list[tuple[Tensor, str]] = []
        seen: set[tuple[int, str]] = set()
        for m in self.members:
            if m.param is None:
                raise ValueError(
                    f"{self.kind} {self.name!r} was rebuilt from a description and has no tensors; build it from the "
                    "model (find_symmetries or the constructors) to track it"
                )
            if (id(m.param), m.axis) not in seen:
                seen.add((id(m.param), m.axis))
                out.append((m.param, m.axis))
        return out

    def track_asks(self) -> list[tuple[Tensor, str, tuple[str, ...], int]]:
        """(param, axis, sums, block) for nm_optim.SGD's track list: the tracks of `tracks`, each
        asking for the sums this kind's law reads (names.LAW_SUMS) and, on a "cols" track, for
        its members' column block (the columns one channel feeds after a Flatten: the kernels then
        reduce one group per channel, nm_optim/tracks.py; the gcd where members differ)."""
        pairs = self.tracks()  # raises for a symmetry without tensors
        blocks: dict[tuple[int, str], int] = {}
        for m in self.members:
            key = (id(m.param), m.axis)
            blocks[key] = math.gcd(blocks.get(key, 0), m.block)
        return [(p, axis, LAW_SUMS[self.kind], blocks[(id(p), axis)]) for p, axis in pairs]

    def describe(self) -> dict[str, Any]:
        """JSON-able: kind, name, num_groups and the members (name, axis, role, block, shape)."""
        return {"kind": self.kind, "name": self.name, "num_groups": self.num_groups,
                "members": [m.describe() for m in self.members]}

    @classmethod
    def from_description(cls, d: dict[str, Any]) -> Symmetry:
        """The symmetry `describe()` gave, with params None."""
        kind = d.get("kind")
        classes = {c.kind: c for c in (Translation, Scale, Rescale)}
        if kind not in classes:
            raise ValueError(f"unknown symmetry kind {kind!r} (expected one of {KINDS})")
        if cls is not Symmetry and cls.kind != kind:
            raise ValueError(f"{cls.__name__}.from_description got a {kind} description")
        sym = classes[kind].__new__(classes[kind])
        members = [Member(None, m["name"], m["axis"], m["role"], int(m.get("block", 1)), tuple(m["shape"]),
                          index_from_runs(m["index_runs"]) if m.get("index_runs") is not None else None)
                   for m in d["members"]]
        sym._setup(d["name"], members)
        if "num_groups" in d and int(d["num_groups"]) != sym.num_groups:
            raise ValueError(f"{kind} {d['name']!r}: description says {d['num_groups']} groups, members give "
                             f"{sym.num_groups}")
        return sym

    # -- reading a record ----------------------------------------------------------------------
    def _track_indices(self, record: Any) -> list[int]:
        index = {t["name"]: i for i, t in enumerate(record.tracks)}
        out = []
        for m in self.members:
            i = index.get(m.track)
            if i is None:
                raise KeyError(
                    f"{self.kind} {self.name!r}: the record has no track {m.track!r} (it has "
                    f"{', '.join(sorted(index)) or 'none'}); train with nm_optim.SGD(..., symmetries=[...]) or "
                    "use the record's own descriptions: nm_optim.symmetry.symmetries_from_record(record)"
                )
            if tuple(record.tracks[i]["shape"]) != m.shape:
                raise ValueError(f"{self.kind} {self.name!r}: track {m.track!r} has shape "
                                 f"{tuple(record.tracks[i]['shape'])} in the record, the member {m.shape}")
            out.append(i)
        return out

    def param_groups(self, record: Any) -> list[int]:
        """The optimizer param groups holding the members (the record's tracks carry theirs), in
        the order the members first appear."""
        out: list[int] = []
        for m, i in zip(self.members, self._track_indices(record)):
            g = int(record.tracks[i].get("param_group", 0))
            if g < 0 or g >= np.shape(record.hyper[HYPER_NAMES[0]])[1]:
                raise ValueError(f"{self.kind} {self.name!r}: track {m.track!r} is in no param group of the record "
                                 f"(param_group {g})")
            if g not in out:
                out.append(g)
        return out

    def _in_group(self, record: Any, param_group: int | None) -> list[bool]:
        """Per member: whether it belongs to `param_group` (None: every member)."""
        if param_group is None:
            return [True] * len(self.members)
        groups = self.param_groups(record)
        if param_group not in groups:
            raise ValueError(f"{self.kind} {self.name!r}: no member is in param_group {param_group!r} "
                             f"(its members are in {groups})")
        return [int(record.tracks[i].get("param_group", 0)) == param_group for i in self._track_indices(record)]

    def group_stats(self, record: Any, param_group: int | None = None) -> dict[str, np.ndarray]:
        """role -> float64 [steps, num_groups, 9]: the 9 sums (STAT_NAMES order) of every group,
        summed over the role's members (a block of columns folded into its group). Rescale gives
        "A1" (incoming) and "A2" (outgoing); translation and scale give "A".

        `param_group`: only the members in that optimizer param group (the others count 0), so
        that members with different hyper-parameters can be stepped each with its own
        (nm_optim.theory.parts_of).

        The record's tracks must hold the sums the symmetry's law reads (names.LAW_SUMS): a
        track that reduced only some (nm_optim.tracks, "statistics by need") holds NaN in the
        others, and a ValueError names the track and the missing sums rather than let the law run
        on NaN."""
        steps = len(record.steps)
        out = {role: np.zeros((steps, self.num_groups, len(STAT_NAMES))) for role in ROLES[self.kind]}
        chosen = self._in_group(record, param_group)
        indices = self._track_indices(record)
        self.check_sums(record, indices)
        for m, off, i, use in zip(self.members, self._offsets, indices, chosen):
            if not use:
                continue
            s = m.fold(np.asarray(record.stats[i], dtype=np.float64))
            out[m.role][:, off : off + m.num_groups] += s
        return out

    def check_sums(self, record: Any, indices: list[int] | None = None) -> None:
        """ValueError unless every member's track in `record` holds the sums this kind's law reads
        (names.LAW_SUMS; names.track_sums: a record written before tracks said so holds all 9)."""
        need = LAW_SUMS[self.kind]
        for m, i in zip(self.members, self._track_indices(record) if indices is None else indices):
            have = track_sums(record.tracks[i])
            missing = [n for n in need if n not in have]
            if missing:
                raise ValueError(
                    f"{self.kind} {self.name!r}: track {m.track!r} recorded only the sums {list(have)}, and the "
                    f"{self.kind} law needs {list(need)}: missing {missing}. Track it with those sums (nm_optim.SGD("
                    f"..., symmetries=[...]) asks for them, or track=[(param, {m.axis!r}, sums)])"
                )

    def hyper(self, record: Any, param_group: int | None = None) -> dict[str, np.ndarray]:
        """Hyper-parameter name -> [steps]: those of the param group holding the members, or of
        `param_group`. Members in several param groups share one set only where the groups'
        values are equal at every step; otherwise there is no one set and this raises: read each
        group's with `param_group=` (`param_groups` lists them; nm_optim.theory steps every
        member with its own)."""
        groups = self.param_groups(record) if param_group is None else [param_group]
        if param_group is not None:
            self._in_group(record, param_group)
        for name in HYPER_NAMES:
            cols = np.asarray(record.hyper[name])[:, groups]
            if not all(np.array_equal(cols[:, 0], cols[:, k], equal_nan=True) for k in range(1, len(groups))):
                raise ValueError(
                    f"{self.kind} {self.name!r}: its members sit in param groups {groups} with different {name!r}: "
                    "there is no one set of hyper-parameters; read each group's with hyper(record, param_group=g) "
                    "(nm_optim.theory steps each member with its own)"
                )
        return {name: np.asarray(record.hyper[name][:, groups[0]], dtype=np.float64) for name in HYPER_NAMES}

    def first(self, record: Any, param_group: int | None = None) -> np.ndarray:
        """[steps] bool: the steps at which a member's param (of `param_group`, if given) created
        its momentum buffer."""
        chosen = np.flatnonzero(self._in_group(record, param_group))
        return np.asarray(record.first)[:, np.asarray(self._track_indices(record))[chosen]].any(axis=1)

    def __repr__(self) -> str:
        parts = " + ".join(f"{m.track}{'/' + str(m.block) if m.block > 1 else ''}[{m.role}]" for m in self.members)
        return f"{type(self).__name__}({self.name!r}, {self.num_groups} groups: {parts})"


def _check_tensor(what: str, t: Any, dims: int | None = None, at_least: int = 0) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{what} must be a tensor, got {type(t).__name__}")
    if dims is not None and t.dim() != dims:
        raise ValueError(f"{what} must have {dims} dims, got shape {tuple(t.shape)}")
    if t.dim() < at_least:
        raise ValueError(f"{what} must have at least {at_least} dims, got shape {tuple(t.shape)}")


def _check_bias(what: str, bias: Tensor, n: int) -> None:
    _check_tensor(what, bias, dims=1)
    if bias.shape[0] != n:
        raise ValueError(f"{what} has {bias.shape[0]} elements, expected {n}")


class Translation(Symmetry):
    """Softmax's translation symmetry on the final Linear W (C, D), b (C): θ_A ↦ θ_A + α·1.

    Groups 0..D-1 are the columns of W (adding α to column j adds α·x_j to every logit), group D is
    the bias. Holds when the logits go into softmax / log_softmax / cross-entropy over the class
    dim. `name` is the layer's module name; the param names default to name.weight / name.bias."""

    kind = "translation"

    def __init__(self, weight: Tensor, bias: Tensor | None = None, *, name: str, weight_name: str | None = None,
                 bias_name: str | None = None) -> None:
        _check_tensor(f"Translation {name!r}: weight", weight, dims=2)
        members = [Member(weight, weight_name or f"{name}.weight", "cols", "A")]
        if bias is not None:
            _check_bias(f"Translation {name!r}: bias", bias, weight.shape[0])
            members.append(Member(bias, bias_name or f"{name}.bias", "all", "A"))
        self._setup(name, members)


class Scale(Symmetry):
    """A normalised layer's scale symmetry: θ_A ↦ α θ_A per output channel o (row o of the weight
    plus b[o]), for a Conv/Linear whose output is normalised per channel with batch statistics."""

    kind = "scale"

    def __init__(self, weight: Tensor, bias: Tensor | None = None, *, name: str, weight_name: str | None = None,
                 bias_name: str | None = None) -> None:
        _check_tensor(f"Scale {name!r}: weight", weight, at_least=1)
        members = [Member(weight, weight_name or f"{name}.weight", "rows", "A")]
        if bias is not None:
            _check_bias(f"Scale {name!r}: bias", bias, weight.shape[0])
            members.append(Member(bias, bias_name or f"{name}.bias", "rows", "A"))
        self._setup(name, members)


class Rescale(Symmetry):
    """Rescale symmetry of hidden unit c between two layers through a positively homogeneous
    activation (ReLU, max-pool...): (θ_A1, θ_A2) ↦ (α θ_A1, θ_A2 / α) with A1 = row c of the
    incoming weight plus its bias[c] and A2 = column c of the outgoing weight (columns
    c*block .. c*block+block-1 when a Flatten sits between a conv and a Linear).

    With `name` "first->second" (module names) the param names default to first.weight,
    first.bias and second.weight; otherwise give them."""

    kind = "rescale"

    def __init__(self, incoming_weight: Tensor, outgoing_weight: Tensor, incoming_bias: Tensor | None = None, *,
                 block: int = 1, name: str, incoming_weight_name: str | None = None,
                 incoming_bias_name: str | None = None, outgoing_weight_name: str | None = None) -> None:
        _check_tensor(f"Rescale {name!r}: incoming_weight", incoming_weight, at_least=1)
        _check_tensor(f"Rescale {name!r}: outgoing_weight", outgoing_weight, at_least=2)
        first, arrow, second = name.partition("->") if isinstance(name, str) else ("", "", "")
        names = [incoming_weight_name, incoming_bias_name if incoming_bias is not None else "", outgoing_weight_name]
        if not arrow and not all(names):
            raise ValueError(f"Rescale {name!r}: give incoming_weight_name, outgoing_weight_name (and "
                             "incoming_bias_name), or a name 'first->second' made of the two module names")
        hidden = incoming_weight.shape[0]
        if outgoing_weight.shape[1] != hidden * block:
            raise ValueError(f"Rescale {name!r}: outgoing_weight has {outgoing_weight.shape[1]} columns; the incoming "
                             f"weight's {hidden} rows with block={block} need {hidden * block}")
        members = [
            Member(incoming_weight, incoming_weight_name or f"{first}.weight", "rows", "A1"),
            Member(outgoing_weight, outgoing_weight_name or f"{second}.weight", "cols", "A2", block),
        ]
        if incoming_bias is not None:
            _check_bias(f"Rescale {name!r}: incoming_bias", incoming_bias, hidden)
            members.insert(1, Member(incoming_bias, incoming_bias_name or f"{first}.bias", "rows", "A1"))
        self._setup(name, members)


def symmetries_from_record(record: Any) -> list[Symmetry]:
    """The symmetries an nm_optim.SGD(..., symmetries=...) run stored in its record (no tensors)."""
    described = record.meta.get("symmetries")
    if not described:
        raise ValueError(
            "the record describes no symmetries (meta['symmetries'] is missing); train with "
            "nm_optim.SGD(..., symmetries=syms) or pass symmetries= explicitly"
        )
    return [Symmetry.from_description(d) for d in described]
