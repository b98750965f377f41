"""`nm-optim demo --transformer`: the Neural Mechanics laws (Kunin et al., ICLR 2021) on the
symmetries of a small decoder-only transformer, trained character by character on the Python
standard library's own source files (they ship with every Python: no download).

The model (`CharTransformer`): token and learned position embeddings summed into a LayerNorm
(BERT's embedding norm: a scale symmetry of both tables together), pre-norm blocks of causal
self-attention (query/key/value/output projections with biases) and a SiLU-gated MLP, a final
LayerNorm and an untied LM head with a bias. `find_symmetries` finds, per layer: queries against
keys per dimension, values against the output per dimension, every key bias element (its gradient
vanishes identically: pure weight decay), the gated MLP's up/down rescale per hidden unit, each
LayerNorm's affine weight against the projections it feeds; and the LM head's translation per
column plus its bias, and the embeddings' scale (docs/transformers.md).

    OUT/transformer.png             theory (dotted) over experiment (coloured) for every law, one panel each
    OUT/records/transformer.npz     the record
    OUT/summary.json                one row per symmetry: errors of the exact law (without and with the
                                    measured breaking), the paper's continuous form, the goal met or not

Goal: the exact law with the measured breaking kept within GOALS[dtype] of the measurement for every
group (float rounding only); without it, what is left is the symmetry's real breaking (the
embedding LayerNorm's eps).
"""

from __future__ import annotations

import json
import math
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import nm_optim
from nm_optim import theory

TRANSFORMER_STEPS = 1000
GOALS = {torch.float32: 3e-4, torch.float64: 1e-9}
# Printable ASCII, tab and newline; everything else reads as one unknown character.
ALPHABET = "\t\n" + "".join(chr(c) for c in range(32, 127))
TEXT_CHARS = 1_000_000


@dataclass(frozen=True)
class Settings:
    """What the demo trains: sizes and SGD's hyper-parameters. Weight decay is large next to what
    one would train with, so that the decay the theory predicts (e^{-λt} for the key bias and the
    translation sums, with t = η k / (1 - β) under momentum β) is visible within 1000 steps."""

    layers: int = 2
    heads: int = 4
    dim: int = 64
    hidden: int = 128
    context: int = 64
    batch: int = 16
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-3


# ------------------------------------------------------------------------------------------------
# Data: the standard library's source, character level
# ------------------------------------------------------------------------------------------------
def stdlib_text(limit: int = TEXT_CHARS) -> str:
    """The first `limit` characters of the standard library's top-level .py files in name order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, size = [], 0
    for path in sorted(root.glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        parts.append(text)
        size += len(text)
        if size >= limit:
            break
    if not parts:
        raise RuntimeError(f"demo --transformer: no Python source files under {root}")
    return "".join(parts)[:limit]


def encode(text: str) -> Tensor:
    lookup = {c: i for i, c in enumerate(ALPHABET)}
    unknown = len(ALPHABET)
    return torch.tensor([lookup.get(c, unknown) for c in text], dtype=torch.long)


# ------------------------------------------------------------------------------------------------
# The model: names follow the conventions nm_optim.symmetry.structural recognises
# ------------------------------------------------------------------------------------------------
class Embeddings(nn.Module):
    def __init__(self, vocab: int, dim: int, context: int) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, dim)
        self.position_embeddings = nn.Embedding(context, dim)
        self.LayerNorm = nn.LayerNorm(dim)

    def forward(self, ids: Tensor) -> Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        return self.LayerNorm(self.word_embeddings(ids) + self.position_embeddings(positions))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        B, T, E = x.shape
        split = lambda t: t.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)),
                                             is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, E))


class GatedMLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.ln_2, self.mlp = nn.LayerNorm(dim), GatedMLP(dim, hidden)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class CharTransformer(nn.Module):
    """A decoder-only transformer; its output is the logits flattened to (batch * time, vocab),
    so that F.cross_entropy takes its softmax over the vocabulary."""

    def __init__(self, vocab: int, s: Settings) -> None:
        super().__init__()
        self.embeddings = Embeddings(vocab, s.dim, s.context)
        self.blocks = nn.ModuleList(Block(s.dim, s.heads, s.hidden) for _ in range(s.layers))
        self.ln_f = nn.LayerNorm(s.dim)
        self.lm_head = nn.Linear(s.dim, vocab)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.embeddings(ids)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x)).flatten(0, 1)


# ------------------------------------------------------------------------------------------------
# Training and the comparison
# ------------------------------------------------------------------------------------------------
def _batch(data: Tensor, s: Settings, gen: torch.Generator, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    start = torch.randint(0, len(data) - s.context - 1, (s.batch,), generator=gen)
    window = torch.stack([data[i : i + s.context + 1] for i in start.tolist()]).to(device)
    return window[:, :-1], window[:, 1:].reshape(-1)


def train_transformer(steps: int = TRANSFORMER_STEPS, *, settings: Settings = Settings(), dtype: torch.dtype = torch.float32,
                      seed: int = 0, backend: str = "auto", device: str = "cpu", text_chars: int = TEXT_CHARS,
                      progress: bool = False) -> tuple[nn.Module, nm_optim.SGD, list[float]]:
    """Train CharTransformer with nm_optim.SGD tracking every symmetry find_symmetries finds;
    returns the model, the optimizer (its recorder holds the record) and the losses."""
    data = encode(stdlib_text(text_chars))
    torch.manual_seed(seed)
    model = CharTransformer(len(ALPHABET) + 1, settings).to(device=device, dtype=dtype)
    gen = torch.Generator().manual_seed(seed)
    x, _ = _batch(data, settings, torch.Generator().manual_seed(seed + 1), device)
    syms = nm_optim.find_symmetries(model, x, loss=F.cross_entropy)
    opt = nm_optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum,
                       weight_decay=settings.weight_decay, backend=backend, symmetries=syms)
    losses = []  # kept on the device: reading one back every step would synchronise with it
    for k in range(steps):
        x, y = _batch(data, settings, gen, device)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
        if progress and (k + 1) % max(steps // 10, 1) == 0:
            print(f"  step {k + 1}/{steps}: loss {float(losses[-1]):.3f}", flush=True)
    return model, opt, torch.stack(losses).tolist() if losses else []


def _finite_max(a: np.ndarray) -> float | None:
    a = np.asarray(a, dtype=np.float64)
    return float(np.nanmax(a)) if a.size and np.isfinite(a).any() else None


def _label(name: str) -> str:
    """A symmetry's law in words, for the summary and the figure."""
    for key, text in (("[q->k", "queries / keys (rescale per dimension)"), ("[key bias]", "key bias (translation, g = 0)"),
                      ("[v->o", "values / output (rescale per dimension)"), ("up_proj->", "gated MLP up / down (rescale)"),
                      ("embeddings", "embeddings into LayerNorm (scale)"), ("ln_f->", "final LayerNorm / LM head (rescale)"),
                      ("ln_1->", "LayerNorm / q, k, v (rescale)"), ("ln_2->", "LayerNorm / gate, up (rescale)")):
        if key in name:
            return text
    return "LM head softmax (translation)" if name == "lm_head" else name


def summary_rows(comparison: theory.Comparison, goal: float, heads: int) -> list[dict[str, Any]]:
    """One row per symmetry: the errors per group (max over the run) of the exact law, of the
    exact law with the measured breaking kept (the goal), of the paper's continuous form; the
    worst group of each head for the attention laws (their groups are the heads' dimensions in
    order)."""
    out = []
    for p in comparison.predictions:
        exact, kept, paper = p.exact_error, p.exact_breaking_error, p.paper_error
        row: dict[str, Any] = {
            "symmetry": p.name, "law": _label(p.name), "kind": p.kind, "groups": p.num_groups,
            "max_exact_error": _finite_max(exact), "max_exact_breaking_error": _finite_max(kept),
            "max_paper_error": _finite_max(paper), "paper_applies": p.paper_applies, "paper_valid": p.paper_valid,
            "paper_caveats": p.paper_caveats, "max_breaking_ratio": _finite_max(p.breaking_ratio),
            "exact_breaking_error_per_group": [None if not math.isfinite(v) else float(v) for v in kept],
        }
        if "attn[" in p.name and p.num_groups % heads == 0:
            per_head = np.asarray(kept, dtype=np.float64).reshape(heads, -1)
            row["exact_breaking_error_per_head"] = [_finite_max(h) for h in per_head]
        worst = row["max_exact_breaking_error"]
        row["goal"] = goal
        row["goal_met"] = worst is not None and worst <= goal
        out.append(row)
    return out


def draw(comparison: theory.Comparison, path: Path, title: str, goal: float, show: int = 8) -> Path:
    """One panel per law (the first layer's where there are several): measured per group in
    colour, the exact law dotted black, time in steps; the last panel the worst error of each."""
    # a Figure, not pyplot: no display, no global state (as nm_optim.plot does)
    import matplotlib.ticker
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    chosen: dict[str, Any] = {}
    for p in comparison.predictions:
        chosen.setdefault(_label(p.name), p)
    panels = list(chosen.items())
    cols = 3
    rows = math.ceil((len(panels) + 1) / cols)
    fig = Figure(figsize=(5.2 * cols, 3.6 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    colors = colormaps["viridis"](np.linspace(0.0, 0.9, show))
    for ax, (label, p) in zip(axes.flat, panels):
        steps = np.arange(len(p.measured))
        groups = np.linspace(0, p.num_groups - 1, min(show, p.num_groups)).round().astype(int)
        for c, g in zip(colors, groups):
            ax.plot(steps, p.measured[:, g], color=c, lw=1.6)
            ax.plot(np.arange(len(p.exact)), p.exact[:, g], color="black", lw=1.0, ls=":")
        quantity = {"translation": "Σθ_A", "scale": "|θ_A|²", "rescale": "|θ_A1|² − |θ_A2|²"}[p.kind]
        ax.set_title(f"{label}\n{p.name} ({len(groups)} of {p.num_groups} groups)", fontsize=8)
        ax.set_xlabel("step k")
        ax.set_ylabel(quantity)
    ax = axes.flat[len(panels)]
    worst = [(_label(p.name), _finite_max(p.exact_breaking_error) or 0.0, _finite_max(p.exact_error) or 0.0)
             for p in chosen.values()]
    y = np.arange(len(worst))
    ax.barh(y - 0.2, [w[2] for w in worst], height=0.4, color="0.7", label="exact law")
    ax.barh(y + 0.2, [w[1] for w in worst], height=0.4, color="black", label="exact + measured breaking")
    ax.set_yticks(y, [w[0] for w in worst], fontsize=7)
    ax.set_xscale("log")
    ax.axvline(goal, color="tab:red", lw=1.0, ls="--", label=f"goal {goal:.0e}")
    smallest = min([w for row in worst for w in row[1:] if w > 0] or [goal])
    ax.set_xlim(10 ** math.floor(math.log10(smallest) - 0.5), 10 ** math.ceil(math.log10(goal) + 0.5))
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(numticks=6))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("max relative error over the run (worst group)")
    ax.legend(fontsize=7)
    for extra in axes.flat[len(panels) + 1 :]:
        extra.axis("off")
    fig.suptitle(title + "\ncoloured: measured, one curve per group; dotted black: the exact law", fontsize=10)
    fig.savefig(path, dpi=110, format="png")
    return path


def run_transformer_demo(out: str | Path, *, steps: int = TRANSFORMER_STEPS, dtype: str = "float32",
                         backend: str = "auto", device: str = "auto", seed: int = 0, progress: bool = True,
                         settings: Settings = Settings()) -> dict[str, Any]:
    """Train, record, compare and draw; writes OUT/transformer.png, OUT/records/transformer.npz
    and OUT/summary.json, and returns the summary. `device`: "auto" is the CUDA device where
    there is one (nm_optim.app.config.resolve_device)."""
    from nm_optim.app.config import resolve_device

    out = Path(out)
    where = resolve_device(device)
    (out / "records").mkdir(parents=True, exist_ok=True)
    torch_dtype = {"float32": torch.float32, "float64": torch.float64}[dtype]
    started = time.perf_counter()
    # 150K parameters, batches of 16 x 64 characters: intra-op threads only add synchronisation
    # (on a loaded 2-core machine 35 ms a step with one thread, 140-1300 ms with two).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, opt, losses = train_transformer(steps, settings=settings, dtype=torch_dtype, seed=seed,
                                               backend=backend, device=where, progress=progress)
    finally:
        torch.set_num_threads(threads)
    trained = time.perf_counter() - started
    record = opt.recorder.snapshot()
    record.save(out / "records" / "transformer.npz")
    comparison = theory.compare(record)
    goal = GOALS[torch_dtype]
    rows = summary_rows(comparison, goal, settings.heads)
    s = settings
    title = (f"char-level transformer on the standard library's source: {s.layers} layers, {s.heads} heads, "
             f"dim {s.dim}, {dtype}; lr {s.lr}, momentum {s.momentum}, weight decay {s.weight_decay}, {steps} steps")
    figure = draw(comparison, out / "transformer.png", title, goal)
    summary = {
        "experiment": "transformer", "figure": figure.name, "record": "records/transformer.npz",
        "settings": {**s.__dict__, "steps": steps, "dtype": dtype, "seed": seed, "device": str(where)},
        "loss_first": losses[0] if losses else None, "loss_last": float(np.mean(losses[-20:])) if losses else None,
        "goal": goal, "goal_met": all(r["goal_met"] for r in rows), "symmetries": rows,
        "seconds_training": round(trained, 3), "seconds": round(time.perf_counter() - started, 3),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1, allow_nan=False))
    return summary


def format_rows(rows: list[dict[str, Any]]) -> str:
    """The summary as a table: one line per symmetry."""
    f = lambda v: "n/a" if v is None else f"{v:.1e}"
    head = f"{'symmetry':<44} {'law':<40} {'groups':>6} {'exact':>8} {'+breaking':>9} {'paper':>8}  goal"
    lines = [head]
    for r in rows:
        lines.append(f"{r['symmetry'][:44]:<44} {r['law'][:40]:<40} {r['groups']:>6} {f(r['max_exact_error']):>8} "
                     f"{f(r['max_exact_breaking_error']):>9} {f(r['max_paper_error']):>8}  "
                     f"{'ok' if r['goal_met'] else 'MISSED'}")
    return "\n".join(lines)
