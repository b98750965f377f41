"""A few tracked steps through the statistics kernels only (CUDA: the 2-D tile kernel and the
reduction, which share memory between threads; Triton: stats_kernel and reduce_kernel), for
compute-sanitizer racecheck in bench/gpu_check.sh. Shapes span several 128 x 128 tiles (CUDA
and Triton; with and without column partials, vector and element-wise rows), partial tiles,
1-D biases and a channels_last weight; every other param's tracks ask for the 6 products only
(the product-only variants). Each configuration runs twice: the sums each track holds must be
bitwise identical (a race shows up as a difference more often than not), and finite.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool racecheck --error-exitcode 9 \\
        python3 bench/racecheck_stats.py
    python3 bench/racecheck_stats.py --device cpu        # the dry run (TRITON_INTERPRET=1)
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import nm_optim
from nm_optim.names import PRODUCT_SUMS, STAT_NAMES

SHAPES = [(300, 257), (5, 3, 3, 3), (1000,), (64, 130), (129, 1)]
CPU_SHAPES = [(70, 130), (5, 3, 3, 3), (33,)]


def run(device: str, backend: str, dtype: torch.dtype, shapes) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ps = [torch.randn(s, generator=gen).to(device=device, dtype=dtype).requires_grad_() for s in shapes]
    ps.append(torch.randn(16, 8, 3, 3, generator=gen).to(device=device, dtype=dtype)
              .to(memory_format=torch.channels_last).requires_grad_())
    # every other param's tracks ask for the 6 products only: both kernel variants in one bucket
    tracks = [(p, a, PRODUCT_SUMS) if i % 2 else (p, a) for i, p in enumerate(ps)
              for a in (("rows", "cols", "all") if p.dim() >= 2 else ("rows", "all"))]
    opt = nm_optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-2, backend=backend, track=tracks)
    opt.recorder.enabled = False
    out = []
    for _ in range(2):  # the first step (no buffer) and one with a buffer
        for p in ps:
            p.grad = torch.empty_like(p).copy_(torch.randn(p.shape, generator=gen).to(device=device, dtype=dtype))
        opt.step()
        # the columns a track holds (the others are NaN by contract)
        out += [s[:, [STAT_NAMES.index(n) for n in t.sums]].clone() for s, t in zip(opt.last_stats(), opt.tracks)]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backends", default="", help="comma-separated (default: every one here but reference)")
    ap.add_argument("--time-budget", type=float, default=0.0,
                    help="start no case after this many seconds (0: no limit); the rest are reported as not run")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("racecheck_stats: no CUDA device", file=sys.stderr)
        return 2
    here = [b for b in nm_optim.available_backends(args.device) if b != "reference"]
    backends = [b for b in args.backends.split(",") if b] or here
    if not backends or any(b not in here for b in backends):
        print(f"racecheck_stats: backends {backends} not all available on {args.device} (here: {here})",
              file=sys.stderr)
        return 2
    shapes = SHAPES if args.device == "cuda" else CPU_SHAPES
    failures = n = not_run = 0
    t0 = time.perf_counter()
    for dtype in (torch.float32, torch.float16):
        for b in backends:
            if args.time_budget and time.perf_counter() - t0 > args.time_budget:
                not_run += 1
                continue
            n += 1
            what = f"{b} {str(dtype).removeprefix('torch.')}"
            try:
                a, c = run(args.device, b, dtype, shapes), run(args.device, b, dtype, shapes)
                bad = [i for i, (x, y) in enumerate(zip(a, c)) if not torch.equal(x, y)]
                assert not bad, f"statistics differ between two identical runs (tracks {bad})"
                assert all(x.isfinite().all() for x in a), "non-finite statistics"
                print(f"racecheck_stats: ok   {what}", flush=True)
            except Exception as e:  # noqa: BLE001 (report every case, then fail)
                failures += 1
                print(f"racecheck_stats: FAIL {what}: {type(e).__name__}: {e}", flush=True)
    tail = f"; {not_run} not run (time budget {args.time_budget:g} s)" if not_run else ""
    print(f"racecheck_stats: {n - failures} of {n} cases ok on {args.device} ({', '.join(backends)}) "
          f"in {time.perf_counter() - t0:.1f} s{tail}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
