"""Finding the symmetries of transformers by module structure: `find_by_structure`.

torch.fx cannot trace most transformers (Hugging Face models, nn.TransformerEncoderLayer), and an
attention block's symmetries are not visible as a chain of single-use values anyway. Here the
module tree proposes candidates, with shape checks, and one gradient evaluation on the example
inputs decides which hold:

- attention (nn.MultiheadAttention; modules with query/key/value and an output ``dense`` as in
  BERT; with GPT-2's fused ``c_attn`` / ``c_proj``; with q_proj/k_proj/v_proj/o_proj as in Llama,
  or a fused qkv_proj as in Phi-3, grouped-query heads included): queries against keys per dimension, per rotary pair (both
  conventions), per head; values against the output projection per dimension; every key bias
  element (translation); with a norm on the queries and keys (``q_norm`` / ``k_norm``), the
  query and key rows of each head (scale) instead;
- MLPs: the up projection's rows against the down projection's columns (gated: gate/up/down,
  w1/w3/w2, a fused gate_up_proj; plain: fc1/fc2, linear1/linear2, c_fc/c_proj, BERT's
  intermediate/output), which holds only where the branch is linear or the activation positively
  homogeneous (the check rejects GELU and SiLU);
- a LayerNorm / RMSNorm whose output goes only into the next projections (pre-norm blocks, the
  final norm before an untied LM head): the norm's weight and bias against the projections'
  input columns;
- embedding tables summed into a LayerNorm (BERT's embeddings): all tables as one scale group;
- the softmax's translation on an LM or classifier head (per input column, and the bias), refused
  with a warning where the head's weight is tied to the input embedding.

The check (`_Gradients`): with a random linear read-out R of the model's output (of its log-softmax
for a head's translation), a symmetry holds only if the gradient g of ⟨R, output⟩ is orthogonal to
the generator ξ_A on every group A: |⟨g_A, ξ_A⟩| ≤ tol · |ξ_A| · |g_A|, for translation
≤ tol · |ξ_A| · max(|g_A|, √n_A · ḡ) with ḡ the RMS gradient of the whole model (a key bias's
gradient vanishes identically, so its own norm is no scale). For each family the finest grouping that passes is claimed: per dimension before per
rotary pair before per head. A scale group is broken by the norm's eps by about eps / (mean square
of its input), so its tolerance is looser (SCALE_TOL); verify_symmetries and the record then
measure that breaking. Candidates cost one forward and two backward passes of the example inputs
in all, on the model as it is (no state changes: BatchNorm's running statistics and the global RNG
are restored), and need real tensors (not the meta device).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from nm_optim.symmetry.base import Member, Symmetry

__all__ = ["SCALE_TOL", "FOUND_BY_STRUCTURE", "find_by_structure", "signature", "structural_tolerance"]

log = logging.getLogger(__name__)

FOUND_BY_STRUCTURE = "module structure, confirmed by the gradient"
# A norm's eps breaks scale by about eps / mean(x²) (1e-6 / 4e-4 at a typical initialisation).
SCALE_TOL = 5e-2


def structural_tolerance(dtype: torch.dtype) -> float:
    """The residual a candidate that holds exactly stays under: float rounding of ⟨g, ξ⟩."""
    if dtype == torch.float64:
        return 1e-8
    if dtype == torch.float32:
        return 1e-4
    return 2e-2


# ------------------------------------------------------------------------------------------------
# Projections and members
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Proj:
    """y = W x + b restricted to `n` output units, possibly a slice of a fused weight: output
    unit u is row `lo + u` of W (column, for GPT-2's Conv1D whose weight is [in, out]: `transposed`)
    and element `b_lo + u` of b."""

    weight: Tensor
    weight_name: str
    bias: Tensor | None
    bias_name: str | None
    n: int
    lo: int = 0
    b_lo: int = 0
    transposed: bool = False

    @property
    def out_axis(self) -> str:
        return "cols" if self.transposed else "rows"

    @property
    def in_axis(self) -> str:
        return "rows" if self.transposed else "cols"

    @property
    def in_size(self) -> int:
        return self.weight.shape[0 if self.transposed else 1]

    def outputs(self, groups: Sequence[int], role: str) -> list[Member]:
        """Output unit u in group groups[u]: its weight row (column) and bias element."""
        out = [Member(self.weight, self.weight_name, self.out_axis, role,
                      index=_index(self.weight.shape[1 if self.transposed else 0], self.lo, groups))]
        if self.bias is not None:
            out.append(Member(self.bias, self.bias_name, "rows", role, index=_index(self.bias.shape[0], self.b_lo, groups)))
        return out

    def inputs(self, groups: Sequence[int], role: str) -> list[Member]:
        """Input unit j in group groups[j]: the weight's column (row, transposed) j."""
        return [Member(self.weight, self.weight_name, self.in_axis, role, index=_index(self.in_size, 0, groups))]


def _index(length: int, lo: int, groups: Sequence[int]) -> tuple[int, ...] | None:
    """The track's index: groups at lo.., -1 elsewhere; None for the identity (every row its own
    group, in order: the plain track, the shortest description)."""
    groups = list(groups)
    if lo == 0 and len(groups) == length and groups == list(range(length)):
        return None
    out = [-1] * length
    out[lo : lo + len(groups)] = groups
    return tuple(out)


def _linear(m: Any) -> bool:
    return isinstance(m, nn.Linear)


def _conv1d(m: Any) -> bool:
    """GPT-2's transformers.pytorch_utils.Conv1D: y = x @ W + b, W [in, out]."""
    return type(m).__name__ == "Conv1D" and isinstance(getattr(m, "weight", None), Tensor) and m.weight.dim() == 2


def _norm(m: Any) -> bool:
    """LayerNorm / RMSNorm over the last dim with a 1-D weight (torch's or a model's own)."""
    if m is None or isinstance(m, nn.modules.batchnorm._BatchNorm):
        return False
    w = getattr(m, "weight", None)
    name = type(m).__name__
    return isinstance(w, Tensor) and w.dim() == 1 and ("LayerNorm" in name or "RMSNorm" in name)


class _Names:
    """Parameter names (the first of a tensor's names) and the tensors held under two names."""

    def __init__(self, model: nn.Module) -> None:
        self.names: dict[int, str] = {}
        count: dict[int, int] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            self.names.setdefault(id(p), name)
            count[id(p)] = count.get(id(p), 0) + 1
        self.shared = {pid for pid, k in count.items() if k > 1}

    def __call__(self, p: Tensor | None) -> str | None:
        return None if p is None else self.names.get(id(p))

    def proj(self, m: nn.Module, n: int | None = None, lo: int = 0) -> Proj:
        transposed = _conv1d(m)
        size = m.weight.shape[1 if transposed else 0]
        bias = getattr(m, "bias", None)
        return Proj(m.weight, self(m.weight), bias, self(bias), size if n is None else n, lo, lo, transposed)


# ------------------------------------------------------------------------------------------------
# Candidates: alternatives per family, finest first
# ------------------------------------------------------------------------------------------------
@dataclass
class Candidate:
    """One family's alternatives (finest grouping first): the first that passes is claimed.
    `softmax`: the dim of the output whose log-softmax the check reads (a head's translation),
    None: the output itself."""

    what: str
    alternatives: list[tuple[str, Symmetry]]
    softmax: int | None = None


def _rescale(name: str, a1: Iterable[Member], a2: Iterable[Member]) -> Symmetry:
    return Symmetry.from_members("rescale", name, [*a1, *a2])


def _cols_of(projs: Sequence[Proj], width: int, role: str) -> list[Member]:
    """The input columns of every projection (one member per distinct weight)."""
    seen: set[int] = set()
    out: list[Member] = []
    for p in projs:
        if id(p.weight) not in seen:
            seen.add(id(p.weight))
            out += p.inputs(range(width), role)
    return out


@dataclass
class _Attention:
    name: str
    q: Proj
    k: Proj
    v: Proj
    o: Proj
    heads: int
    kv_heads: int
    head_dim: int
    key_bias: bool = True  # False where something else enters the keys (bias_k, a zero key)
    qk_norm: bool = False

    def check(self) -> bool:
        d, H, Hk = self.head_dim, self.heads, self.kv_heads
        return (H > 0 and Hk > 0 and H % Hk == 0 and self.q.n == H * d and self.k.n == Hk * d
                and self.v.n == Hk * d and self.o.in_size == H * d)

    def candidates(self) -> list[Candidate]:
        d, H, Hk = self.head_dim, self.heads, self.kv_heads
        rep = H // Hk
        q_head = [(u // d) // rep for u in range(H * d)]  # the key head each query unit meets
        within_q = [u % d for u in range(H * d)]
        within_k = [u % d for u in range(Hk * d)]
        k_head = [u // d for u in range(Hk * d)]
        out = []
        if self.qk_norm:
            out.append(Candidate(f"{self.name} query heads", [
                ("per head", Symmetry.from_members("scale", f"{self.name}[q per head]",
                                                   self.q.outputs([u // d for u in range(H * d)], "A"))),
                ("whole", Symmetry.from_members("scale", f"{self.name}[q]", self.q.outputs([0] * (H * d), "A")))]))
            out.append(Candidate(f"{self.name} key heads", [
                ("per head", Symmetry.from_members("scale", f"{self.name}[k per head]", self.k.outputs(k_head, "A"))),
                ("whole", Symmetry.from_members("scale", f"{self.name}[k]", self.k.outputs([0] * (Hk * d), "A")))]))
        else:
            ways: list[tuple[str, Callable[[int, int], int]]] = [("per dimension", lambda h, i: h * d + i)]
            if d % 2 == 0:
                ways += [("per rotary pair (i, i + d/2)", lambda h, i: h * (d // 2) + i % (d // 2)),
                         ("per rotary pair (2i, 2i + 1)", lambda h, i: h * (d // 2) + i // 2)]
            ways.append(("per head", lambda h, i: h))
            alts = []
            for label, group in ways:
                qg = [group(h, i) for h, i in zip(q_head, within_q)]
                kg = [group(h, i) for h, i in zip(k_head, within_k)]
                alts.append((label, _rescale(f"{self.name}[q->k {label}]", self.q.outputs(qg, "A1"),
                                             self.k.outputs(kg, "A2"))))
            out.append(Candidate(f"{self.name} queries/keys", alts))
            if self.k.bias is not None and self.key_bias:
                members = [Member(self.k.bias, self.k.bias_name, "rows", "A",
                                  index=_index(self.k.bias.shape[0], self.k.b_lo, range(self.k.n)))]
                out.append(Candidate(f"{self.name} key bias", [
                    ("per element", Symmetry.from_members("translation", f"{self.name}[key bias]", members))]))
        o_groups = [(h // rep) * d + i for h in range(H) for i in range(d)]
        vo = [("per dimension", _rescale(f"{self.name}[v->o]", self.v.outputs(range(Hk * d), "A1"),
                                         self.o.inputs(o_groups, "A2")))]
        vo.append(("per head", _rescale(f"{self.name}[v->o per head]", self.v.outputs(k_head, "A1"),
                                        self.o.inputs([g // d for g in o_groups], "A2"))))
        out.append(Candidate(f"{self.name} values/output", vo))
        return out

    def input_projs(self) -> list[Proj]:
        return [self.q, self.k, self.v]


def _attr(m: nn.Module, *names: str) -> Any:
    """The first of `names` set on the module or on its config."""
    config = getattr(m, "config", None)
    for holder in (m, config):
        for n in names:
            v = getattr(holder, n, None) if holder is not None else None
            if isinstance(v, int) and not isinstance(v, bool):
                return v
    return None


def _attention_of(mname: str, m: nn.Module, parent: nn.Module | None, names: _Names) -> _Attention | None:
    if isinstance(m, nn.MultiheadAttention):
        if m.bias_k is not None or m.bias_v is not None:
            log.info("no attention symmetries claimed for %s: add_bias_kv appends a learned key and value", mname)
            return None
        E, H = m.embed_dim, m.num_heads
        b, bn = m.in_proj_bias, names(m.in_proj_bias)
        if m._qkv_same_embed_dim:
            W, wn = m.in_proj_weight, names(m.in_proj_weight)
            q, k, v = (Proj(W, wn, b, bn, E, i * E, i * E) for i in range(3))
        else:
            q, k, v = (Proj(w, names(w), b, bn, E, 0, i * E) for i, w in
                       enumerate((m.q_proj_weight, m.k_proj_weight, m.v_proj_weight)))
        o = names.proj(m.out_proj)
        # add_zero_attn appends a zero key that the key bias does not shift
        return _Attention(mname, q, k, v, o, H, H, E // H, key_bias=not m.add_zero_attn)
    children = dict(m.named_children())
    if all(_linear(children.get(n)) for n in ("query", "key", "value")):
        out = getattr(getattr(parent, "output", None), "dense", None) if parent is not None else None
        H, d = _attr(m, "num_attention_heads"), _attr(m, "attention_head_size")
        if not _linear(out) or getattr(parent, "self", None) is not m or H is None or d is None:
            return None
        q, k, v = (names.proj(children[n]) for n in ("query", "key", "value"))
        return _Attention(mname, q, k, v, names.proj(out), H, H, d)
    if _conv1d(children.get("c_attn")) and _conv1d(children.get("c_proj")) and "q_attn" not in children:
        E, H, d = _attr(m, "embed_dim"), _attr(m, "num_heads"), _attr(m, "head_dim")
        c = children["c_attn"]
        if E is None or H is None or d is None or c.weight.shape[1] != 3 * E:
            return None
        q, k, v = (names.proj(c, E, i * E) for i in range(3))
        return _Attention(mname, q, k, v, names.proj(children["c_proj"]), H, H, d)
    if _linear(children.get("qkv_proj")) and _linear(children.get("o_proj")):  # Phi-3: rows q | k | v
        fused = names.proj(children["qkv_proj"])
        H = _attr(m, "num_heads", "num_attention_heads", "n_heads")
        d = _attr(m, "head_dim") or (children["o_proj"].in_features // H if H else None)
        if H is None or not d:
            return None
        Hk = _attr(m, "num_key_value_heads", "num_kv_heads") or (fused.n - H * d) // (2 * d)
        sizes = (H * d, Hk * d, Hk * d)
        if sum(sizes) != fused.n:
            return None
        starts = (0, H * d, H * d + Hk * d)
        q, k, v = (Proj(fused.weight, fused.weight_name, fused.bias, fused.bias_name, n, lo, lo)
                   for n, lo in zip(sizes, starts))
        return _Attention(mname, q, k, v, names.proj(children["o_proj"]), H, Hk, d)
    if all(_linear(children.get(n)) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
        q, k, v, o = (names.proj(children[n]) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
        H = _attr(m, "num_heads", "num_attention_heads", "n_heads", "n_head")
        d = _attr(m, "head_dim") or (q.n // H if H else None)
        if H is None or not d:
            return None
        Hk = _attr(m, "num_key_value_heads", "num_kv_heads", "n_kv_heads") or k.n // d
        qk_norm = _norm(children.get("q_norm")) or _norm(children.get("k_norm"))
        return _Attention(mname, q, k, v, o, H, Hk, d, qk_norm=qk_norm)
    return None


# (up, down, gate) child names of MLPs; gate None: a plain MLP
_MLPS = (("up_proj", "down_proj", "gate_proj"), ("w3", "w2", "w1"), ("fc1", "fc2", None),
         ("linear1", "linear2", None), ("c_fc", "c_proj", None), ("dense_h_to_4h", "dense_4h_to_h", None),
         ("up_proj", "down_proj", None))


def _mlp_of(mname: str, m: nn.Module, names: _Names) -> tuple[list[Proj], list[Candidate]] | None:
    """The MLP's first projections (what a norm before it feeds) and its rescale candidates."""
    children = dict(m.named_children())
    layer = lambda x: _linear(x) or _conv1d(x)
    if layer(children.get("gate_up_proj")) and layer(children.get("down_proj")):
        fused, down = names.proj(children["gate_up_proj"]), names.proj(children["down_proj"])
        inner = down.in_size
        if fused.n != 2 * inner:
            return None
        alts = [(f"up = {half} half", _rescale(f"{mname}.gate_up_proj[{half}]->{mname}.down_proj",
                                                Proj(fused.weight, fused.weight_name, fused.bias, fused.bias_name,
                                                     inner, lo, lo, fused.transposed).outputs(range(inner), "A1"),
                                                down.inputs(range(inner), "A2")))
                for half, lo in (("second", inner), ("first", 0))]
        return [fused], [Candidate(f"{mname} gated MLP", alts)]
    if "intermediate" in children and "output" in children:
        up, down = getattr(children["intermediate"], "dense", None), getattr(children["output"], "dense", None)
        if _linear(up) and _linear(down):
            children = {"up": up, "down": down}
            pairs = [("up", "down", None)]
        else:
            return None
    else:
        pairs = _MLPS
    for up_name, down_name, gate_name in pairs:
        up, down = children.get(up_name), children.get(down_name)
        gate = children.get(gate_name) if gate_name else None
        if not (layer(up) and layer(down)) or (gate_name and not layer(gate)) or (not gate_name and "gate_proj" in children):
            continue
        u, dn = names.proj(up), names.proj(down)
        if u.n != dn.in_size:
            continue
        first = [names.proj(gate), u] if gate is not None else [u]
        label = "gated MLP" if gate is not None else "MLP"
        sym = _rescale(f"{_join(mname, up_name)}->{_join(mname, down_name)}", u.outputs(range(u.n), "A1"),
                       dn.inputs(range(u.n), "A2"))
        return first, [Candidate(f"{mname} {label}", [("per hidden unit", sym)])]
    return None


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


# (norm, attention) and (norm, MLP) child names of pre-norm blocks
_ATTN_NORMS = (("ln_1", "attn"), ("input_layernorm", "self_attn"), ("attention_norm", "attention"),
               ("norm1", "self_attn"), ("ln_1", "self_attn"), ("attn_norm", "attn"))
_MLP_NORMS = (("ln_2", "mlp"), ("post_attention_layernorm", "mlp"), ("ffn_norm", "feed_forward"),
              ("norm2", "mlp"), ("mlp_norm", "mlp"))
_FINAL_NORMS = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f")
_HEADS = ("lm_head", "head", "classifier", "score", "fc_out", "output")
_EMBEDDING_NORMS = ("LayerNorm", "layer_norm", "layernorm", "norm", "ln", "ln_emb")


def _norm_candidate(label: str, norm: nn.Module, norm_name: str, consumers: Sequence[Proj], names: _Names) -> Candidate | None:
    width = norm.weight.shape[0]
    if not consumers or any(p.in_size != width for p in consumers):
        return None
    a1 = [Member(norm.weight, names(norm.weight), "rows", "A1")]
    if isinstance(getattr(norm, "bias", None), Tensor):
        a1.append(Member(norm.bias, names(norm.bias), "rows", "A1"))
    block = norm_name.rsplit(".", 1)[0] + "." if "." in norm_name else ""
    targets = "+".join(sorted({p.weight_name.rsplit(".", 1)[0].removeprefix(block) for p in consumers}))
    sym = _rescale(f"{norm_name}->{targets}", a1, _cols_of(consumers, width, "A2"))
    return Candidate(label, [("per feature", sym)])


def _head(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The output head: a Hugging Face model's output embeddings, else a direct child named as
    heads usually are."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if _linear(head):
        return next(n for n, m in model.named_modules() if m is head), head
    for n in _HEADS:
        m = getattr(model, n, None)
        if _linear(m):
            return n, m
    return None


def _hf_loss(model: nn.Module) -> str | None:
    """What a Hugging Face model's own loss takes a softmax over: "lm" for an LM head (its
    output embeddings: cross-entropy over the vocabulary), "classes" for single-label
    classification; None otherwise (regression, multi-label, unknown)."""
    config = getattr(model, "config", None)
    get = getattr(model, "get_output_embeddings", None)
    if config is None or not callable(get):
        return None
    if _linear(get()):
        return "lm"
    return "classes" if getattr(config, "problem_type", None) == "single_label_classification" else None


def _candidates(model: nn.Module, names: _Names, loss_dim: int | None, refusals: list[str]) -> list[Candidate]:
    out: list[Candidate] = []
    parents: dict[int, nn.Module] = {}
    for m in model.modules():
        for c in m.children():
            parents.setdefault(id(c), m)
    attention: dict[int, _Attention] = {}
    mlps: dict[int, list[Proj]] = {}
    for mname, m in model.named_modules():
        unit = _attention_of(mname, m, parents.get(id(m)), names)
        if unit is not None:
            if unit.check():
                attention[id(m)] = unit
                out += unit.candidates()
            else:
                log.info("no attention symmetries claimed for %s: projection shapes do not match %d heads of %d "
                         "(%d key/value heads)", mname, unit.heads, unit.head_dim, unit.kv_heads)
            continue
        mlp = _mlp_of(mname, m, names)
        if mlp is not None:
            mlps[id(m)] = mlp[0]
            out += mlp[1]
    for mname, m in model.named_modules():
        children = dict(m.named_children())
        if isinstance(m, nn.TransformerEncoderLayer):
            pairs = [("norm1", "self_attn"), ("norm2", None)] if m.norm_first else []
        else:
            pairs = [*_ATTN_NORMS, *_MLP_NORMS]
        for norm_name, target_name in pairs:
            norm = children.get(norm_name)
            if not _norm(norm):
                continue
            if target_name is None:  # TransformerEncoderLayer's feed-forward: linear1 is a direct child
                consumers = [names.proj(m.linear1)]
            else:
                target = children.get(target_name)
                if target is None:
                    continue
                consumers = (attention[id(target)].input_projs() if id(target) in attention
                             else mlps.get(id(target), []))
            c = _norm_candidate(f"{_join(mname, norm_name)} affine", norm, _join(mname, norm_name), consumers, names)
            if c is not None:
                out.append(c)
        tables = [c for c in children.values() if isinstance(c, nn.Embedding)]
        norms = [children[n] for n in _EMBEDDING_NORMS if _norm(children.get(n))]
        if tables and len(norms) == 1 and not any(isinstance(c, nn.ModuleList) for c in children.values()):
            if any(id(t.weight) in names.shared for t in tables):
                refusals.append(f"no scale symmetry claimed on the embeddings of {mname or 'the model'}: an "
                                "embedding table is tied to another layer (the LM head), which the scale would "
                                "change too")
            else:
                members = [Member(t.weight, names(t.weight), "all", "A") for t in tables]
                out.append(Candidate(f"{mname} embeddings", [
                    ("all tables", Symmetry.from_members("scale", f"{_join(mname, 'embeddings')}[scale]", members))]))
    head = _head(model)
    if head is not None:
        hname, hm = head
        hf = _hf_loss(model)
        tied = id(hm.weight) in names.shared
        loss_softmax = loss_dim is not None
        if tied and (hf is not None or loss_softmax):
            refusals.append(f"no translation symmetry claimed on {hname}: its weight is tied to the input embedding "
                            f"({names(hm.weight)}), so adding α to a column of the head also shifts every token's "
                            "embedding; untie the embeddings (tie_word_embeddings=False) to get it")
        elif hf is not None or loss_softmax:
            members = [Member(hm.weight, names(hm.weight), "cols", "A")]
            if hm.bias is not None:
                members.append(Member(hm.bias, names(hm.bias), "all", "A"))
            # a Hugging Face head's logits put the vocabulary / classes last; else the loss's dim
            out.append(Candidate(f"{hname} softmax", [
                ("per column", Symmetry.from_members("translation", hname, members))],
                softmax=-1 if hf is not None else loss_dim))
        elif getattr(model, "config", None) is not None and hm is getattr(model, "classifier", getattr(model, "score", None)):
            refusals.append(f"no translation symmetry claimed on {hname}: {type(model).__name__}'s config has "
                            f"problem_type {getattr(model.config, 'problem_type', None)!r}; it holds for "
                            "'single_label_classification' (cross-entropy) or with loss= a softmax cross-entropy")
        if not tied:
            final = [(n, c) for n, c in model.named_modules() if n.rsplit(".", 1)[-1] in _FINAL_NORMS and _norm(c)]
            if len(final) == 1:
                c = _norm_candidate(f"{final[0][0]} affine", final[0][1], final[0][0], [names.proj(hm)], names)
                if c is not None:
                    out.append(c)
    # shared tensors break what the other use does not see
    kept = []
    for c in out:
        alts = [(label, s) for label, s in c.alternatives
                if not any(id(m.param) in names.shared for m in s.members)]
        if alts:
            kept.append(Candidate(c.what, alts, c.softmax))
        else:
            log.info("no symmetry claimed for %s: a parameter is shared with another layer", c.what)
    return kept


# ------------------------------------------------------------------------------------------------
# The check
# ------------------------------------------------------------------------------------------------
def _output_tensors(out: Any) -> list[Tensor]:
    """The float tensors a model returns: a Hugging Face output's logits (or its first entry;
    caches hold keys, which a query/key rescale changes), else every tensor of a tuple / dict."""
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return [logits]
    if hasattr(out, "to_tuple"):
        first = out.to_tuple()[0] if len(out.to_tuple()) else None
        return [first] if isinstance(first, Tensor) else []
    if isinstance(out, Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, tuple | list):
        return [t for x in out for t in _output_tensors(x)]
    return []


class _Gradients:
    """The gradient of a random read-out of the output (and of its log-softmax over a dim, on
    first use), and each candidate's worst group residual against it. `release()` frees the
    graph."""

    def __init__(self, model: nn.Module, inputs: tuple[Any, ...]) -> None:
        from nm_optim.symmetry.verify import _no_running_stat_updates

        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.index = {id(p): i for i, (_, p) in enumerate(named)}
        params = [p for _, p in named]
        gen = torch.Generator().manual_seed(0)
        devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
        with _no_running_stat_updates(model), torch.random.fork_rng(devices=devices), torch.enable_grad():
            torch.manual_seed(0)
            outs = _output_tensors(model(*inputs))
            if not outs:
                raise ValueError(f"{type(model).__name__} returned no float tensor to check symmetries on")
            self._read = lambda ts: sum((t * torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device)).sum()
                                        for t in ts)
            self._outs, self._params = outs, params
            self._grads: dict[int | None, tuple[tuple[Tensor | None, ...], float]] = {}
            self._of(None)
        self.dtype = params[0].dtype if params else torch.float32

    def _of(self, dim: int | None) -> tuple[tuple[Tensor | None, ...], float]:
        """The gradient of the read-out of the output (of its log-softmax over `dim`) and its RMS."""
        if dim not in self._grads:
            outs = self._outs if dim is None else [torch.log_softmax(t, dim=dim) for t in self._outs if t.dim() >= 1]
            with torch.enable_grad():
                grads = torch.autograd.grad(self._read(outs), self._params, retain_graph=True, allow_unused=True)
            total = sum(float(g.double().pow(2).sum()) for g in grads if g is not None)
            count = sum(g.numel() for g in grads if g is not None)
            self._grads[dim] = grads, math.sqrt(total / max(count, 1))
        return self._grads[dim]

    def release(self) -> None:
        self._outs, self._grads = [], {}

    def residual(self, sym: Symmetry, softmax: int | None) -> float:
        """max over groups |⟨g_A, ξ_A⟩| / (|ξ_A| |g_A|) (translation: / (|ξ_A| max(|g_A|, √n_A ḡ)));
        inf where a member gets no gradient (it does not reach the output: nothing to confirm)."""
        grads, rms = self._of(softmax)
        G = sym.num_groups
        dot, gg, xx, nn_ = (torch.zeros(G, dtype=torch.float64) for _ in range(4))
        for m, off in zip(sym.members, sym._offsets):
            i = self.index.get(id(m.param))
            g = grads[i] if i is not None else None
            if g is None:
                return math.inf
            theta = m.param.detach()
            xi = torch.ones_like(theta) if sym.kind == "translation" else (-theta if m.role == "A2" else theta)
            sl = slice(off, off + m.num_groups)
            dot[sl] += m.reduce(g * xi).double().cpu()
            gg[sl] += m.reduce(g * g).double().cpu()
            xx[sl] += m.reduce(xi * xi).double().cpu()
            nn_[sl] += m.reduce(torch.ones_like(g)).double().cpu()
        # A translation group's gradient may vanish identically (a key bias): then it must be
        # rounding small against the model's; elsewhere the cosine (a floor there would let a
        # group with a small gradient, a GELU unit's, pass).
        floor = nn_.sqrt() * rms if sym.kind == "translation" else torch.zeros_like(nn_)
        den = xx.sqrt() * torch.maximum(gg.sqrt(), floor)
        res = torch.where(den > 0, dot.abs() / den.clamp_min(1e-300), torch.zeros_like(dot))
        return float(res.max()) if G else 0.0


def signature(sym: Symmetry) -> tuple[Any, ...]:
    """What makes two symmetries the same: kind and members (one found both ways is one)."""
    return (sym.kind, tuple(sorted((m.name, m.axis, m.role, m.block, m.index or ()) for m in sym.members)))


def find_by_structure(model: nn.Module, inputs: tuple[Any, ...], *, loss_dim: int | None = None,
                      refusals: list[str] | None = None, known: set[tuple[Any, ...]] = frozenset()) -> list[Symmetry]:
    """The attention, MLP, normalisation, embedding and head symmetries the module tree proposes
    and one gradient on `inputs` confirms (module docstring), in module order. `loss_dim`: the dim
    of the model's output the loss takes a softmax over, None for none or unknown (decides a head's
    translation outside Hugging Face models, whose own loss is known). Refusals worth a warning are
    appended to `refusals`; the rest is logged. A family with an alternative among `known`
    (signatures of symmetries torch.fx found) is left out: nothing to check."""
    names = _Names(model)
    refusals = [] if refusals is None else refusals
    candidates = [c for c in _candidates(model, names, loss_dim, refusals)
                  if not any(signature(sym) in known for _, sym in c.alternatives)]
    if not candidates:
        return []
    if any(p.device.type == "meta" for p in model.parameters()):
        log.info("find_symmetries: %d structural candidates on %s not checked (meta device: no values); none claimed",
                 len(candidates), type(model).__name__)
        refusals.append(f"the attention / normalisation symmetries of {type(model).__name__} are found by module "
                        "structure and confirmed with one gradient on the example inputs, which needs real "
                        "tensors: call find_symmetries on the model before moving it to the meta device")
        return []
    grads = _Gradients(model, inputs)
    tol = structural_tolerance(grads.dtype)
    found = []
    for c in candidates:
        tried = []
        for label, sym in c.alternatives:
            limit = max(tol, SCALE_TOL) if sym.kind == "scale" else tol
            r = grads.residual(sym, c.softmax)
            tried.append(f"{label}: {r:.1e}")
            if r <= limit:
                found.append(sym)
                log.info("%s: %s %s holds (gradient residual %.1e <= %.0e)", c.what, sym.kind, label, r, limit)
                break
        else:
            log.info("no symmetry claimed for %s: the gradient breaks every grouping tried (%s)", c.what,
                     ", ".join(tried))
    grads.release()
    return found
