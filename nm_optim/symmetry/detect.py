"""Finding symmetries: `find_symmetries`, on a model's torch.fx graph and by module structure
(nm_optim.symmetry.structural, for the transformers torch.fx cannot trace).

The detector is conservative: it claims a symmetry only on a pattern it can prove from the traced
graph (exact module types, each layer called once, no shared or functionally used parameters, no
hooks or parametrizations, every intermediate value used once), so residual additions, weight
sharing, BatchNorm in eval mode, non-homogeneous activations and in-place tricks on the way all
mean "no symmetry claimed". The translation symmetry of a model whose output is the logits depends
on the loss, which is outside the model: it is claimed only when the loss is known to take a
softmax over the logits' last dim (the `loss=` argument, traced with torch.fx as the model is).
`verify_symmetries` (nm_optim.symmetry.verify) then checks the claim numerically.

Each symmetry found keeps a weak reference to the model it was found on (`found_on`), so that
nm_optim.SGD can match its members by name to the params of the same model after something
replaced the Parameter objects (FSDP2's fully_shard does).
"""

from __future__ import annotations

import logging
import math
import sys
import warnings
import weakref
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nm_optim.symmetry.base import Rescale, Scale, Symmetry, Translation
from nm_optim.symmetry.structural import FOUND_BY_STRUCTURE, find_by_structure, signature

__all__ = ["FOUND_BY_FX", "FOUND_BY_STRUCTURE", "SymmetryDetectionError", "find_symmetries", "found_by", "found_on"]

log = logging.getLogger(__name__)


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
# Losses that apply a softmax over dim 1 of their input (the class dim): any function of
# softmax(z) is unchanged by z + α·1.
_SOFTMAX_LOSS_MODULES = (nn.CrossEntropyLoss,)
_SOFTMAX_LOSS_FUNCTIONS = {F.cross_entropy}
# On the way from the model's output into the loss: casts change no value up to rounding.
_CAST_METHODS = {"float", "double"}
# The attribute a model may carry to declare its training loss (the zoo's classifiers do:
# nm_optim.models); read when find_symmetries gets no loss=.
LOSS_ATTRIBUTE = "nm_optim_loss"
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


class _Traced:
    """A torch.fx graph and its modules: what walking a chain of single uses needs."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules())

    def module(self, n: torch.fx.Node) -> nn.Module | None:
        return self.modules.get(n.target) if n.op == "call_module" else None

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


class _Untraceable(SymmetryDetectionError):
    """torch.fx could not trace the model, or run its graph on meta tensors (find_symmetries goes
    on by module structure)."""


class _Graph(_Traced):
    """The traced model and the facts the patterns need."""

    def __init__(self, model: nn.Module, inputs: tuple[Any, ...]) -> None:
        try:
            super().__init__(torch.fx.symbolic_trace(model))
        except Exception as e:
            raise _Untraceable(
                f"find_symmetries: torch.fx cannot trace {type(model).__name__} ({type(e).__name__}: {e}). Build its "
                "symmetries by hand with nm_optim.Translation / Scale / Rescale, or call find_symmetries on a "
                "traceable submodule (e.g. model.features) and combine the results"
            ) from e
        try:
            self.shapes = _propagate_shapes(self.gm, inputs)
        except Exception as e:
            raise _Untraceable(
                f"find_symmetries: running {type(model).__name__} on the example inputs failed ({type(e).__name__}: "
                f"{e}); pass example_inputs the model accepts (a tensor or a tuple of positional arguments; a batch "
                "of at least 2 for BatchNorm in training mode)"
            ) from e
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
        if type(m) in _SOFTMAX_LOSS_MODULES:
            return 1  # cross-entropy's class dim
        return m.dim if type(m) in _SOFTMAX_MODULES else None
    if u.op == "call_function" and u.target in _SOFTMAX_FUNCTIONS:
        return _arg(u, 1, "dim")
    if u.op == "call_method" and u.target in _SOFTMAX_METHODS:
        return _arg(u, 1, "dim")
    if u.op == "call_function" and u.target in _SOFTMAX_LOSS_FUNCTIONS:
        return 1  # cross_entropy's class dim
    return None


def _find_translation(g: _Graph, n: torch.fx.Node, m: nn.Module, loss_dim: int | None,
                      unknown: list[str] | None) -> Translation | None:
    """The translation symmetry of Linear `m` (node n) if its logits go into a softmax over their
    last dim: inside the model, or, where the model's output is exactly these logits, in the loss
    (`loss_dim`: the dim the loss's softmax runs over, None for a loss without one or an unknown
    loss; `unknown` collects the layers left unclaimed for want of a loss)."""
    if not isinstance(m, nn.Linear):
        return None
    shape = g.shape(n)
    end = g.walk(n, lambda u: type(g.module(u)) is nn.Identity)
    if end is None or shape is None:
        return None
    # walk() got to the output only if the output is exactly the logits, not a tuple
    dim = loss_dim if end.op == "output" else _softmax_dim(g, end)
    if end.op == "output" and loss_dim is None and unknown is not None:
        unknown.append(str(n.target))
    if not (isinstance(dim, int) and dim % len(shape) == len(shape) - 1):
        return None
    return Translation(m.weight, m.bias, name=n.target, weight_name=g.names[id(m.weight)],
                       bias_name=g.names[id(m.bias)] if m.bias is not None else None)


class _LossCall(nn.Module):
    """The loss as a module of (output, target), so that torch.fx traces it as it traces models:
    a loss module of torch.nn (nn.CrossEntropyLoss) stays one call_module node, a function of
    torch.nn.functional one call_function node, anything else is traced through."""

    def __init__(self, loss: Callable[..., Any]) -> None:
        super().__init__()
        self.loss = loss

    def forward(self, output: Any, target: Any) -> Any:
        return self.loss(output, target)


def _loss_name(loss: Any) -> str:
    return getattr(loss, "__qualname__", None) or f"{type(loss).__name__}()"


def _check_loss(loss: Any, what: str) -> None:
    if isinstance(loss, Tensor):
        raise TypeError(
            f"find_symmetries: {what} must be the loss function the model's output goes into, called as "
            "loss(output, target) (e.g. torch.nn.functional.cross_entropy or nn.CrossEntropyLoss()), not a loss "
            "value (a Tensor): pass the function that computes it"
        )
    if not callable(loss):
        raise TypeError(
            f"find_symmetries: {what} must be a callable loss(output, target) such as "
            f"torch.nn.functional.cross_entropy or nn.CrossEntropyLoss(), or None; got {type(loss).__name__} "
            f"{loss!r}"
        )


def _loss_softmax_dim(loss: Callable[..., Any], what: str) -> int | None:
    """The dim over which `loss` takes a softmax of its first argument (the model's output), when
    that argument goes, through casts and identities only, into a softmax, log_softmax or
    cross-entropy; None when it does not (MSE, BCE, a second use of the logits, ...)."""
    _check_loss(loss, what)
    try:
        graph = _Traced(torch.fx.symbolic_trace(_LossCall(loss)))
    except Exception as e:
        raise SymmetryDetectionError(
            f"find_symmetries: torch.fx cannot trace {what}={_loss_name(loss)} ({type(e).__name__}: {e}); pass the "
            "loss as a function of (output, target) that torch.fx can trace, e.g. torch.nn.functional.cross_entropy "
            "or nn.CrossEntropyLoss()"
        ) from e
    output = next(n for n in graph.gm.graph.nodes if n.op == "placeholder")

    def through(u: torch.fx.Node) -> bool:
        return _transparent(graph, u) or type(graph.module(u)) is nn.Identity or (
            u.op == "call_method" and u.target in _CAST_METHODS)

    end = graph.walk(output, through)
    return _softmax_dim(graph, end) if end is not None else None


def _sharding(model: nn.Module) -> str | None:
    """What shards `model`, if something does: FSDP2's fully_shard (its modules become FSDPModule
    and its params DTensors, which torch.fx cannot trace), or DTensor params from elsewhere."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    fsdp_module = getattr(fsdp, "FSDPModule", None)
    if fsdp_module is not None and any(isinstance(m, fsdp_module) for m in model.modules()):
        return "FSDP2's fully_shard"
    tensor = sys.modules.get("torch.distributed.tensor")
    dtensor = getattr(tensor, "DTensor", None)
    if dtensor is not None and any(isinstance(p, dtensor) for p in model.parameters()):
        return "DTensor parameters"
    return None


class _ModelRef:
    """A weak reference to the model a symmetry was found on. It pickles as a dead reference
    (a weakref.ref does not pickle; a record's symmetries are described by name anyway) and a
    deepcopy follows a model copied in the same deepcopy."""

    __slots__ = ("_ref",)

    def __init__(self, model: nn.Module | None) -> None:
        self._ref = weakref.ref(model) if model is not None else None

    def __call__(self) -> nn.Module | None:
        return self._ref() if self._ref is not None else None

    def __reduce__(self) -> tuple[Any, ...]:
        return _ModelRef, (None,)

    def __deepcopy__(self, memo: dict[int, Any]) -> _ModelRef:
        model = self()
        return _ModelRef(memo.get(id(model), model) if model is not None else None)


_FOUND_ON = "_nm_found_on"  # the attribute of a Symmetry holding its _ModelRef
FOUND_BY = "found_by"  # the attribute of a Symmetry saying how find_symmetries found it
FOUND_BY_FX = "torch.fx graph"


def found_by(sym: Symmetry) -> str | None:
    """How find_symmetries found `sym`: FOUND_BY_FX (the traced graph: a chain of single uses) or
    FOUND_BY_STRUCTURE (the module tree, confirmed by one gradient); None for one built by hand."""
    return getattr(sym, FOUND_BY, None)


def found_on(sym: Symmetry) -> nn.Module | None:
    """The model `find_symmetries` found `sym` on, while it is alive (None for symmetries built
    by hand or from a record): its members' names are the model's parameter names, so
    `found_on(sym).get_parameter(member.name)` is the param the model holds now, also after
    fully_shard replaced the Parameter objects."""
    ref = getattr(sym, _FOUND_ON, None)
    return ref() if isinstance(ref, _ModelRef) else None


def find_symmetries(model: nn.Module, example_inputs: Any, *, loss: Callable[..., Any] | None = None) -> list[Symmetry]:
    """The translation, scale and rescale symmetries of `model`, found two ways: on its torch.fx
    graph where torch.fx traces it (the patterns below), and by module structure, confirmed by one
    gradient on `example_inputs` (attention, gated and ReLU MLPs, pre-norm affine weights,
    embeddings into a LayerNorm, LM and classifier heads: nm_optim.symmetry.structural; it works
    on models torch.fx cannot trace, Hugging Face's and nn.TransformerEncoderLayer). `found_by`
    says which way found each.

    Args:
        model: the network, in the mode it trains in (a BatchNorm in eval mode gives no scale
            symmetry). It may live on the meta device. Call it on the model before sharding it
            (FSDP2's fully_shard): nm_optim.SGD matches the members to the sharded params by name.
        example_inputs: a tensor, or a tuple of the forward's positional arguments; only shapes
            matter (they are run on the meta device: nothing is computed, no state changes).
            BatchNorm in training mode needs a batch of at least 2.
        loss: the loss the model's output goes into, called as ``loss(output, target)``: a
            function (``torch.nn.functional.cross_entropy``, a lambda) or a module
            (``nn.CrossEntropyLoss()``), traced with torch.fx. It decides the translation
            symmetry of a Linear whose (2-D) output is the model's output: claimed only when the
            loss takes a softmax over the class dim (cross-entropy, or a log_softmax / softmax
            inside it), never for MSE, BCE or other losses. None (default): the loss the model
            declares in its ``nm_optim_loss`` attribute, a function (a module assigned to a
            model's attribute would become its submodule; the classifiers of nm_optim.models
            declare F.cross_entropy), else unknown: then no translation symmetry is claimed on
            the model's output, with a warning. A softmax inside the model gives translation whatever
            the loss.

    Patterns (docs/architecture.md, "Symmetries"):
      - scale: Linear / Conv whose output goes, through Dropout / Identity only, into a
        BatchNorm normalising with batch statistics: rows of the weight + bias elements;
      - rescale: Linear / Conv -> ReLU / LeakyReLU / Dropout / Identity (and, after a conv,
        max / avg / adaptive pooling and one Flatten) -> Linear / Conv: rows (+ bias) of the
        first, columns of the second; across a Flatten each channel owns a block of H*W columns;
      - translation: a Linear feeding softmax / log_softmax / cross_entropy over its feature dim
        (in the model, or in the loss where its output is the model's output): its columns + its
        bias.
    Every layer must be an exact nn.Linear / nn.Conv{1,2,3}d called once, without hooks,
    parametrizations, shared or functionally used parameters, and every value on the way must
    have one user (so a residual addition or a second use stops the pattern).

    Module structure (docs/architecture.md, "Transformers"): candidates from the module tree with
    shape checks, finest grouping first (per dimension, per rotary pair, per head), each kept only
    if the gradient of a random read-out of the output is orthogonal to its generator on every
    group. A tied LM head, a classifier under an unknown loss and a model on the meta device get
    no such symmetry, with a warning saying why. It runs the model forward and backward once on
    `example_inputs` (nothing changes: BatchNorm's running statistics, the RNG and .grad are
    left as they were), and only where the module tree has a candidate.

    Returns the torch.fx symmetries in graph order, then the structural ones in module order
    (one found both ways is listed once), each holding a weak reference to `model` (`found_on`).
    Raises SymmetryDetectionError, with what to do, for a sharded model, for a model torch.fx
    cannot trace whose module structure shows none of the patterns, for example inputs it does
    not accept or a loss it cannot trace; TypeError for a `loss` that is no loss function.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"find_symmetries: model must be an nn.Module, got {type(model).__name__}")
    sharded = _sharding(model)
    if sharded is not None:
        raise SymmetryDetectionError(
            f"find_symmetries: {type(model).__name__} is sharded ({sharded}), and torch.fx cannot trace a sharded "
            "model: find the symmetries before sharding and pass them after it, e.g. syms = "
            "nm_optim.find_symmetries(model, x, loss=F.cross_entropy); fully_shard(model); "
            "nm_optim.SGD(model.parameters(), symmetries=syms) (members are matched to the sharded params by name)"
        )
    declared = getattr(model, LOSS_ATTRIBUTE, None)
    if loss is not None:
        loss_dim = _loss_softmax_dim(loss, "loss")
    elif declared is not None:
        loss_dim = _loss_softmax_dim(declared, f"{type(model).__name__}.{LOSS_ATTRIBUTE}")
    else:
        loss_dim = None
    inputs = tuple(example_inputs) if isinstance(example_inputs, tuple | list) else (example_inputs,)
    # the output layers left unclaimed because no loss is known (a warning says so)
    unknown: list[str] | None = [] if loss is None and declared is None else None
    found: list[Symmetry] = []
    untraceable: SymmetryDetectionError | None = None
    try:
        g = _Graph(model, inputs)
    except _Untraceable as e:
        untraceable, g = e, None
    if g is not None:
        for n in list(g.gm.graph.nodes):
            m = g.clean_layer(n)
            if m is None:
                continue
            for sym in (_find_scale(g, n, m), _find_rescale(g, n, m), _find_translation(g, n, m, loss_dim, unknown)):
                if sym is not None:
                    setattr(sym, FOUND_BY, FOUND_BY_FX)
                    found.append(sym)
    refusals: list[str] = []
    try:
        structural = find_by_structure(model, inputs, loss_dim=loss_dim, refusals=refusals,
                                       known={signature(s) for s in found})
    except Exception as e:
        if untraceable is not None:
            raise untraceable from e
        raise SymmetryDetectionError(
            f"find_symmetries: running {type(model).__name__} on the example inputs to confirm its attention / "
            f"normalisation symmetries failed ({type(e).__name__}: {e}); pass example_inputs the model accepts"
        ) from e
    seen = {signature(s) for s in found}
    for sym in structural:
        if signature(sym) not in seen:
            seen.add(signature(sym))
            setattr(sym, FOUND_BY, FOUND_BY_STRUCTURE)
            found.append(sym)
    if untraceable is not None and not found:
        raise SymmetryDetectionError(
            f"{untraceable}; its module structure shows none of the attention, MLP, normalisation, embedding or "
            "head patterns either (docs/transformers.md)"
        ) from untraceable.__cause__
    if untraceable is not None:
        log.info("find_symmetries: torch.fx cannot trace %s (%s); %d symmetries found by module structure",
                 type(model).__name__, untraceable.__cause__, len(found))
    for sym in found:
        setattr(sym, _FOUND_ON, _ModelRef(model))
    for message in refusals:
        warnings.warn(f"find_symmetries: {message}", stacklevel=2)
    if unknown:
        warnings.warn(
            f"find_symmetries: no translation symmetry claimed on {', '.join(unknown)}, whose output is the output "
            f"of {type(model).__name__}: it holds only if the loss takes a softmax of it (cross-entropy), and no "
            "loss was given; pass loss= the loss function (e.g. loss=torch.nn.functional.cross_entropy), which also "
            "silences this warning",
            stacklevel=2,
        )
    return found
