"""Small steps through every kernel path, for compute-sanitizer memcheck in bench/gpu_check.sh.

Per backend (every one that runs tensors on the device, but "reference"): fp32 / fp16 / bf16 /
fp64; plain, momentum + weight decay (first step, then buffer updates), nesterov; statistics on
rows / cols / all, every other param's tracks asking for the 6 products only (the kernels'
product-only variants beside the all-9 ones in one bucket); an AMP-skipped step (NaN
statistics); and the layouts that take other paths:

- params, grads and buffers that are views at storage offsets of 1-7 elements with odd tails
  (the unaligned / scalar paths of the vectorised kernels), through the optimizer and through the
  op directly (buffers at an offset too);
- channels_last and transposed params with rows / cols tracks (the op steps those through their
  row-major storage view: nm_optim/ops/op.py `_step_permuted`).

Every result is compared with the "reference" backend on copies of the same tensors (loose
tolerances: this is a memory check, the tests check the numbers). Run it with the caching
allocator off, or out-of-bounds accesses inside PyTorch's pooled segments go unseen:

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 9 \
        python3 bench/sanitize_step.py
    python3 bench/sanitize_step.py --device cpu --quick        # the dry run (TRITON_INTERPRET=1)
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import nm_optim
from nm_optim.names import PRODUCT_SUMS

SHAPES = [(1,), (7,), (33, 17), (5, 3, 3, 3), (1000,), (3, 0), (129, 300)]
QUICK_SHAPES = [(1,), (7,), (33, 17), (5, 3, 3, 3), (3, 0), (13, 9)]
HYPERS = {
    "plain": dict(),
    "momentum_wd": dict(momentum=0.9, weight_decay=1e-2),
    "nesterov": dict(momentum=0.9, nesterov=True),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
TOL = {torch.float32: 1e-4, torch.float64: 1e-9, torch.float16: 2e-2, torch.bfloat16: 1e-1}
# Storage offsets (elements) and lengths: 1-7 elements off any vector alignment, odd tails.
OFFSET_CASES = [(1, 1), (2, 3), (3, 5), (5, 13), (7, 31), (4, 33), (6, 1029), (1, 4099)]
QUICK_OFFSET_CASES = [(1, 1), (3, 5), (7, 31), (5, 67)]


def axes(p: torch.Tensor) -> tuple[str, ...]:
    return ("rows", "cols", "all") if p.dim() >= 2 else ("rows", "all")


def check_close(got: torch.Tensor, want: torch.Tensor, what: str, tol: float) -> None:
    """Loose: relative to the largest |value| of the tensor (at least 1). NaN where the
    reference has NaN (statistics of a skipped step), nowhere else."""
    if got.numel() == 0:
        return
    g, w = got.detach().double().cpu(), want.detach().double().cpu()
    if not torch.equal(g.isnan(), w.isnan()):
        raise AssertionError(f"{what}: NaN where the reference backend has none (or the reverse)")
    g, w = g[~w.isnan()], w[~w.isnan()]
    if g.numel() == 0:
        return
    scale = max(w.abs().max().item(), 1.0)
    err = (g - w).abs().max().item() / scale
    if not err <= tol:
        raise AssertionError(f"{what}: relative error {err:.3e} > {tol:.0e} against the reference backend")


def at_offset(values: torch.Tensor, offset: int) -> torch.Tensor:
    """`values` copied into a larger flat buffer at `offset` elements: a contiguous view whose
    data pointer is `offset` elements past an allocation's (aligned) start, with 3 elements of
    slack after it, so an overrun lands inside the same allocation (memcheck sees it only with
    the caching allocator off, where each tensor is its own cudaMalloc)."""
    n = values.numel()
    base = torch.full((offset + n + 3,), float("nan"), dtype=values.dtype, device=values.device)
    view = base[offset : offset + n].view(values.shape)
    view.copy_(values)
    return view


def grad_like(p: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A gradient with p's layout: the same strides (channels_last, transposed), or, for a param
    at a storage offset, a view at another offset (so p and g are misaligned differently)."""
    if p.storage_offset():
        return at_offset(values, (p.storage_offset() + 3) % 8 or 1)
    g = torch.empty_like(p, requires_grad=False)  # keeps the strides of a dense permuted p
    return g.copy_(values)


def run_optimizer(params_of, device, dtype, backend, hyper, tracked, steps=4, skip_at=2) -> list[torch.Tensor]:
    """`steps` steps of nm_optim.SGD; the step `skip_at` is skipped by an AMP found_inf (its
    statistics must be NaN), the next one runs with a grad scale of 2."""
    ps = params_of()
    # every other param's tracks ask for the 6 products only: both kernel variants in one bucket
    tracks = [(p, a, PRODUCT_SUMS) if i % 2 else (p, a) for i, p in enumerate(ps) for a in axes(p)] if tracked else None
    opt = nm_optim.SGD(ps, lr=0.1, backend=backend, track=tracks, **hyper)
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        for p in ps:
            g = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
            p.grad = grad_like(p, g)
        if step == skip_at:
            opt.grad_scale = torch.ones((), device=device)
            opt.found_inf = torch.ones((), device=device)
        elif step == skip_at + 1:
            opt.grad_scale = torch.full((), 2.0, device=device)
            opt.found_inf = torch.zeros((), device=device)
        opt.step()
        if tracked and step == skip_at:
            assert all(s.isnan().all() for s in opt.last_stats()), "the skipped step left non-NaN statistics"
    if device == "cuda":
        torch.cuda.synchronize()
    out = [p.detach().clone() for p in ps]
    if tracked:
        out += list(opt.last_stats())
    return out


def compare(run, what: str, backend: str, device: str) -> None:
    """run(backend, device) on the device against run("reference", "cpu"): the reference adds
    no device kernels, so the sanitizer's time goes to ours."""
    got = run(backend, device)
    want = run("reference", "cpu")
    assert len(got) == len(want), what
    param_tol = TOL[got[0].dtype]
    for i, (g, w) in enumerate(zip(got, want)):
        is_stats = g.dtype == torch.float64 and g.dim() == 2 and g.shape[-1] == 9
        # statistics: float64 sums of the pre-step values, which differ by the params' rounding
        check_close(g, w, f"{what} [{i}]", max(1e-5, param_tol) if is_stats else TOL[g.dtype])


def init(shape, dtype, seed, device):
    """The same values on every device (drawn on the CPU in float64)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).to(device)


def cases(dname: str, quick: bool) -> list:
    """(name, run) pairs for one dtype, the layouts first; run(backend, device) returns the
    tensors to compare with the reference."""
    dtype = DTYPES[dname]
    shapes = QUICK_SHAPES if quick else SHAPES
    offsets = QUICK_OFFSET_CASES if quick else OFFSET_CASES
    hypers = {k: HYPERS[k] for k in (("momentum_wd",) if quick else HYPERS)}
    out = []

    def op_offsets(b, dev):
        # the op directly: params, grads and buffers each at their own offset 1-7
        ps, gs, vs = [], [], []
        for i, (off, n) in enumerate(offsets):
            ps.append(at_offset(init((n,), dtype, 20 + i, dev), off))
            gs.append(at_offset(init((n,), dtype, 40 + i, dev), (off + 2) % 8 or 1))
            vs.append(at_offset(init((n,), dtype, 60 + i, dev), (off + 5) % 8 or 3))
        first = [i % 2 == 0 for i in range(len(ps))]
        offs, rows = [], 0
        for p in ps:  # a rows track (one group per element of a 1-D tensor) and an all track
            offs += [rows, -1, rows + p.shape[0]]
            rows += p.shape[0] + 1
        stats = torch.full((rows, 9), float("nan"), dtype=torch.float64, device=dev)
        torch.ops.nm_optim.sgd_step_(ps, gs, vs, first, 0.1, None, 1e-2, 0.9, 0.1, False, False,
                                     None, None, b, stats, offs)
        if dev == "cuda":
            torch.cuda.synchronize()
        return [*ps, *vs, stats]

    out.append((f"{dname} op with p, g, v at offsets 1-7", op_offsets))

    def permuted(b, dev):
        def mk():
            cl = init((8, 5, 3, 3), dtype, 80, dev).to(memory_format=torch.channels_last).requires_grad_()
            cl_odd = init((3, 7, 5, 1), dtype, 81, dev).to(memory_format=torch.channels_last).requires_grad_()
            tr = init((33, 17), dtype, 82, dev).t().requires_grad_()
            tr_big = init((130, 257), dtype, 83, dev).t().requires_grad_()
            return [cl, cl_odd, tr, tr_big]

        return run_optimizer(mk, dev, dtype, b, dict(momentum=0.9, weight_decay=1e-2), tracked=True)

    out.append((f"{dname} channels_last + transposed, tracked", permuted))

    for hname, hyper in hypers.items():
        def offset(b, dev, hyper=hyper):
            # params at offsets 1-7, their grads at other offsets; the momentum buffers are the
            # optimizer's own (aligned): p, g and v misaligned differently.
            def mk():
                return [at_offset(init((n,) if i % 2 == 0 else (1, n), dtype, 10 + i, dev), off).requires_grad_()
                        for i, (off, n) in enumerate(offsets)]

            return run_optimizer(mk, dev, dtype, b, hyper, tracked=True)

        out.append((f"{dname} {hname} offsets 1-7 + odd tails, tracked", offset))
    for tracked in (True, False):
        for hname, hyper in hypers.items():
            def plain(b, dev, hyper=hyper, tracked=tracked):
                mk = lambda: [init(s, dtype, i, dev).requires_grad_() for i, s in enumerate(shapes)]  # noqa: E731
                return run_optimizer(mk, dev, dtype, b, hyper, tracked)

            out.append((f"{dname} {hname} {'tracks' if tracked else 'no tracks'}", plain))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backends", default="", help="comma-separated (default: every one here but reference)")
    ap.add_argument("--quick", action="store_true", help="fewer dtypes, shapes and offsets (the dry run)")
    ap.add_argument("--time-budget", type=float, default=0.0,
                    help="start no case after this many seconds (0: no limit); the rest are reported as not run")
    args = ap.parse_args(argv)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("sanitize_step: no CUDA device", file=sys.stderr)
        return 2
    here = [b for b in nm_optim.available_backends(device) if b != "reference"]
    backends = [b for b in args.backends.split(",") if b] or here
    missing = [b for b in backends if b not in here]
    if missing or not backends:
        print(f"sanitize_step: backends {missing or backends} not available on {device} (here: {here})",
              file=sys.stderr)
        return 2
    failures = n = not_run = 0
    t0 = time.perf_counter()
    # Round-robin over the dtypes (each one's layout cases first), so that a time budget that
    # stops early still reaches every dtype, fp64 included.
    per_dtype = [cases(dname, args.quick) for dname in (("fp32", "bf16") if args.quick else tuple(DTYPES))]
    ordered = [c[i] for i in range(max(map(len, per_dtype))) for c in per_dtype if i < len(c)]
    for name, check in ordered:
        for b in backends:
            if args.time_budget and time.perf_counter() - t0 > args.time_budget:
                not_run += 1
                continue
            n += 1
            try:
                compare(check, f"{b} {name}", b, device)
                print(f"sanitize_step: ok   {b} {name}", flush=True)
            except Exception as e:  # noqa: BLE001 (report every case, then fail)
                failures += 1
                print(f"sanitize_step: FAIL {b} {name}: {type(e).__name__}: {e}", flush=True)
    dt = time.perf_counter() - t0
    tail = f"; {not_run} not run (time budget {args.time_budget:g} s)" if not_run else ""
    print(f"sanitize_step: {n - failures} of {n} cases ok on {device} ({', '.join(backends)}) in {dt:.1f} s{tail}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
