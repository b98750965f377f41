"""Checking symmetries numerically with torch.func: `verify_symmetries`.

Every symmetry constrains the gradient and the Hessian of the loss on its groups (the paper:
Kunin et al., ICLR 2021, section 3; docs/architecture.md, "Symmetries"). One forward and backward
pass builds the gradient with its graph; every Hessian-vector product is then one more backward
pass through it.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from nm_optim.symmetry.base import Member, Symmetry

__all__ = ["SymmetryCheck", "SymmetryReport", "verify_symmetries"]


@dataclass
class SymmetryCheck:
    """The constraints of one symmetry on one batch.

    grad_residuals[A] = |⟨g, ξ_A⟩| / (|g_A| |ξ_A|) for every group A (ξ_A the generator, g_A the
    gradient on A's n_A elements; 0 where either vanishes): the cosine between them. For
    translation the denominator is at least |ξ_A| √n_A ḡ (ḡ the RMS gradient of the whole model):
    a key bias's gradient vanishes identically, and the cosine of rounding noise means nothing.

    The Hessian constraint r_A = Hξ_A + ĝ_A = 0 (ĝ_A = 0 for translation, g_A for scale,
    g_A1 − g_A2 for rescale) is measured
      - with method "probe" per group, along random directions u: |u·r_A| relative to the sum of
        the absolute values of its terms, Σ_i |(Hu)_i ξ_i| + |ĝ_i u_i| (the size rounding is
        measured against; for translation at least Σ_i |ξ_i| rms(Hu): H vanishes on a key bias);
      - with method "exact" per symmetry: ‖Hξ + ĝ‖ / (‖Hξ‖ + ‖ĝ‖) for one HVP per group, or on a
        random combination of the groups, and for translation ‖Hξ‖ / ‖Hw‖ with w random on ξ's
        support with ξ's norm (the typical size of H there; at least ‖ξ‖ ‖Hr‖ / ‖r‖ for r
        random over all parameters, where H vanishes on the support).
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


def _twice_differentiable_attention() -> contextlib.AbstractContextManager:
    """scaled_dot_product_attention's fused CPU / CUDA kernels have no double backward (the
    Hessian-vector products need one): the math kernel, the same function, for the check."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def _generator(sym: Symmetry, m: Member, theta: Tensor) -> Tensor:
    """The generator's elements on member m (translation: 1; scale: θ; rescale: θ_A1, −θ_A2)."""
    if sym.kind == "translation":
        return torch.ones_like(theta)
    return -theta if m.role == "A2" else theta


def _default_tol(dtype: torch.dtype) -> float:
    """1e-6 in float64: exact symmetries sit at ~1e-15, BatchNorm's eps (about eps / channel
    variance, 3.6e-5 on the demo's nets) is breaking and reported so; 1e-3 in lower precision,
    where float32 rounding of the gradient alone reaches ~1e-5."""
    return 1e-6 if dtype == torch.float64 else 1e-3


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
    """Check each symmetry's gradient and Hessian constraints on one batch (docs/architecture.md,
    "Symmetries"; the paper, Kunin et al., ICLR 2021, section 3):
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
            rows.append((m, off, n, _generator(sym, m, params[n])))
        plans.append((sym, rows))

    def loss_of(ps: dict[str, Tensor]) -> Tensor:
        torch.manual_seed(seed)  # the same dropout masks whatever evaluates the loss
        return loss_fn(torch.func.functional_call(model, (ps, buffers), inputs), target)

    gen = torch.Generator().manual_seed(seed)

    def randn_like(t: Tensor) -> Tensor:
        return torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device)

    devices = sorted({p.device.index or 0 for p in params.values() if p.device.type == "cuda"})
    checks = []
    with _no_running_stat_updates(model), torch.random.fork_rng(devices=devices), _twice_differentiable_attention():
        grads, hvp, loss = torch.func.vjp(torch.func.grad_and_value(loss_of), params, has_aux=True)

        def hvp_of(v: dict[str, Tensor]) -> dict[str, Tensor]:
            full = {n: v[n] if n in v else torch.zeros_like(p) for n, p in params.items()}
            return hvp(full)[0]

        directions = [{n: randn_like(p) for n, p in params.items()} for _ in range(probes)] if hessian == "probe" else []
        h_dirs = [hvp(u)[0] for u in directions]
        g_rms = _rms(grads.values())
        if hessian == "exact":  # |H r| / |r| for a random r: the typical gain of H
            r = {n: randn_like(p) for n, p in params.items()}
            h_gain = _norm(hvp(r)[0].values()) / max(_norm(r.values()), 1e-300)
        for sym, rows in plans:
            G = sym.num_groups
            dot, gg, xx, ax, count = (torch.zeros(G, dtype=torch.float64) for _ in range(5))
            for m, off, n, xi in rows:
                g = grads[n]
                dot[off : off + m.num_groups] += _reduce64(m, g * xi)
                gg[off : off + m.num_groups] += _reduce64(m, g * g)
                xx[off : off + m.num_groups] += _reduce64(m, xi * xi)
                ax[off : off + m.num_groups] += _reduce64(m, xi.abs())
                count[off : off + m.num_groups] += _reduce64(m, torch.ones_like(xi))
            # A translation group whose gradient vanishes identically (a key bias) is measured
            # against the model's typical gradient: its own is rounding noise, its cosine
            # meaningless. Scale and rescale keep the cosine.
            floor = count.sqrt() * g_rms if sym.kind == "translation" else torch.zeros_like(count)
            denom = xx.sqrt() * torch.maximum(gg.sqrt(), floor)
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
                    den += torch.maximum(size, ax * _rms(hu.values())) if sym.kind == "translation" else size
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
                    den = max(den, _norm(tangent.values()) * h_gain)  # H vanishing on the support too
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


def _rms(ts: Iterable[Tensor]) -> float:
    """The root mean square of every element of the tensors."""
    total, count = 0.0, 0
    for t in ts:
        total += float(t.double().pow(2).sum())
        count += t.numel()
    return math.sqrt(total / max(count, 1))


def _norm(ts: Iterable[Any]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in ts if isinstance(t, Tensor)))
