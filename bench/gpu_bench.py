"""GPU benchmark for bench/gpu_check.sh, in sections, the JSON rewritten as each one ends (a run
cut short keeps what it measured):

1. copy bandwidth (device to device);
2. bitwise agreement: one nm_optim step (each backend, tracks off and on) against torch's fused
   SGD (`torch.optim.SGD(..., fused=True)`; on the CPU, the dry run, its default for-loop step,
   which the CPU backend claims) on the same inputs, two steps (the buffer's creation,
   then its update), per dtype and hyper-parameter set: the number of differing elements of the
   params and momentum buffers, and the largest distance in units in the last place;
3. one optimizer step per provider on VGG-16, ResNet-50 and 1000 x 4096 shapes, timed with CUDA
   events (median after warm-up), inputs rotated so that the working set exceeds L2. On VGG-16
   the rows + cols tracks also run asking for the 6 product sums only (the kernels' PRODUCTS
   variants: what find_symmetries' scale and rescale laws ask for) beside all 9.
   `--compile` adds torch.compile(step + sums) on VGG-16 (a minute or more of compiling).

    python3 bench/gpu_bench.py --json OUT/bench.json [--compile] [--rounds 20] [--sets vgg16,...]
    python3 bench/gpu_bench.py --device cpu --quick --json /tmp/b.json    # the dry run

Exits 1 if a section raised (the others still run), 2 without the device.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable

import torch

import nm_optim
from nm_optim.names import PRODUCT_SUMS
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
    "tiny": lambda: [(33, 17), (7,), (4099,), (8, 3, 3, 3)],  # the dry run (Triton's interpreter)
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
    gen = torch.Generator(device).manual_seed(0)  # drawn on the device: VGG-16 is 277M numbers
    out = []
    for _ in range(copies):
        ps = []
        for s in shapes:
            p = torch.randn(s, generator=gen, device=device).requires_grad_()
            p.grad = torch.randn(s, generator=gen, device=device) * 1e-3
            ps.append(p)
        out.append(ps)
    return out


# torch.compile of (step + sums) on these sets only (compiling 1000 tensors takes many minutes).
COMPILE_SETS = ("vgg16",)
# Rows + cols tracks of the 6 product sums beside all 9 on these sets (the stage's time is short).
PRODUCT_SETS = ("vgg16", "tiny")


def providers(sets, device, compile_: bool, products: bool = False) -> dict[str, list[Callable[[], object]]]:
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

        def tracked(ps, b=backend, sums=None):
            tracks = [(p, a, sums) for p in ps if p.dim() >= 2 for a in ("rows", "cols")]
            opt = nm_optim.SGD(ps, backend=b, track=tracks, **HYPER)
            opt.recorder.enabled = False
            return opt.step

        out[f"nm_optim {backend} + tracks"] = per_set(tracked)
        if products:
            out[f"nm_optim {backend} + tracks (6 products)"] = per_set(lambda ps, b=backend: tracked(ps, b, PRODUCT_SUMS))
    return out


def bench(name: str, device: str, rounds: int, warmup: int, l2_bytes: int, compile_: bool,
          max_copies: int = 64) -> dict:
    shapes = SHAPE_SETS[name]()
    n = sum(torch.Size(s).numel() for s in shapes)
    copies = min(max_copies, max(1, -(-3 * l2_bytes // (n * 12))))  # p, g, v of all copies > 3x L2
    sets = param_sets(shapes, device, copies)
    run = timer(device)
    provs = providers(sets, device, compile_ and name in COMPILE_SETS, name in PRODUCT_SETS)
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


# -- bitwise agreement with torch's SGD ---------------------------------------------------------------

BITWISE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
BITWISE_HYPERS = {
    "plain": dict(lr=0.1),
    "wd": dict(lr=0.1, weight_decay=1e-2),
    "momentum_wd": dict(lr=0.1, momentum=0.9, weight_decay=5e-4),
    "dampening": dict(lr=0.1, momentum=0.9, dampening=0.1),
    "nesterov_wd": dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2),
    "maximize": dict(lr=0.1, momentum=0.9, maximize=True),
    "tensor_lr": dict(lr="tensor", momentum=0.9, weight_decay=5e-4),
}
# What each backend's update claims to equal bit for bit (README): torch's fused CUDA kernel on the
# GPU; on the CPU (the dry run) torch's default for-loop step, which the CPU backend follows (its
# fused CPU kernel rounds differently).
REFERENCE = {True: ("torch fused", dict(fused=True)), False: ("torch for-loop", dict(foreach=False))}


def bitwise_claimed(device: str, backend: str, dname: str) -> bool:
    """Whether the README claims this backend's update is the reference's bit for bit. On a GPU,
    CUDA and Triton perform torch's fused CUDA expression for every dtype. On the CPU (the dry
    run), the CPU backend performs torch's for-loop for fp32 / fp64 only (fp16 / bf16 are computed
    in float32 and rounded once per step, where the for-loop rounds after every op:
    docs/architecture.md, "The update"), and Triton in the interpreter performs torch's fused CUDA
    expression, not the CPU for-loop's. A difference there is by design, and says so."""
    return device == "cuda" or (backend == "cpu" and dname in ("fp32", "fp64"))
BITWISE_SHAPES = [(1,), (7,), (33, 17), (4099,), (64, 3, 3, 3), (1000, 1000)]
QUICK_BITWISE_SHAPES = [(1,), (7,), (33, 17), (67,), (4, 3, 3, 3)]
_INT_OF = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16,
           torch.bfloat16: torch.int16}


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in units in the last place of their dtype (0 for equal bits; +0 and -0 are 1
    apart), as int64 (float64 where the signs differ)."""
    ia = a.detach().contiguous().reshape(-1).view(_INT_OF[a.dtype]).long()
    ib = b.detach().contiguous().reshape(-1).view(_INT_OF[b.dtype]).long()
    if a.dtype != torch.float64:  # sign-magnitude -> a monotonic integer line
        low = {torch.float32: 0x7FFFFFFF, torch.float16: 0x7FFF, torch.bfloat16: 0x7FFF}[a.dtype]
        ia = torch.where(ia < 0, -(ia & low) - 1, ia)
        ib = torch.where(ib < 0, -(ib & low) - 1, ib)
        return (ia - ib).abs().double()
    ma = torch.where(ia < 0, -(ia & 0x7FFFFFFFFFFFFFFF) - 1, ia)
    mb = torch.where(ib < 0, -(ib & 0x7FFFFFFFFFFFFFFF) - 1, ib)
    same_sign = (ma < 0) == (mb < 0)
    return torch.where(same_sign, (ma - mb).abs().double(), ma.double().abs() + mb.double().abs())


def _diff(a: torch.Tensor, b: torch.Tensor) -> tuple[int, float]:
    d = ulp_distance(a, b)
    return int((d != 0).sum()), float(d.max()) if d.numel() else 0.0


def bitwise_case(device, backend, dtype, hyper, tracks, shapes) -> dict:
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype) for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype) for s in shapes]
             for _ in range(2)]
    ours = [t.clone().requires_grad_() for t in init]
    theirs = [t.clone().requires_grad_() for t in init]

    def kw():
        h = dict(hyper)
        if h.get("lr") == "tensor":
            h["lr"] = torch.tensor(0.1, device=device)
        return h

    track = [(p, a) for p in ours for a in (("rows", "cols") if p.dim() >= 2 else ("all",))] if tracks else None
    opt = nm_optim.SGD(ours, backend=backend, track=track, **kw())
    ref = torch.optim.SGD(theirs, **REFERENCE[device == "cuda"][1], **kw())
    n_p = n_v = 0
    max_ulp = 0.0
    for step in range(2):
        for p, q, g in zip(ours, theirs, grads[step]):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        for p, q in zip(ours, theirs):
            n, m = _diff(p, q)
            n_p, max_ulp = n_p + n, max(max_ulp, m)
            va = opt.state[p].get("momentum_buffer") if p in opt.state else None
            vb = ref.state[q].get("momentum_buffer") if q in ref.state else None
            if (va is None) != (vb is None):
                raise AssertionError(f"momentum buffer exists in one optimizer only ({tuple(p.shape)})")
            if va is not None:
                n, m = _diff(va, vb)
                n_v, max_ulp = n_v + n, max(max_ulp, m)
    if device == "cuda":
        torch.cuda.synchronize()
    return dict(n_elements=sum(t.numel() for t in init), diff_params=n_p, diff_buffers=n_v, max_ulp=max_ulp)


def bitwise_section(device: str, backends: list[str], quick: bool) -> dict:
    dtypes = ("fp32", "bf16") if quick else tuple(BITWISE_DTYPES)
    hypers = ("momentum_wd", "nesterov_wd") if quick else tuple(BITWISE_HYPERS)
    shapes = QUICK_BITWISE_SHAPES if quick else BITWISE_SHAPES
    rows, summary = [], {}
    for backend in backends:
        for dname in dtypes:
            diffs, ulp, errors = 0, 0.0, 0
            for hname in hypers:
                for tracks in (False, True):
                    row = dict(backend=backend, dtype=dname, hyper=hname, tracks=tracks)
                    try:
                        row.update(bitwise_case(device, backend, BITWISE_DTYPES[dname], BITWISE_HYPERS[hname],
                                                tracks, shapes))
                        diffs += row["diff_params"] + row["diff_buffers"]
                        ulp = max(ulp, row["max_ulp"])
                    except Exception as e:  # noqa: BLE001 (a case that raises is reported, not fatal)
                        row["error"] = f"{type(e).__name__}: {e}"
                        errors += 1
                    rows.append(row)
            differs = "no" if bitwise_claimed(device, backend, dname) else "differs by design"
            verdict = ("yes" if diffs == 0 else f"{differs} ({diffs} elements, max {ulp:g} ulp)") if not errors \
                else f"error ({errors} cases raised)"
            summary[f"{backend} {dname}"] = verdict
            print(f"bitwise vs {REFERENCE[device == 'cuda'][0]}: {backend:<7}{dname:<6}{verdict}", flush=True)
    return dict(reference=REFERENCE[device == "cuda"][0], dtypes=list(dtypes), hypers={h: {k: str(v) for k, v in BITWISE_HYPERS[h].items()} for h in hypers},
                shapes=[list(s) for s in shapes], steps=2, rows=rows, summary=summary)


def write_json(path: str, doc: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="add torch.compile(step + sums) on VGG-16 (slow)")
    ap.add_argument("--quick", action="store_true", help="tiny shapes, fewer bitwise cases (smoke test)")
    ap.add_argument("--sets", default="", help=f"comma-separated shape sets of {sorted(SHAPE_SETS)}")
    ap.add_argument("--no-bitwise", action="store_true", help="skip the bitwise comparison")
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
    sets = [s for s in args.sets.split(",") if s] or (["tiny"] if args.quick else ["many_4096", "resnet50", "vgg16"])
    unknown = [s for s in sets if s not in SHAPE_SETS]
    if unknown:
        ap.error(f"unknown shape sets {unknown}")
    backends = [b for b in nm_optim.available_backends(device) if b != "reference"]
    doc: dict = dict(
        meta=dict(device=name, torch=torch.__version__, cuda=torch.version.cuda, triton=_triton_version(),
                  nm_optim=nm_optim.build_info(), backends=backends, bytes_per_param=BYTES_PER_PARAM,
                  hyper=HYPER, rounds=args.rounds, compile=args.compile),
        sections=[], copy_bandwidth_gbps=None, bitwise=None, results=[],
    )
    write_json(args.json, doc)
    state = dict(bw=None)

    def section(label: str, fn: Callable[[], None]) -> None:
        t0 = time.perf_counter()
        rec = dict(name=label, status="ok")
        try:
            fn()
        except Exception as e:  # noqa: BLE001 (one section's failure must not lose the others)
            traceback.print_exc()
            rec.update(status="failed", error=f"{type(e).__name__}: {e}")
        rec["seconds"] = round(time.perf_counter() - t0, 2)
        doc["sections"].append(rec)
        write_json(args.json, doc)
        print(f"gpu_bench: section {label} {rec['status']} ({rec['seconds']} s)", flush=True)

    def bandwidth():
        bw = copy_bandwidth(device, (64 if args.quick else 1024) * 2**20, 10)
        state["bw"] = doc["copy_bandwidth_gbps"] = bw
        print(f"{name}: device-to-device copy {bw:.1f} GB/s (read + write)")

    def bitwise():
        doc["bitwise"] = bitwise_section(device, backends, args.quick)

    def one_set(s):
        res = bench(s, device, args.rounds, args.warmup, l2, args.compile, max_copies=2 if args.quick else 64)
        doc["results"].append(res)
        bw = state["bw"] or float("nan")
        print(f"\n{s}: {res['n_tensors']} tensors, {res['n_params']:,} params, {res['rotated_copies']} rotated copies")
        print(f"{'provider':<40}{'ms':>10}{'GB/s':>9}{'% copy bw':>11}{'vs fused':>10}")
        for r in res["rows"]:
            print(f"{r['provider']:<40}{r['ms']:>10.3f}{r['gbps']:>9.1f}{100 * r['gbps'] / bw:>10.1f}%"
                  f"{r['ratio_to_torch_fused']:>9.2f}x")

    section("copy_bandwidth", bandwidth)
    if not args.no_bitwise:
        section("bitwise", bitwise)
    for s in sets:
        section(s, lambda s=s: one_set(s))
        if device == "cuda":
            torch.cuda.empty_cache()
    failed = [r["name"] for r in doc["sections"] if r["status"] != "ok"]
    print(f"\nwrote {args.json}" + (f"; failed sections: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


if __name__ == "__main__":
    raise SystemExit(main())
