"""Symmetries of real networks: which parameter groups they act on, how to find them, and a check
that they hold (the seed's Part 1; ARCHITECTURE.md, "Symmetries of real networks").

A symmetry is a set of `Member`s: (parameter, kernel track axis, role). Its groups are what the
conservation laws are about:

| kind | generator on group A | groups (PyTorch shapes) |
|---|---|---|
| `Translation` | θ_A ↦ θ_A + α·1 | final Linear W (C, D) before softmax: column j of W (groups 0..D-1) and the bias as one group (group D) |
| `Scale` | θ_A ↦ α θ_A | layer followed by BatchNorm: output channel o = row o of W plus b[o] |
| `Rescale` | (θ_A1, θ_A2) ↦ (α θ_A1, θ_A2 / α) | hidden unit c: A1 = row c of W_l plus b_l[c], A2 = column c of W_{l+1} (a block of columns after a Flatten) |

    syms = nm_optim.find_symmetries(model, example_inputs)          # torch.fx
    report = nm_optim.verify_symmetries(model, loss_fn, (x, y), syms)  # gradient and Hessian constraints
    print(report.table())
    opt = nm_optim.SGD(model.parameters(), lr=0.1, symmetries=syms)  # their tracks, one pass
    ...
    sym.group_stats(opt.recorder.snapshot())   # role -> [steps, groups, 9] sums per symmetry group

Layers the detector does not know can be described by hand, e.g. a BatchNorm's affine parameters
feeding a conv through a ReLU: ``Rescale(bn.weight, conv.weight, bn.bias, name="bn1->conv2")``.

The detector is conservative: it claims a symmetry only on a pattern it can prove from the traced
graph (exact module types, each layer called once, no shared or functionally used parameters, no
hooks or parametrizations, every intermediate value used once), so residual additions, weight
sharing, BatchNorm in eval mode, non-homogeneous activations and in-place tricks on the way all
mean "no symmetry claimed". `verify_symmetries` then checks the claim numerically.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nm_optim.recorder import HYPER_NAMES
from nm_optim.tracks import AXES, STAT_NAMES

__all__ = [
    "KINDS",
    "Member",
    "Rescale",
    "Scale",
    "Symmetry",
    "SymmetryCheck",
    "SymmetryDetectionError",
    "SymmetryReport",
    "Translation",
    "find_symmetries",
    "symmetries_from_record",
    "verify_symmetries",
]

log = logging.getLogger(__name__)

KINDS = ("translation", "scale", "rescale")
ROLES = {"translation": ("A",), "scale": ("A",), "rescale": ("A1", "A2")}


# ================================================================================================
# Members and symmetries
# ================================================================================================
@dataclass(frozen=True, eq=False)
class Member:
    """One parameter's part in a symmetry: its groups are the kernel track (param, axis).

    `role` is "A" (translation, scale) or "A1" (incoming) / "A2" (outgoing) for a rescale.
    `block` (axis "cols" only): that many consecutive columns form one group, e.g. a conv channel's
    H*W inputs of the Linear after a Flatten. `shape` is filled from `param`; it is needed only
    when `param` is None (a member rebuilt from a record's description)."""

    param: Tensor | None
    name: str
    axis: str
    role: str
    block: int = 1
    shape: tuple[int, ...] | None = None

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

    @property
    def track(self) -> str:
        """The name of this member's track in a record: f"{name}:{axis}"."""
        return f"{self.name}:{self.axis}"

    @property
    def num_groups(self) -> int:
        if self.axis == "all":
            return 1
        return self.shape[0] if self.axis == "rows" else self.shape[1] // self.block

    def reduce(self, t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """Per-group sums [num_groups] of an elementwise quantity `t` of the member's shape
        (accumulated in `dtype` if given)."""
        if self.axis == "all":
            return t.sum(dtype=dtype).reshape(1)
        d0, d1 = t.shape[0], t.shape[1] if t.dim() > 1 else 1
        if self.axis == "rows":
            return t.reshape(d0, d1 * math.prod(t.shape[2:])).sum(1, dtype=dtype)
        s = t.reshape(d0, d1, math.prod(t.shape[2:])).sum((0, 2), dtype=dtype)
        return s.reshape(-1, self.block).sum(1) if self.block > 1 else s

    def expand(self, c: Tensor) -> Tensor:
        """Per-group values [num_groups] broadcast to the member's shape."""
        dims = len(self.shape)
        if self.axis == "all":
            return c.reshape([1] * dims).expand(self.shape)
        if self.axis == "rows":
            return c.reshape(-1, *[1] * (dims - 1)).expand(self.shape)
        if self.block > 1:
            c = c.repeat_interleave(self.block)
        return c.reshape(1, -1, *[1] * (dims - 2)).expand(self.shape)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "axis": self.axis, "role": self.role, "block": self.block, "shape": list(self.shape)}

    def __repr__(self) -> str:
        block = f", block={self.block}" if self.block != 1 else ""
        return f"Member({self.track}, role={self.role}, shape={self.shape}{block})"


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
        members = [Member(None, m["name"], m["axis"], m["role"], int(m.get("block", 1)), tuple(m["shape"]))
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

    def group_stats(self, record: Any) -> dict[str, np.ndarray]:
        """role -> float64 [steps, num_groups, 9]: the 9 sums (STAT_NAMES order) of every group,
        summed over the role's members (a block of columns folded into its group). Rescale gives
        "A1" (incoming) and "A2" (outgoing); translation and scale give "A"."""
        steps = len(record.steps)
        out = {role: np.zeros((steps, self.num_groups, len(STAT_NAMES))) for role in ROLES[self.kind]}
        for m, off, i in zip(self.members, self._offsets, self._track_indices(record)):
            s = np.asarray(record.stats[i], dtype=np.float64)
            if m.axis == "cols" and m.block > 1:
                s = s.reshape(steps, m.num_groups, m.block, len(STAT_NAMES)).sum(2)
            out[m.role][:, off : off + m.num_groups] += s
        return out

    def hyper(self, record: Any) -> dict[str, np.ndarray]:
        """Hyper-parameter name -> [steps]: those of the param group holding the members."""
        groups = sorted({int(record.tracks[i].get("param_group", 0)) for i in self._track_indices(record)})
        for name in HYPER_NAMES:
            cols = record.hyper[name][:, groups]
            if not all(np.array_equal(cols[:, 0], cols[:, k], equal_nan=True) for k in range(1, len(groups))):
                raise ValueError(
                    f"{self.kind} {self.name!r}: its members sit in param groups {groups} with different {name!r}; "
                    "the symmetry's dynamics need one set of hyper-parameters"
                )
        return {name: np.asarray(record.hyper[name][:, groups[0]], dtype=np.float64) for name in HYPER_NAMES}

    def first(self, record: Any) -> np.ndarray:
        """[steps] bool: the steps at which a member's param created its momentum buffer."""
        return np.asarray(record.first)[:, self._track_indices(record)].any(axis=1)

    # -- verification -----------------------------------------------------------------------------
    def _generator(self, m: Member, theta: Tensor) -> Tensor:
        """The generator's elements on member m (translation: 1; scale: θ; rescale: θ_A1, −θ_A2)."""
        if self.kind == "translation":
            return torch.ones_like(theta)
        return -theta if m.role == "A2" else theta

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


# ================================================================================================
# Detection with torch.fx
# ================================================================================================
class SymmetryDetectionError(RuntimeError):
    """find_symmetries could not analyse the model."""


_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
# Identity maps: nothing changes the value (dropout multiplies by a fixed mask: also harmless to
# a per-channel scaling, and so is everything below for positive α).
_TRANSPARENT_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_TRANSPARENT_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, torch.dropout}
# Elementwise and positively homogeneous: f(αx) = α f(x) for α > 0.
_HOMOGENEOUS_MODULES = (nn.ReLU, nn.LeakyReLU)
_HOMOGENEOUS_FUNCTIONS = {F.relu, F.relu_, torch.relu, torch.relu_, F.leaky_relu}
_HOMOGENEOUS_METHODS = {"relu", "relu_"}
# Per channel (dim 1) and positively homogeneous: pooling over the spatial dims.
_POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
                 nn.AdaptiveMaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
                 nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
_POOL_FUNCTIONS = {F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
                   F.adaptive_max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
                   F.adaptive_avg_pool2d, F.adaptive_avg_pool3d}
_FLATTENS = {torch.flatten}
_FLATTEN_METHODS = {"flatten", "view", "reshape"}
_SOFTMAX_MODULES = (nn.Softmax, nn.LogSoftmax)
_SOFTMAX_FUNCTIONS = {F.softmax, F.log_softmax, torch.softmax, torch.log_softmax}
_SOFTMAX_METHODS = {"softmax", "log_softmax"}
_METADATA_METHODS = {"size", "dim", "numel"}


def _is_metadata(n: torch.fx.Node) -> bool:
    """A node that reads only a tensor's shape (x.size(0) feeding a view), not its values."""
    if n.op == "call_method" and n.target in _METADATA_METHODS:
        return True
    return n.op == "call_function" and n.target is getattr and len(n.args) > 1 and n.args[1] in ("shape", "ndim")


def _value_users(n: torch.fx.Node) -> list[torch.fx.Node]:
    return [u for u in n.users if not _is_metadata(u)]


def _only_first_input(user: torch.fx.Node, n: torch.fx.Node) -> bool:
    """`n` is `user`'s first argument and appears nowhere else in its arguments."""
    if not user.args or user.args[0] is not n:
        return False
    rest: list[Any] = []
    torch.fx.node.map_arg((tuple(user.args[1:]), dict(user.kwargs)), rest.append)
    return n not in rest


def _arg(n: torch.fx.Node, pos: int, key: str, default: Any = None) -> Any:
    if key in n.kwargs:
        return n.kwargs[key]
    return n.args[pos] if len(n.args) > pos else default


class _Shapes(torch.fx.Interpreter):
    """Runs the graph (on meta tensors) and keeps every tensor node's shape."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        super().__init__(gm)
        self.shapes: dict[str, tuple[int, ...]] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        out = super().run_node(n)
        if isinstance(out, Tensor):
            self.shapes[n.name] = tuple(out.shape)
        return out


class _ShapeRunner(nn.Module):
    def __init__(self, gm: torch.fx.GraphModule) -> None:
        super().__init__()
        self.gm = gm
        self.interpreter = _Shapes(gm)

    def forward(self, *args: Any) -> Any:
        return self.interpreter.run(*args)


def _propagate_shapes(gm: torch.fx.GraphModule, inputs: tuple[Any, ...]) -> dict[str, tuple[int, ...]]:
    """Every node's output shape, computed on the meta device: no FLOPs, and the model's
    BatchNorm running statistics are left untouched."""
    runner = _ShapeRunner(gm)
    state = {f"gm.{k}": torch.empty_like(v, device="meta")
             for k, v in [*gm.named_parameters(), *gm.named_buffers()]}
    meta_inputs = tuple(torch.empty_like(x, device="meta") if isinstance(x, Tensor) else x for x in inputs)
    with torch.no_grad():
        torch.func.functional_call(runner, state, meta_inputs)
    return runner.interpreter.shapes


class _Graph:
    """The traced model and the facts the patterns need."""

    def __init__(self, model: nn.Module, inputs: tuple[Any, ...]) -> None:
        try:
            self.gm = torch.fx.symbolic_trace(model)
        except Exception as e:
            raise SymmetryDetectionError(
                f"find_symmetries: torch.fx cannot trace {type(model).__name__} ({type(e).__name__}: {e}). Build its "
                "symmetries by hand with nm_optim.Translation / Scale / Rescale, or call find_symmetries on a "
                "traceable submodule (e.g. model.features) and combine the results"
            ) from e
        try:
            self.shapes = _propagate_shapes(self.gm, inputs)
        except Exception as e:
            raise SymmetryDetectionError(
                f"find_symmetries: running {type(model).__name__} on the example inputs failed ({type(e).__name__}: "
                f"{e}); pass example_inputs the model accepts (a tensor or a tuple of positional arguments; a batch "
                "of at least 2 for BatchNorm in training mode)"
            ) from e
        self.modules = dict(self.gm.named_modules())
        self.calls = Counter(n.target for n in self.gm.graph.nodes if n.op == "call_module")
        self.names: dict[int, str] = {}
        copies = Counter()
        for name, p in model.named_parameters(remove_duplicate=False):
            self.names.setdefault(id(p), name)
            copies[id(p)] += 1
        self.shared = {pid for pid, k in copies.items() if k > 1}
        self.functional: set[int] = set()  # params (or modules' params) read by get_attr nodes
        for n in self.gm.graph.nodes:
            if n.op == "get_attr":
                obj = self.gm
                for part in str(n.target).split("."):
                    obj = getattr(obj, part)
                tensors = [obj] if isinstance(obj, Tensor) else list(obj.parameters()) if isinstance(obj, nn.Module) else []
                self.functional.update(id(t) for t in tensors)

    def module(self, n: torch.fx.Node) -> nn.Module | None:
        return self.modules.get(n.target) if n.op == "call_module" else None

    def clean_layer(self, n: torch.fx.Node, types: tuple[type, ...] = _LAYERS) -> nn.Module | None:
        """The Linear/Conv module that node n calls, if its parameters take part in nothing else:
        an exact layer type (a subclass may change forward), called once, no hooks or
        parametrizations, no parameter shared with another module or read functionally."""
        m = self.module(n)
        if m is None or type(m) not in types or self.calls[n.target] != 1:
            return None
        if m._forward_hooks or m._forward_pre_hooks or torch.nn.utils.parametrize.is_parametrized(m):
            return None
        if isinstance(m, _CONVS) and m.padding_mode != "zeros":
            return None
        for p in m.parameters(recurse=False):
            if id(p) in self.shared or id(p) in self.functional:
                return None
        return m

    def shape(self, n: torch.fx.Node) -> tuple[int, ...] | None:
        return self.shapes.get(n.name)

    def walk(self, n: torch.fx.Node, step: Callable[[torch.fx.Node], bool]) -> torch.fx.Node | None:
        """Follow n's single value user while `step(user)` accepts it; return the first user it
        does not accept (None where a value has several users or is not the user's first input)."""
        while True:
            users = _value_users(n)
            if len(users) != 1 or not _only_first_input(users[0], n):
                return None
            u = users[0]
            if not step(u):
                return u
            n = u


def _transparent(g: _Graph, u: torch.fx.Node) -> bool:
    m = g.module(u)
    if m is not None:
        return type(m) in _TRANSPARENT_MODULES
    return u.op == "call_function" and u.target in _TRANSPARENT_FUNCTIONS


def _homogeneous(g: _Graph, u: torch.fx.Node) -> bool:
    if _transparent(g, u):
        return True
    m = g.module(u)
    if m is not None:
        return type(m) in _HOMOGENEOUS_MODULES
    if u.op == "call_method":
        return u.target in _HOMOGENEOUS_METHODS
    return u.op == "call_function" and u.target in _HOMOGENEOUS_FUNCTIONS


def _pool(g: _Graph, u: torch.fx.Node) -> bool:
    m = g.module(u)
    if m is not None:
        return type(m) in _POOL_MODULES and not getattr(m, "return_indices", False)
    if u.op != "call_function" or u.target not in _POOL_FUNCTIONS:
        return False
    # return_indices: max_poolNd(input, kernel_size, stride, padding, dilation, ceil_mode,
    # return_indices), adaptive_max_poolNd(input, output_size, return_indices)
    position = 2 if "adaptive" in u.target.__name__ else 6
    return not _arg(u, position, "return_indices", False)


def _flatten_block(g: _Graph, u: torch.fx.Node, src: torch.fx.Node) -> int | None:
    """H*W (the block of columns per channel) if u flattens (N, C, *S) to (N, C*prod(S))."""
    m = g.module(u)
    is_flatten = (type(m) is nn.Flatten) if m is not None else (
        (u.op == "call_function" and u.target in _FLATTENS) or (u.op == "call_method" and u.target in _FLATTEN_METHODS))
    a, b = g.shape(src), g.shape(u)
    if not is_flatten or a is None or b is None or len(a) < 3 or len(b) != 2:
        return None
    if b[0] != a[0] or b[1] != math.prod(a[1:]):
        return None
    return math.prod(a[2:])


def _batch_statistics(bn: nn.Module) -> bool:
    """BatchNorm normalises with the batch's statistics (training mode, or no running stats)."""
    return bn.training or (bn.running_mean is None and bn.running_var is None)


def _out_channels(m: nn.Module) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


def _find_scale(g: _Graph, n: torch.fx.Node, m: nn.Module) -> Scale | None:
    bn_node = g.walk(n, lambda u: _transparent(g, u))
    bn = g.module(bn_node) if bn_node is not None else None
    if bn is None or type(bn) not in _BATCHNORMS:
        return None
    if not _batch_statistics(bn):
        log.info("no scale symmetry for %s: %s normalises with running statistics (eval mode)", n.target, bn_node.target)
        return None
    shape = g.shape(n)
    if bn.num_features != _out_channels(m) or shape is None or len(shape) < 2 or shape[1] != _out_channels(m):
        return None
    if isinstance(m, nn.Linear) and len(shape) != 2:
        return None  # BatchNorm1d normalises dim 1; a Linear on (N, L, F) puts its features last
    return Scale(m.weight, m.bias, name=n.target, weight_name=g.names[id(m.weight)],
                 bias_name=g.names[id(m.bias)] if m.bias is not None else None)


def _find_rescale(g: _Graph, n: torch.fx.Node, m: nn.Module) -> Rescale | None:
    conv = isinstance(m, _CONVS)
    state = {"block": 0, "prev": n}

    def step(u: torch.fx.Node) -> bool:
        prev, state["prev"] = state["prev"], u
        if _homogeneous(g, u):
            return True
        if conv and not state["block"]:
            if _pool(g, u):
                return True
            block = _flatten_block(g, u, prev)
            if block is not None:
                state["block"] = block
                return True
        return False

    nxt = g.walk(n, step)
    m2 = g.clean_layer(nxt) if nxt is not None else None
    if m2 is None:
        return None
    hidden, block = _out_channels(m), state["block"]
    if block:
        if not isinstance(m2, nn.Linear) or m2.in_features != hidden * block:
            return None
    elif conv:
        if type(m2) is not type(m) or m2.in_channels != hidden or m2.groups != 1:
            return None
    elif not isinstance(m2, nn.Linear) or m2.in_features != hidden:
        return None
    return Rescale(m.weight, m2.weight, m.bias, block=max(block, 1), name=f"{n.target}->{nxt.target}",
                   incoming_weight_name=g.names[id(m.weight)],
                   incoming_bias_name=g.names[id(m.bias)] if m.bias is not None else None,
                   outgoing_weight_name=g.names[id(m2.weight)])


def _softmax_dim(g: _Graph, u: torch.fx.Node) -> int | None:
    m = g.module(u)
    if m is not None:
        return m.dim if type(m) in _SOFTMAX_MODULES else None
    if u.op == "call_function" and u.target in _SOFTMAX_FUNCTIONS:
        return _arg(u, 1, "dim")
    if u.op == "call_method" and u.target in _SOFTMAX_METHODS:
        return _arg(u, 1, "dim")
    if u.op == "call_function" and u.target is F.cross_entropy:
        return 1  # cross_entropy's class dim
    return None


def _find_translation(g: _Graph, n: torch.fx.Node, m: nn.Module, logits_output: bool) -> Translation | None:
    if not isinstance(m, nn.Linear):
        return None
    shape = g.shape(n)
    end = g.walk(n, lambda u: type(g.module(u)) is nn.Identity)
    if end is None or shape is None:
        return None
    if end.op == "output":  # walk() got here only if the output is exactly the logits, not a tuple
        ok = logits_output and len(shape) == 2
    else:
        dim = _softmax_dim(g, end)
        ok = isinstance(dim, int) and dim % len(shape) == len(shape) - 1
    if not ok:
        return None
    return Translation(m.weight, m.bias, name=n.target, weight_name=g.names[id(m.weight)],
                       bias_name=g.names[id(m.bias)] if m.bias is not None else None)


def find_symmetries(model: nn.Module, example_inputs: Any, *, logits_output: bool = True) -> list[Symmetry]:
    """The translation, scale and rescale symmetries of `model`, found on its torch.fx graph.

    Args:
        model: the network, in the mode it trains in (a BatchNorm in eval mode gives no scale
            symmetry). It may live on the meta device.
        example_inputs: a tensor, or a tuple of the forward's positional arguments; only shapes
            matter (they are run on the meta device: nothing is computed, no state changes).
            BatchNorm in training mode needs a batch of at least 2.
        logits_output: the model's output is logits that the loss feeds to cross-entropy /
            softmax over dim 1 (the usual classifier). Then the Linear whose (2-D) output is the
            model's output gets the translation symmetry. Set False when the loss is anything
            else (e.g. MSE): only a softmax inside the model then gives a translation symmetry.

    Patterns (ARCHITECTURE.md's table):
      - scale: Linear / Conv whose output goes, through Dropout / Identity only, into a
        BatchNorm normalising with batch statistics: rows of the weight + bias elements;
      - rescale: Linear / Conv -> ReLU / LeakyReLU / Dropout / Identity (and, after a conv,
        max / avg / adaptive pooling and one Flatten) -> Linear / Conv: rows (+ bias) of the
        first, columns of the second; across a Flatten each channel owns a block of H*W columns;
      - translation: a Linear feeding softmax / log_softmax / cross_entropy over its feature dim
        (or the model's output, see logits_output): its columns + its bias.
    Every layer must be an exact nn.Linear / nn.Conv{1,2,3}d called once, without hooks,
    parametrizations, shared or functionally used parameters, and every value on the way must
    have one user (so a residual addition or a second use stops the pattern).

    Returns the symmetries in graph order. Raises SymmetryDetectionError, with what to do, for a
    model torch.fx cannot trace or example inputs it does not accept.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"find_symmetries: model must be an nn.Module, got {type(model).__name__}")
    inputs = tuple(example_inputs) if isinstance(example_inputs, tuple | list) else (example_inputs,)
    g = _Graph(model, inputs)
    found: list[Symmetry] = []
    for n in list(g.gm.graph.nodes):
        m = g.clean_layer(n)
        if m is None:
            continue
        for sym in (_find_scale(g, n, m), _find_rescale(g, n, m), _find_translation(g, n, m, logits_output)):
            if sym is not None:
                found.append(sym)
    return found


# ================================================================================================
# Verification with torch.func
# ================================================================================================
@dataclass
class SymmetryCheck:
    """The constraints of one symmetry on one batch.

    grad_residuals[A] = |⟨g, ξ_A⟩| / (|g_A| |ξ_A|) for every group A (ξ_A the generator, g_A the
    gradient on A's elements; 0 where either vanishes).

    The Hessian constraint r_A = Hξ_A + ĝ_A = 0 (ĝ_A = 0 for translation, g_A for scale,
    g_A1 − g_A2 for rescale) is measured
      - with method "probe" per group, along random directions u: |u·r_A| relative to the sum of
        the absolute values of its terms, Σ_i |(Hu)_i ξ_i| + |ĝ_i u_i| (the size rounding is
        measured against);
      - with method "exact" per symmetry: ‖Hξ + ĝ‖ / (‖Hξ‖ + ‖ĝ‖) for one HVP per group, or on a
        random combination of the groups, and for translation ‖Hξ‖ / ‖Hw‖ with w random on ξ's
        support with ξ's norm (the typical size of H there).
    hessian_residual is the worst of them."""

    symmetry: Symmetry
    grad_residuals: np.ndarray
    hessian_residuals: np.ndarray
    method: str
    probes: int
    tol: float

    @property
    def kind(self) -> str:
        return self.symmetry.kind

    @property
    def name(self) -> str:
        return self.symmetry.name

    @property
    def num_groups(self) -> int:
        return self.symmetry.num_groups

    @property
    def grad_residual(self) -> float:
        """The worst group's gradient residual."""
        return float(self.grad_residuals.max()) if self.grad_residuals.size else 0.0

    @property
    def hessian_residual(self) -> float:
        return float(self.hessian_residuals.max()) if self.hessian_residuals.size else 0.0

    @property
    def passed(self) -> bool:
        return bool(self.grad_residual <= self.tol and self.hessian_residual <= self.tol)


@dataclass
class SymmetryReport:
    """verify_symmetries' result: one SymmetryCheck per symmetry, a verdict and a table."""

    checks: list[SymmetryCheck]
    tol: float
    dtype: torch.dtype
    loss: float
    seconds: float

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failed(self) -> list[SymmetryCheck]:
        return [c for c in self.checks if not c.passed]

    def __iter__(self):
        return iter(self.checks)

    def __len__(self) -> int:
        return len(self.checks)

    def __getitem__(self, i: int | str) -> SymmetryCheck:
        if isinstance(i, str):
            for c in self.checks:
                if c.name == i:
                    return c
            raise KeyError(i)
        return self.checks[i]

    def table(self) -> str:
        """One line per symmetry (worst group's residuals) and the verdict."""
        width = max([len("symmetry"), *(len(c.name) for c in self.checks)])
        lines = [f"{'symmetry':<{width}}  {'kind':<11}  {'groups':>6}  {'grad resid':>10}  {'hess resid':>10}  verdict"]
        for c in self.checks:
            lines.append(f"{c.name:<{width}}  {c.kind:<11}  {c.num_groups:>6}  {c.grad_residual:>10.2e}  "
                         f"{c.hessian_residual:>10.2e}  {'ok' if c.passed else 'FAIL'}")
        verdict = (f"all {len(self.checks)} symmetries hold" if self.passed
                   else f"{len(self.failed)} of {len(self.checks)} symmetries FAIL")
        dtype = str(self.dtype).removeprefix("torch.")
        how = ""
        if self.checks:
            c = self.checks[0]
            how = (f"Hessian along {c.probes} random direction(s)" if c.method == "probe"
                   else "Hessian per symmetry")
        lines.append(f"{verdict} (tol {self.tol:.0e}, {dtype}, loss {self.loss:.4g}, {how}, {self.seconds:.1f} s)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


@contextlib.contextmanager
def _no_running_stat_updates(model: nn.Module):
    """BatchNorm in training mode keeps normalising with batch statistics but does not update
    its running statistics: verification must not change the model."""
    changed = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats:
            m.track_running_stats = False
            changed.append(m)
    try:
        yield
    finally:
        for m in changed:
            m.track_running_stats = True


def _default_tol(dtype: torch.dtype) -> float:
    return 1e-3


def verify_symmetries(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    batch: Any,
    syms: Iterable[Symmetry],
    *,
    tol: float | None = None,
    hessian: str = "probe",
    probes: int = 1,
    hessian_groups: int = 8,
    seed: int = 0,
) -> SymmetryReport:
    """Check each symmetry's gradient and Hessian constraints on one batch (ARCHITECTURE.md):
    ⟨g, ξ_A⟩ = 0 for every group; translation H·1_A = 0, scale H·θ_A = −g_A, rescale
    H(θ_A1 − θ_A2) = −(g_A1 − g_A2). One forward and backward pass builds the gradient with its
    graph (torch.func.vjp of torch.func.grad over functional_call); every Hessian-vector product
    is then one more backward pass through it.

    Args:
        model: the network in the mode it trains in; nothing in it changes (BatchNorm's running
            statistics are not updated, the global RNG is restored).
        loss_fn: ``loss_fn(model(*inputs), target) -> scalar``.
        batch: ``(inputs, target)``; inputs a tensor or a tuple of positional arguments.
        syms: the symmetries (from find_symmetries, the constructors, or a record's descriptions:
            then members are found by parameter name).
        tol: the verdict's tolerance on every residual (default 1e-6 in float64, 1e-3 otherwise).
            BatchNorm's eps breaks scale symmetry by about eps / (channel variance), visible in
            float64.
        hessian: "probe" (default): `probes` HVPs along random directions u over all parameters
            check every group of every symmetry at once (u·(Hξ_A + ĝ_A) = 0; any violated group
            shows with probability 1), so the cost does not grow with the number of symmetries.
            "exact": per symmetry, the whole vector Hξ + ĝ, one HVP per group for symmetries of
            at most `hessian_groups` groups, else one on a random combination of the groups.
        seed: seeds dropout (the same masks in every evaluation) and the random directions.
    """
    start = time.perf_counter()
    syms = list(syms)
    if hessian not in ("probe", "exact"):
        raise ValueError(f"verify_symmetries: hessian must be 'probe' or 'exact', got {hessian!r}")
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
        raise ValueError(f"verify_symmetries: probes must be a positive int, got {probes!r}")
    if not isinstance(batch, tuple | list) or len(batch) != 2:
        raise TypeError("verify_symmetries: batch must be (inputs, target)")
    inputs, target = batch
    inputs = tuple(inputs) if isinstance(inputs, tuple | list) else (inputs,)
    named = dict(model.named_parameters())
    if not named:
        raise ValueError("verify_symmetries: the model has no parameters")
    names = {id(p): n for n, p in named.items()}
    params = {n: p.detach() for n, p in named.items()}
    buffers = dict(model.named_buffers())
    dtype = next(iter(params.values())).dtype
    tol = _default_tol(dtype) if tol is None else float(tol)

    plans = []  # (symmetry, [(member, offset, param name, generator)])
    for sym in syms:
        if not isinstance(sym, Symmetry):
            raise TypeError(f"verify_symmetries: expected Symmetry objects, got {type(sym).__name__}")
        rows = []
        for m, off in zip(sym.members, sym._offsets):
            n = names.get(id(m.param)) if m.param is not None else (m.name if m.name in params else None)
            if n is None:
                raise ValueError(f"verify_symmetries: {sym.kind} {sym.name!r}: member {m.name!r} is not a parameter of "
                                 "the model")
            if tuple(params[n].shape) != m.shape:
                raise ValueError(f"verify_symmetries: {sym.kind} {sym.name!r}: {n} has shape "
                                 f"{tuple(params[n].shape)}, the member {m.shape}")
            rows.append((m, off, n, sym._generator(m, params[n])))
        plans.append((sym, rows))

    def loss_of(ps: dict[str, Tensor]) -> Tensor:
        torch.manual_seed(seed)  # the same dropout masks whatever evaluates the loss
        return loss_fn(torch.func.functional_call(model, (ps, buffers), inputs), target)

    gen = torch.Generator().manual_seed(seed)

    def randn_like(t: Tensor) -> Tensor:
        return torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device)

    devices = sorted({p.device.index or 0 for p in params.values() if p.device.type == "cuda"})
    checks = []
    with _no_running_stat_updates(model), torch.random.fork_rng(devices=devices):
        grads, hvp, loss = torch.func.vjp(torch.func.grad_and_value(loss_of), params, has_aux=True)

        def hvp_of(v: dict[str, Tensor]) -> dict[str, Tensor]:
            full = {n: v[n] if n in v else torch.zeros_like(p) for n, p in params.items()}
            return hvp(full)[0]

        directions = [{n: randn_like(p) for n, p in params.items()} for _ in range(probes)] if hessian == "probe" else []
        h_dirs = [hvp(u)[0] for u in directions]
        for sym, rows in plans:
            G = sym.num_groups
            dot, gg, xx = (torch.zeros(G, dtype=torch.float64) for _ in range(3))
            for m, off, n, xi in rows:
                g = grads[n]
                dot[off : off + m.num_groups] += _reduce64(m, g * xi)
                gg[off : off + m.num_groups] += _reduce64(m, g * g)
                xx[off : off + m.num_groups] += _reduce64(m, xi * xi)
            denom = (gg * xx).sqrt()
            grad_res = torch.where(denom > 0, dot.abs() / denom.clamp_min(1e-300), torch.zeros_like(dot)).numpy()
            if hessian == "probe":
                num, den = torch.zeros(G, dtype=torch.float64), torch.zeros(G, dtype=torch.float64)
                for u, hu in zip(directions, h_dirs):
                    signed, size = torch.zeros(G, dtype=torch.float64), torch.zeros(G, dtype=torch.float64)
                    for m, off, n, xi in rows:
                        a = hu[n] * xi
                        signed[off : off + m.num_groups] += _reduce64(m, a)
                        size[off : off + m.num_groups] += _reduce64(m, a.abs())
                        if sym.kind != "translation":
                            b = grads[n] * u[n] * (-1.0 if m.role == "A2" else 1.0)
                            signed[off : off + m.num_groups] += _reduce64(m, b)
                            size[off : off + m.num_groups] += _reduce64(m, b.abs())
                    num += signed.abs()
                    den += size
                hess_res = torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num)).numpy()
                checks.append(SymmetryCheck(sym, grad_res, hess_res, "probe", probes, tol))
                continue
            each = G <= hessian_groups
            coefs = [torch.eye(G, dtype=torch.float64)[a] for a in range(G)] if each else [
                torch.randn(G, generator=gen, dtype=torch.float64)]
            res = []
            for c in coefs:
                tangent: dict[str, Tensor] = {}
                rhs: dict[str, Tensor] = {}
                for m, off, n, xi in rows:
                    cm = m.expand(c[off : off + m.num_groups].to(xi.device, xi.dtype))
                    tangent[n] = tangent.get(n, 0) + cm * xi
                    if sym.kind != "translation":  # rhs = -ĝ
                        rhs[n] = rhs.get(n, 0) - (-1.0 if m.role == "A2" else 1.0) * cm * grads[n]
                hv = hvp_of(tangent)
                if sym.kind == "translation":
                    w = {n: randn_like(t) * (t != 0) for n, t in tangent.items()}
                    scale = _norm(tangent.values()) / max(_norm(w.values()), 1e-300)
                    num, den = _norm(hv.values()), _norm(hvp_of({n: t * scale for n, t in w.items()}).values())
                else:
                    num = _norm(hv[n] - rhs.get(n, 0) for n in hv)
                    den = _norm(hv.values()) + _norm(rhs.values())
                res.append(num / den if den > 0 else (0.0 if num == 0 else math.inf))
            checks.append(SymmetryCheck(sym, grad_res, np.asarray(res), "exact", len(coefs), tol))
    return SymmetryReport(checks, tol, dtype, float(loss), time.perf_counter() - start)


def _reduce64(m: Member, t: Tensor) -> Tensor:
    """Per-group sums of t as float64 on the CPU. Summed in t's dtype: torch's cascade summation
    keeps float32 sums to ~1e-7 of their terms, far below any tolerance here, and
    sum(dtype=float64) of float32 is 3x slower on the CPU (it was 40% of VGG-16-BN's check)."""
    return m.reduce(t).to(torch.float64).cpu()


def _norm(ts: Iterable[Any]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in ts if isinstance(t, Tensor)))
