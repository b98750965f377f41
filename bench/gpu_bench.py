"""GPU benchmark for bench/gpu_check.sh: copy bandwidth, then one optimizer step per provider on
VGG-16, ResNet-50 and 1000 x 4096 shapes, timed with CUDA events (median after warm-up), inputs
rotated so that the working set exceeds L2. Writes one JSON file.

    python bench/gpu_bench.py --json OUT/gpu_bench.json [--compile] [--rounds 20]

Also runs on the CPU (`--device cpu --quick`) as a smoke test of the script itself.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from collections.abc import Callable

import torch

import nm_optim
from bench_step import BYTES_PER_PARAM, HYPER, step_and_sums, timer, vgg16_shapes


def resnet50_shapes(num_classes: int = 1000) -> list[tuple[int, ...]]:
    """Parameter shapes of torchvision's ResNet-50: 25,557,032 params."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    c_in = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for j in range(blocks):
            shapes += [(width, c_in, 1, 1), (width,), (width,)]
            shapes += [(width, width, 3, 3), (width,), (width,)]
            shapes += [(4 * width, width, 1, 1), (4 * width,), (4 * width,)]
            if j == 0:
                shapes += [(4 * width, c_in, 1, 1), (4 * width,), (4 * width,)]
            c_in = 4 * width
    return shapes + [(num_classes, 2048), (num_classes,)]


SHAPE_SETS: dict[str, Callable[[], list[tuple[int, ...]]]] = {
    "vgg16": vgg16_shapes,
    "resnet50": resnet50_shapes,
    "many_4096": lambda: [(4096,)] * 1000,
}


def copy_bandwidth(device: str, nbytes: int, rounds: int) -> float:
    """Device-to-device copy, GB/s counting bytes read + written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    run = timer(device)
    for _ in range(3):
        dst.copy_(src)
    ms = statistics.median(run(lambda: dst.copy_(src)) for _ in range(rounds))
    return 2 * nbytes / (ms * 1e-3) / 1e9


def param_sets(shapes, device, copies) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(copies):
        ps = []
        for s in shapes:
            p = torch.randn(s, generator=gen).to(device).requires_grad_()
            p.grad = torch.randn(s, generator=gen).to(device) * 1e-3
            ps.append(p)
        out.append(ps)
    return out


# torch.compile of (step + sums) on these sets only (compiling 1000 tensors takes many minutes).
COMPILE_SETS = ("vgg16",)


def providers(sets, device, compile_: bool) -> dict[str, list[Callable[[], object]]]:
    """name -> one step function per rotated copy of the params."""
    out: dict[str, list[Callable[[], object]]] = {}

    def per_set(make):
        return [make(ps) for ps in sets]

    out["torch foreach"] = per_set(lambda ps: torch.optim.SGD(ps, foreach=True, **HYPER).step)
    out["torch fused"] = per_set(lambda ps: torch.optim.SGD(ps, fused=True, **HYPER).step)

    out["torch fused + sums"] = per_set(lambda ps: step_and_sums(torch.optim.SGD(ps, fused=True, **HYPER), ps))
    if compile_:
        out["torch.compile(step + sums)"] = per_set(
            lambda ps: torch.compile(step_and_sums(torch.optim.SGD(ps, foreach=True, **HYPER), ps))
        )
    for backend in nm_optim.available_backends(device):
        if backend == "reference":
            continue
        out[f"nm_optim {backend}"] = per_set(lambda ps, b=backend: nm_optim.SGD(ps, backend=b, **HYPER).step)

        def tracked(ps, b=backend):
            tracks = [(p, a) for p in ps if p.dim() >= 2 for a in ("rows", "cols")]
            opt = nm_optim.SGD(ps, backend=b, track=tracks, **HYPER)
            opt.recorder.enabled = False
            return opt.step

        out[f"nm_optim {backend} + tracks"] = per_set(tracked)
    return out


def bench(name: str, device: str, rounds: int, warmup: int, l2_bytes: int, compile_: bool) -> dict:
    shapes = SHAPE_SETS[name]()
    n = sum(torch.Size(s).numel() for s in shapes)
    copies = max(1, -(-3 * l2_bytes // (n * 12)))  # p, g, v of all copies > 3x L2
    sets = param_sets(shapes, device, copies)
    run = timer(device)
    provs = providers(sets, device, compile_ and name in COMPILE_SETS)
    for fns in provs.values():
        for _ in range(warmup):
            for fn in fns:
                fn()
    times: dict[str, list[float]] = {k: [] for k in provs}
    for r in range(rounds):
        for k, fns in provs.items():
            times[k].append(run(fns[r % len(fns)]))
    base = statistics.median(times["torch fused"])
    rows = []
    for k, ts in times.items():
        ms = statistics.median(ts)
        rows.append(dict(provider=k, ms=ms, gbps=n * BYTES_PER_PARAM / (ms * 1e-3) / 1e9, ratio_to_torch_fused=ms / base))
    return dict(shape_set=name, n_tensors=len(shapes), n_params=n, rotated_copies=copies, rows=rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--quick", action="store_true", help="small shapes only (smoke test)")
    ap.add_argument("--json", required=True)
    args = ap.parse_args(argv)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_bench: no CUDA device", file=sys.stderr)
        return 2
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        name, l2 = props.name, getattr(props, "L2_cache_size", 50 * 2**20)
    else:
        name, l2 = platform.processor() or platform.machine(), 32 * 2**20
    sets = ["many_4096"] if args.quick else list(SHAPE_SETS)
    bw = copy_bandwidth(device, (64 if args.quick else 1024) * 2**20, 10)
    print(f"{name}: device-to-device copy {bw:.1f} GB/s (read + write)")
    results = []
    for s in sets:
        res = bench(s, device, args.rounds, args.warmup, l2, args.compile)
        results.append(res)
        print(f"\n{s}: {res['n_tensors']} tensors, {res['n_params']:,} params, {res['rotated_copies']} rotated copies")
        print(f"{'provider':<30}{'ms':>10}{'GB/s':>9}{'% copy bw':>11}{'vs fused':>10}")
        for r in res["rows"]:
            print(f"{r['provider']:<30}{r['ms']:>10.3f}{r['gbps']:>9.1f}{100 * r['gbps'] / bw:>10.1f}%"
                  f"{r['ratio_to_torch_fused']:>9.2f}x")
    meta = dict(
        device=name,
        torch=torch.__version__,
        cuda=torch.version.cuda,
        triton=_triton_version(),
        nm_optim=nm_optim.build_info(),
        copy_bandwidth_gbps=bw,
        bytes_per_param=BYTES_PER_PARAM,
        hyper=HYPER,
    )
    with open(args.json, "w") as f:
        json.dump(dict(meta=meta, results=results), f, indent=2)
    print(f"\nwrote {args.json}")
    return 0


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


if __name__ == "__main__":
    raise SystemExit(main())
