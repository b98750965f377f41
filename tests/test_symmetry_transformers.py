"""The symmetries of transformers (nm_optim/symmetry/structural.py): found by module structure
where torch.fx cannot trace, confirmed by one gradient, and holding to rounding under
verify_symmetries' gradient and Hessian identities in float64 (the paper: Kunin et al., ICLR
2021, section 3; docs/transformers.md).

Models: nn.MultiheadAttention and nn.TransformerEncoderLayer; Hugging Face BERT and GPT-2 from
small configs (no download); a Llama-style block written here (RMSNorm, rotary embeddings,
grouped-query attention, SiLU gating, optional QK-norm); a torchvision-style ResNet block.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nm_optim.symmetry import (
    Member,
    Rescale,
    Symmetry,
    find_symmetries,
    found_by,
    verify_symmetries,
)
from nm_optim.symmetry.detect import FOUND_BY_FX, FOUND_BY_STRUCTURE

STRICT = 1e-9  # float64 residuals of symmetries that hold exactly sit at ~1e-16


def names(syms):
    return [s.name for s in syms]


def by_name(syms):
    return {s.name: s for s in syms}


def quiet_find(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return find_symmetries(*args, **kwargs)


def readout_loss(out, target):
    """A loss that is a generic function of the whole output (no softmax): only the symmetries of
    the output itself hold."""
    out = out[0] if isinstance(out, tuple) else out
    return (out * target).sum()


# -- Member index maps ------------------------------------------------------------------------------
def test_an_index_map_groups_rows_and_leaves_others_out():
    w = torch.arange(24.0).reshape(6, 4)
    m = Member(w, "w", "rows", "A", index=(-1, -1, 0, 1, 0, 1))
    assert m.num_groups == 2
    assert m.reduce(w).tolist() == [w[2].sum() + w[4].sum(), w[3].sum() + w[5].sum()]
    e = m.expand(torch.tensor([10.0, 20.0]))
    assert e[:2].eq(0).all() and e[2].eq(10).all() and e[5].eq(20).all()
    stats = np.arange(3 * 6 * 9, dtype=np.float64).reshape(3, 6, 9)
    assert np.array_equal(m.fold(stats), np.stack([stats[:, 2] + stats[:, 4], stats[:, 3] + stats[:, 5]], 1))
    cols = Member(w, "w", "cols", "A2", index=(1, 1, 0, -1))
    assert cols.reduce(torch.ones_like(w)).tolist() == [6.0, 12.0]
    d = Symmetry.from_members("scale", "s", [m]).describe()
    assert d["members"][0]["index_runs"] == [[-1, 2, 0], [0, 2, 1], [0, 2, 1]]
    assert Symmetry.from_description(d).members[0].index == m.index


def test_a_fused_slice_is_described_in_a_few_runs():
    E = 256
    q = Member(torch.zeros(3 * E, E), "in_proj_weight", "rows", "A", index=tuple(range(E)) + (-1,) * (2 * E))
    pairs = Member(torch.zeros(E, E), "k", "rows", "A", index=tuple(h * 16 + i % 16 for h in range(8) for i in range(32)))
    for m, runs in ((q, 2), (pairs, 16)):
        d = m.describe()
        assert len(d["index_runs"]) <= runs
        assert Symmetry.from_description({"kind": "scale", "name": "s", "members": [d]}).members[0].index == m.index


@pytest.mark.parametrize("index, match", [((0, 1), "2 entries, the track has 3 rows"), ((0, 2, 2), "each used"), ((-2, 0, 0), "0..n-1"),
                                          ((-1, -1, -1), "0..n-1")])
def test_an_index_map_is_checked(index, match):
    with pytest.raises(ValueError, match=match):
        Member(torch.zeros(3, 2), "w", "rows", "A", index=index)


def test_an_index_map_excludes_block_and_axis_all():
    with pytest.raises(ValueError, match="without block"):
        Member(torch.zeros(2, 4), "w", "cols", "A", block=2, index=(0, 0, 1, 1))
    with pytest.raises(ValueError, match="without block"):
        Member(torch.zeros(2, 4), "w", "all", "A", index=(0, 0))


# -- torch.nn -------------------------------------------------------------------------------------
def encoder(norm_first: bool) -> nn.Module:
    torch.manual_seed(0)
    return nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, norm_first=norm_first).double()


def seq(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def test_transformer_encoder_layer_pre_norm_found_by_structure_and_verified():
    layer = encoder(norm_first=True)
    x = seq(3, 5, 8)
    syms = find_symmetries(layer, x)
    assert names(syms) == ["linear1->linear2", "self_attn[q->k per dimension]", "self_attn[key bias]",
                           "self_attn[v->o]", "norm1->self_attn", "norm2->linear1"]
    assert {found_by(s) for s in syms} == {FOUND_BY_STRUCTURE}  # torch.fx cannot trace it
    s = by_name(syms)
    # fused in_proj_weight [3E, E]: queries rows 0..7, keys rows 8..15, values rows 16..23
    q, qb, k, kb = s["self_attn[q->k per dimension]"].members
    assert (q.role, k.role, q.axis, k.axis) == ("A1", "A2", "rows", "rows")
    assert q.index == tuple(range(8)) + (-1,) * 16 and k.index == (-1,) * 8 + tuple(range(8)) + (-1,) * 8
    assert s["self_attn[key bias]"].members[0].index == k.index
    assert s["self_attn[v->o]"].members[0].index == (-1,) * 16 + tuple(range(8))
    report = verify_symmetries(layer, readout_loss, (x, seq(3, 5, 8)), syms, tol=STRICT, hessian="exact")
    assert report.passed, report.table()


def test_post_norm_gives_no_norm_rescale_and_a_relu_feed_forward_its_rescale():
    syms = find_symmetries(encoder(norm_first=False), seq(3, 5, 8))
    assert names(syms) == ["linear1->linear2", "self_attn[q->k per dimension]", "self_attn[key bias]",
                           "self_attn[v->o]"]


def test_a_gelu_feed_forward_has_no_rescale():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, activation="gelu").double()
    assert "linear1->linear2" not in names(find_symmetries(layer, seq(3, 5, 8)))
    fake = Rescale(layer.linear1.weight, layer.linear2.weight, layer.linear1.bias, name="linear1->linear2")
    report = verify_symmetries(layer, readout_loss, (seq(3, 5, 8), seq(3, 5, 8)), [fake])
    assert not report.passed, report.table()


class MHA(nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True, **kwargs)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


@pytest.mark.parametrize("kwargs, expected", [
    ({}, ["attn[q->k per dimension]", "attn[key bias]", "attn[v->o]"]),
    ({"kdim": 6, "vdim": 8}, None),  # separate q/k/v_proj_weight
    ({"add_zero_attn": True}, ["attn[q->k per dimension]", "attn[v->o]"]),  # a zero key the bias does not shift
    ({"add_bias_kv": True}, []),  # a learned key and value row outside the projections
])
def test_multihead_attention_variants(kwargs, expected):
    torch.manual_seed(0)
    if "kdim" in kwargs:
        class Cross(nn.Module):
            def __init__(self):
                super().__init__()
                self.attn = nn.MultiheadAttention(8, 2, batch_first=True, **kwargs)

            def forward(self, x, mem):
                return self.attn(x, mem, x, need_weights=False)[0]

        model, inputs = Cross().double(), (seq(2, 4, 8), seq(2, 4, 6))
        expected = ["attn[q->k per dimension]", "attn[key bias]", "attn[v->o]"]
    else:
        model, inputs = MHA(**kwargs).double(), (seq(2, 4, 8),)
    syms = find_symmetries(model, inputs)
    assert names(syms) == expected
    report = verify_symmetries(model, readout_loss, (inputs, seq(2, 4, 8)), syms, tol=STRICT)
    assert report.passed, report.table()


# -- a Llama-style block, written here ---------------------------------------------------------------
def rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


class Attention(nn.Module):
    """Grouped-query attention with rotary embeddings (the (i, i + d/2) pairing of Llama's
    rotate_half), optional QK-norm per head."""

    def __init__(self, dim=16, heads=4, kv_heads=2, qk_norm=False, rope=True):
        super().__init__()
        self.num_heads, self.num_key_value_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q_proj = nn.Linear(dim, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(heads * self.head_dim, dim, bias=False)
        self.rope = rope
        if qk_norm:
            self.q_norm, self.k_norm = nn.RMSNorm(self.head_dim), nn.RMSNorm(self.head_dim)

    def forward(self, x):
        B, T, _ = x.shape
        d = self.head_dim
        q = self.q_proj(x).view(B, T, self.num_heads, d)
        k = self.k_proj(x).view(B, T, self.num_key_value_heads, d)
        v = self.v_proj(x).view(B, T, self.num_key_value_heads, d)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if self.rope:
            freq = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=x.dtype, device=x.device) / d)
            angle = torch.arange(T, dtype=x.dtype, device=x.device)[:, None] * freq[None, :]
            cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        rep = self.num_heads // self.num_key_value_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, dim=16, hidden=24):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = nn.RMSNorm(16), nn.RMSNorm(16)
        self.self_attn, self.mlp = Attention(**kwargs), MLP()

    def forward(self, x):
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class TinyLlama(nn.Module):
    def __init__(self, vocab=20, layers=2, tied=False, **kwargs):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, 16)
        self.layers = nn.ModuleList(Block(**kwargs) for _ in range(layers))
        self.norm = nn.RMSNorm(16)
        self.lm_head = nn.Linear(16, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, ids):
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x)).flatten(0, 1)  # (B*T, V): F.cross_entropy's class dim


def tokens(vocab=20, shape=(2, 6)):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(2))


def llama(**kwargs):
    torch.manual_seed(0)
    return TinyLlama(**kwargs).double()


def test_llama_block_rotary_pairs_grouped_queries_gating_and_norms():
    model, ids = llama(), tokens()
    syms = find_symmetries(model, ids, loss=F.cross_entropy)
    s = by_name(syms)
    qk = s["layers.0.self_attn[q->k per rotary pair (i, i + d/2)]"]
    # 2 key heads of 4 dims: pairs (0, 2), (1, 3) per key head; each query head meets key head h // 2
    assert qk.num_groups == 4
    q, k = qk.members
    assert k.index == (0, 1, 0, 1, 2, 3, 2, 3) and q.index == (0, 1, 0, 1) * 2 + (2, 3, 2, 3) * 2
    vo = s["layers.0.self_attn[v->o]"]
    assert vo.num_groups == 8 and vo.members[1].index == tuple(range(4)) * 2 + tuple(range(4, 8)) * 2
    assert "layers.0.mlp.up_proj->layers.0.mlp.down_proj" in s
    assert s["layers.0.input_layernorm->self_attn.k_proj+self_attn.q_proj+self_attn.v_proj"].num_groups == 16
    assert "layers.0.post_attention_layernorm->mlp.gate_proj+mlp.up_proj" in s
    assert "lm_head" in s and s["lm_head"].kind == "translation" and "norm->lm_head" in s
    assert not [n for n in s if "key bias" in n or "per dimension" in n]
    assert len(syms) == 2 * 5 + 2
    y = tokens(shape=(12,))
    report = verify_symmetries(model, F.cross_entropy, (ids, y), syms, tol=STRICT)
    assert report.passed, report.table()
    # the per-dimension grouping a detector ignoring the rotation would claim does not hold
    attn = model.layers[0].self_attn
    per_dim = Symmetry.from_members("rescale", "per dim", [
        Member(attn.q_proj.weight, "layers.0.self_attn.q_proj.weight", "rows", "A1", index=(0, 1, 2, 3) * 2 + (4, 5, 6, 7) * 2),
        Member(attn.k_proj.weight, "layers.0.self_attn.k_proj.weight", "rows", "A2")])
    bad = verify_symmetries(model, F.cross_entropy, (ids, y), [per_dim])
    assert not bad.passed and bad[0].grad_residual > 1e-3, bad.table()


def test_without_rotary_the_finest_grouping_is_per_dimension():
    syms = find_symmetries(llama(rope=False), tokens(), loss=F.cross_entropy)
    assert "layers.0.self_attn[q->k per dimension]" in names(syms)


def test_qk_norm_gives_per_head_scale_instead_of_the_rescale():
    model, ids = llama(qk_norm=True), tokens()
    syms = find_symmetries(model, ids, loss=F.cross_entropy)
    s = by_name(syms)
    assert s["layers.0.self_attn[q per head]"].kind == "scale" and s["layers.0.self_attn[q per head]"].num_groups == 4
    assert s["layers.0.self_attn[k per head]"].num_groups == 2
    assert not [n for n in s if "q->k" in n]
    report = verify_symmetries(model, F.cross_entropy, (ids, tokens(shape=(12,))), syms, tol=1e-6)
    assert report.passed, report.table()


def test_tied_embeddings_refuse_the_head_translation_with_a_reason():
    model = llama(tied=True)
    with pytest.warns(UserWarning, match=r"no translation symmetry claimed on lm_head: its weight is tied.*"
                                         r"embed_tokens.weight"):
        syms = find_symmetries(model, tokens(), loss=F.cross_entropy)
    assert "lm_head" not in names(syms) and "norm->lm_head" not in names(syms)


def test_no_head_translation_without_a_softmax_loss():
    syms = quiet_find(llama(), tokens())
    assert "lm_head" not in names(syms)


def test_structural_detection_needs_real_tensors_and_says_so():
    with torch.device("meta"):
        model = TinyLlama()
    with pytest.warns(UserWarning, match="needs real tensors"):
        assert find_symmetries(model, tokens(), loss=F.cross_entropy) == []


def test_detection_changes_nothing():
    model = llama()
    before = copy.deepcopy(model.state_dict())
    state = torch.random.get_rng_state()
    find_symmetries(model, tokens(), loss=F.cross_entropy)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(state, torch.random.get_rng_state())
    assert all(p.grad is None for p in model.parameters())


# -- Hugging Face, from small configs (no download) ---------------------------------------------------
transformers = pytest.importorskip("transformers")


def bert(**kwargs):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=24, max_position_embeddings=16, num_labels=3, **kwargs)
    return transformers.BertForSequenceClassification(config).double()


def gpt2(**kwargs):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=30, n_embd=16, n_layer=2, n_head=2, n_positions=16,
                                     bos_token_id=0, eos_token_id=0, **kwargs)
    return transformers.GPT2LMHeadModel(config).double()


def hf_ids():
    return tokens(30, (2, 7))


def test_bert_attention_embeddings_and_classifier():
    model = bert(problem_type="single_label_classification")
    syms = find_symmetries(model, hf_ids())
    layer = "bert.encoder.layer.0.attention.self"
    assert names(syms) == [f"{layer}[q->k per dimension]", f"{layer}[key bias]", f"{layer}[v->o]",
                           *[n.replace(".0.", ".1.") for n in (f"{layer}[q->k per dimension]", f"{layer}[key bias]",
                                                               f"{layer}[v->o]")],
                           "bert.embeddings.embeddings[scale]", "classifier"]
    emb = by_name(syms)["bert.embeddings.embeddings[scale]"]
    assert emb.num_groups == 1 and [m.name for m in emb.members] == [
        "bert.embeddings.word_embeddings.weight", "bert.embeddings.position_embeddings.weight",
        "bert.embeddings.token_type_embeddings.weight"]
    assert not [n for n in names(syms) if "intermediate" in n], "GELU MLP: no rescale"
    loss = lambda out, y: F.cross_entropy(out.logits, y)
    report = verify_symmetries(model, loss, (hf_ids(), torch.tensor([0, 2])), syms, tol=1e-6)
    assert report.passed, report.table()


def test_bert_without_a_known_loss_claims_no_classifier_translation():
    with pytest.warns(UserWarning, match="problem_type None"):
        syms = find_symmetries(bert(), hf_ids())
    assert "classifier" not in names(syms)
    assert "classifier" in names(quiet_find(bert(), hf_ids(), loss=F.cross_entropy))


def test_gpt2_fused_conv1d_attention_and_the_tied_head():
    model = gpt2()
    with pytest.warns(UserWarning, match="tied to the input embedding"):
        syms = find_symmetries(model, hf_ids())
    s = by_name(syms)
    qk = s["transformer.h.0.attn[q->k per dimension]"]
    # Conv1D's weight is [in, out]: the output units are columns, the key slice columns 16..31
    assert [(m.name, m.axis) for m in qk.members] == [
        ("transformer.h.0.attn.c_attn.weight", "cols"), ("transformer.h.0.attn.c_attn.bias", "rows"),
        ("transformer.h.0.attn.c_attn.weight", "cols"), ("transformer.h.0.attn.c_attn.bias", "rows")]
    assert [(m.name, m.axis) for m in s["transformer.h.0.attn[v->o]"].members][-1] == (
        "transformer.h.0.attn.c_proj.weight", "rows")
    assert "transformer.h.0.ln_1->attn.c_attn" in s and "transformer.h.0.ln_2->mlp.c_fc" in s
    assert not [n for n in s if "c_fc->" in n], "GELU MLP: no rescale"
    assert "lm_head" not in s
    loss = lambda out, y: F.cross_entropy(out.logits.flatten(0, 1), y.flatten())
    report = verify_symmetries(model, loss, (hf_ids(), hf_ids()), syms, tol=1e-6)
    assert report.passed, report.table()


def test_gpt2_untied_gets_its_lm_head_translation():
    model = gpt2(tie_word_embeddings=False)
    syms = find_symmetries(model, hf_ids())
    assert {"lm_head", "transformer.ln_f->lm_head"} <= set(names(syms))
    loss = lambda out, y: F.cross_entropy(out.logits.flatten(0, 1), y.flatten())
    report = verify_symmetries(model, loss, (hf_ids(), hf_ids()), syms, tol=1e-6)
    assert report.passed, report.table()


# -- torchvision-style ResNet: torch.fx still does the convolutional part --------------------------------
class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (self.downsample(x) if self.downsample is not None else x))


class ResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, 1, 1, bias=False), nn.BatchNorm2d(4)
        self.layer1, self.layer2 = BasicBlock(4, 4), BasicBlock(4, 8, stride=2)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def test_resnet_scale_inside_residual_blocks_and_no_rescale_across_them():
    torch.manual_seed(0)
    model = ResNet().double()
    x = seq(6, 3, 8, 8)
    syms = find_symmetries(model, x, loss=F.cross_entropy)
    assert {found_by(s) for s in syms} == {FOUND_BY_FX}
    assert [s.name for s in syms if s.kind == "scale"] == [
        "conv1", "layer1.conv1", "layer1.conv2", "layer2.conv1", "layer2.conv2", "layer2.downsample.0"]
    assert [s.kind for s in syms if s.kind != "scale"] == ["translation"]
    y = torch.randint(0, 5, (6,), generator=torch.Generator().manual_seed(0))
    # BatchNorm's eps breaks scale by about eps / channel variance: the fp64 default (1e-6) says so
    report = verify_symmetries(model, F.cross_entropy, (x, y), syms)
    assert report.tol == 1e-6 and not report.passed and report.failed[0].kind == "scale", report.table()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = 1e-14
    assert verify_symmetries(model, F.cross_entropy, (x, y), syms).passed


# -- tracked by nm_optim.SGD: rows of existing tracks, summed after the step -----------------------------
def test_sgd_tracks_fused_slices_once_and_the_laws_hold_to_rounding():
    import nm_optim
    from nm_optim import theory

    torch.manual_seed(0)
    model = MHA().double()
    with torch.no_grad():  # torch starts in_proj_bias at 0, where the key bias's law is 0 = 0
        model.attn.in_proj_bias.uniform_(-0.3, 0.3)
    x = seq(4, 5, 8)
    syms = find_symmetries(model, x)
    W, b = model.attn.in_proj_weight, model.attn.in_proj_bias
    w0, b0 = W.detach().clone(), b.detach().clone()
    opt = nm_optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-2, symmetries=syms)
    # one track per (param, axis): the query, key and value slices share in_proj_weight's rows
    assert sorted(t.name for t in opt._tracks.tracks) == sorted({m.track for s in syms for m in s.members})
    assert sum(t.name == "attn.in_proj_weight:rows" for t in opt._tracks.tracks) == 1
    target = seq(4, 5, 8)
    for _ in range(6):
        opt.zero_grad()
        readout_loss(model(x), target).backward()
        opt.step()
    record = opt.recorder.snapshot()
    qk = by_name(syms)["attn[q->k per dimension]"].group_stats(record)
    pp = nm_optim.STAT_NAMES.index("pp")
    assert np.allclose(qk["A1"][0, :, pp], (w0[:8] ** 2).sum(1) + b0[:8] ** 2, rtol=1e-12)
    assert np.allclose(qk["A2"][0, :, pp], (w0[8:16] ** 2).sum(1) + b0[8:16] ** 2, rtol=1e-12)
    key_bias = by_name(syms)["attn[key bias]"].group_stats(record)["A"]
    assert np.allclose(key_bias[0, :, nm_optim.STAT_NAMES.index("p")], b0[8:16], rtol=1e-12)
    assert np.abs(key_bias[:, :, nm_optim.STAT_NAMES.index("g")]).max() < 1e-12  # the gradient vanishes
    result = theory.compare(record)  # rebuilt from the record's descriptions (index maps included)
    for p in result.predictions:
        assert np.nanmax(p.exact_error) < 1e-12, (p.name, p.exact_error)


def test_the_hugging_face_example_runs_and_its_laws_hold():
    from helpers import load_example

    result = load_example("transformer_hf").main(["--steps", "4"])
    assert {p.name for p in result.predictions} >= {"lm_head", "transformer.h.0.attn[key bias]",
                                                    "transformer.h.1.attn[q->k per dimension]"}
    for p in result.predictions:
        assert np.nanmax(p.exact_breaking_error) < 1e-4, (p.name, p.exact_breaking_error)


def causal_lm(name, **kwargs):
    torch.manual_seed(0)
    common = dict(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=24, max_position_embeddings=16)
    config = getattr(transformers, f"{name}Config")(**common, **kwargs)
    return getattr(transformers, f"{name}ForCausalLM")(config).double()


@pytest.mark.parametrize("name, kwargs, expected", [
    ("Llama", {}, {"model.layers.0.self_attn[q->k per rotary pair (i, i + d/2)]", "model.layers.0.self_attn[v->o]",
                   "model.layers.0.mlp.up_proj->model.layers.0.mlp.down_proj", "lm_head", "model.norm->lm_head"}),
    # Phi-3: one qkv_proj (rows q | k | v) and one gate_up_proj (gate first, then up)
    ("Phi3", {"pad_token_id": 0}, {"model.layers.0.self_attn[q->k per rotary pair (i, i + d/2)]",
                                   "model.layers.0.mlp.gate_up_proj[second]->model.layers.0.mlp.down_proj",
                                   "model.layers.0.input_layernorm->self_attn.qkv_proj"}),
    # Qwen3: RMSNorm on each head's queries and keys; eps tiny so that the float64 check is exact
    ("Qwen3", {"head_dim": 4, "rms_norm_eps": 1e-30}, {"model.layers.0.self_attn[q per head]",
                                                      "model.layers.0.self_attn[k per head]"}),
])
def test_hugging_face_decoders(name, kwargs, expected):
    model = causal_lm(name, **kwargs)
    syms = find_symmetries(model, hf_ids())
    assert expected <= set(names(syms)), names(syms)
    loss = lambda out, y: F.cross_entropy(out.logits.flatten(0, 1), y.flatten())
    report = verify_symmetries(model, loss, (hf_ids(), hf_ids()), syms, tol=1e-6)
    assert report.passed, report.table()


def test_a_head_torch_fx_already_found_is_not_checked_again_on_the_meta_device():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x):
            return self.head(F.relu(self.body(x)))

    with torch.device("meta"):
        model = Net()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "needs real tensors": torch.fx claimed the head already
        syms = find_symmetries(model, torch.zeros(2, 4), loss=F.cross_entropy)
    assert [(s.name, found_by(s)) for s in syms] == [("body->head", FOUND_BY_FX), ("head", FOUND_BY_FX)]
