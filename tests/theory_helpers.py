"""Helpers the theory tests share: small losses with a known symmetry, a float64 nm_optim.SGD run
that returns its statistics and Schedule, and the minimal symmetry duck type `theory.predict`
reads (docs/architecture.md, "The theory")."""

from __future__ import annotations

import torch

import nm_optim
from nm_optim.names import HYPER_NAMES
from nm_optim.theory import Schedule


def laplacian_quadratic(n: int, seed: int = 0):
    """L(θ) = ½ θᵀAθ with A a graph Laplacian: A·1 = 0, so translation θ ↦ θ + α1 is a symmetry."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.rand(n, n, generator=gen, dtype=torch.float64)
    w = (w + w.T) / 2
    A = torch.diag(w.sum(1)) - w
    return lambda theta, k: 0.5 * theta.reshape(-1) @ A @ theta.reshape(-1)


def run_sgd(loss_fn, shape, steps, *, axis="rows", params=None, tracks=None, scheduler=None, on_step=None,
            skip=(), seed=0, backend="reference", **hyper):
    """Train with nm_optim.SGD (float64; the pure-PyTorch reference backend by default: the theory
    is under test here, and at these tiny sizes it is the fastest) and return (stats [S, G, 9], Schedule) of the
    first track, or of all tracks when `tracks` is given."""
    gen = torch.Generator().manual_seed(seed)
    if params is None:
        params = [torch.nn.Parameter(torch.randn(*shape, generator=gen, dtype=torch.float64))]
    tracks = tracks or [(params[0], axis)]
    opt = nm_optim.SGD(params, backend=backend, track=tracks, **hyper)
    sched = scheduler(opt) if scheduler else None
    for k in range(steps):
        if on_step:
            on_step(opt, k)
        opt.zero_grad()
        loss_fn(*params, k).backward()
        if k in skip:  # what GradScaler does on an inf: the step is skipped
            opt.grad_scale, opt.found_inf = None, torch.ones((), dtype=torch.float32)
        opt.step()
        opt.__dict__.pop("found_inf", None)
        opt.__dict__.pop("grad_scale", None)
        if sched:
            sched.step()
    rec = opt.recorder.snapshot()
    schedule = Schedule(*(rec.hyper[n][:, 0] for n in HYPER_NAMES), first=rec.first[:, 0],
                        skipped=rec.skipped)
    return (rec.stats[0] if len(tracks) == 1 else rec.stats), schedule


def scale_invariant_loss(rows: int, cols: int, seed: int = 1):
    """Per row, a noisy function of the direction θ_r/|θ_r| only (fresh noise every step, like a
    minibatch): the gradient is orthogonal to θ_r, so |θ_r|² only moves by the finite step."""
    gen = torch.Generator().manual_seed(seed)
    target = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    noise = torch.randn(1000, rows, cols, generator=gen, dtype=torch.float64)

    def loss(theta, k):
        u = theta / theta.norm(dim=1, keepdim=True)
        return -(u * target).sum() + 0.5 * ((u * noise[k % 1000]).sum(1) ** 2).sum()

    return loss


def softmax_loss(rows: int, classes: int, seed: int = 2):
    """Cross-entropy of logits θ_r with random labels each step: translation of each row."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (1000, rows), generator=gen)
    return lambda theta, k: torch.nn.functional.cross_entropy(theta, labels[k % 1000], reduction="sum")


def two_layer_loss(seed: int = 3):
    """A two-layer ReLU net: hidden unit c has the rescale symmetry (W1[c], b1[c]) ↦ α·, W2[:, c] ↦ /α."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1000, 16, 5, generator=gen, dtype=torch.float64)
    y = torch.randn(1000, 16, 3, generator=gen, dtype=torch.float64)
    return lambda w1, b1, w2, k: ((torch.relu(x[k % 1000] @ w1.T + b1) @ w2.T - y[k % 1000]) ** 2).mean()


class HandSymmetry:
    """The minimal duck type `predict`/`compare` need (kind, name, group_stats, hyper, first)."""

    def __init__(self, kind, name, roles):
        self.kind, self.name, self.roles, self.members = kind, name, roles, ()

    def group_stats(self, record):
        track = {t["name"]: i for i, t in enumerate(record.tracks)}
        return {role: sum(record.stats[track[n]] for n in names) for role, names in self.roles.items()}

    def hyper(self, record):
        return {n: record.hyper[n][:, 0] for n in HYPER_NAMES}

    def first(self, record):
        return record.first[:, 0]

    def describe(self):
        return {"kind": self.kind, "name": self.name, "members": []}
