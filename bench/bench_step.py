"""Optimizer step time: torch.optim.SGD (for-loop, foreach, fused) vs nm_optim.SGD (each backend).

Side by side in one process, interleaved round by round (this machine is noisy: a ratio measured
in one run means more than two absolute times measured apart). Reports the median ms per step,
GB/s counted as 20 bytes per param (read p, g, v; write p, v: the floor for SGD with momentum),
and the ratio to torch.optim.SGD(fused=True): of the medians ("vs torch fused"), and the median of
the rounds' own ratios ("paired": every provider steps once per round, one after another).

    python bench/bench_step.py                       # every shape set, CPU
    python bench/bench_step.py --shapes many --json out.json
    python bench/bench_step.py --shapes tiny --stats no --json bench/results/cpu_bench_step.json --merge
    python bench/bench_step.py --device cuda         # on a GPU machine (CUDA-event timing)

"tiny" (1000 tensors of 8 elements) times the host's cost of a step: the kernels have nothing to
do, so what is measured is Python and dispatch, the cost every GPU step pays on a model with many
small tensors. It times torch's foreach and fused steps and nm_optim's compiled backends, plain
and with track="layers" (see providers), over at least TINY_ROUNDS rounds (a step is about a
millisecond, and the spread of a loaded machine is larger than that), and reports the 10th and
90th percentiles of the paired ratios beside their median.
--merge replaces the JSON's results of the shape sets run and keeps the others; each result
records when, on which machine and under what load it was measured.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch

import nm_optim

BYTES_PER_PARAM = 20
HYPER = dict(lr=1e-3, momentum=0.9, weight_decay=5e-4)


def vgg16_shapes(num_classes: int = 1000) -> list[tuple[int, ...]]:
    """Parameter shapes of torchvision's VGG-16 (224x224 input): 138,357,544 params."""
    cfg = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    shapes: list[tuple[int, ...]] = []
    c_in = 3
    for c in cfg:
        shapes += [(c, c_in, 3, 3), (c,)]
        c_in = c
    for d_in, d_out in ((512 * 7 * 7, 4096), (4096, 4096), (4096, num_classes)):
        shapes += [(d_out, d_in), (d_out,)]
    return shapes


SHAPE_SETS: dict[str, Callable[[], list[tuple[int, ...]]]] = {
    "vgg16": vgg16_shapes,
    "many": lambda: [(4096,)] * 1000,
    "tiny": lambda: [(8,)] * 1000,
}
# Shape sets whose step is host cost only: nm_optim with track="layers" is timed beside the plain
# step, over at least TINY_ROUNDS rounds.
HOST_BOUND = ("tiny",)
TINY_ROUNDS = 300


def fix_mmap_threshold(nbytes: int = 1 << 20) -> bool:
    """Keep large CPU tensors on fresh pages, as in a fresh process. glibc raises its mmap
    threshold when a large block is freed (up to 32 MiB): after the first blocks of this
    benchmark freed theirs, later tensors under the threshold came from the heap at other offsets
    modulo 4 KiB, and torch's fused step on VGG-16's parameters measured 90 ms instead of 52-59
    (the same process, the same shapes). A fixed threshold (mallopt M_MMAP_THRESHOLD) stops the
    adjustment. False where the C library has no mallopt."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_mmap_threshold = -3  # malloc.h
    return bool(mallopt(m_mmap_threshold, nbytes))


def make_params(shapes, device, dtype) -> list[torch.Tensor]:
    """One set of params and grads shared by every provider (each keeps its own buffers)."""
    gen = torch.Generator().manual_seed(0)
    params = []
    for s in shapes:
        p = torch.randn(s, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
        p.requires_grad_(True)
        p.grad = torch.randn(s, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype) * 1e-3
        params.append(p)
    return params


def providers(params, device: str, host_bound: bool = False) -> dict[str, torch.optim.Optimizer]:
    """Every torch.optim.SGD implementation and every nm_optim backend; for a host-bound set
    torch's foreach and fused steps and nm_optim's compiled backends, plain and with
    track="layers": the for-loop and the reference (5-15 ms of per-tensor torch ops on 1000 tiny
    tensors) say nothing about host cost, and each round would time the others right after
    them, on caches and an allocator they churned."""
    out: dict[str, torch.optim.Optimizer] = {}
    if not host_bound:
        out["torch for-loop"] = torch.optim.SGD(params, foreach=False, **HYPER)
    out["torch foreach"] = torch.optim.SGD(params, foreach=True, **HYPER)
    out["torch fused"] = torch.optim.SGD(params, fused=True, **HYPER)
    for backend in nm_optim.available_backends(device):
        if host_bound and backend == "reference":
            continue
        out[f"nm_optim {backend}"] = nm_optim.SGD(params, backend=backend, **HYPER)
        if host_bound:
            out[f"nm_optim {backend} track=layers"] = _quiet(
                nm_optim.SGD(params, backend=backend, track="layers", **HYPER))
    return out


def timer(device: str) -> Callable[[Callable[[], None]], float]:
    if device == "cuda":

        def run(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)

    else:

        def run(fn):
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3

    return run


def bench(shape_set: str, device: str, dtype: torch.dtype, rounds: int, warmup: int) -> dict:
    shapes = SHAPE_SETS[shape_set]()
    params = make_params(shapes, device, dtype)
    n = sum(p.numel() for p in params)
    host_bound = shape_set in HOST_BOUND
    if host_bound:
        rounds = max(rounds, TINY_ROUNDS)
        warmup = max(warmup, 20)
    opts = providers(params, device, host_bound)
    timer_ = timer(device)
    for opt in opts.values():
        for _ in range(warmup):
            opt.step()
    times: dict[str, list[float]] = {name: [] for name in opts}
    for name in rotated(list(opts), rounds):  # interleaved: every provider once per round
        times[name].append(timer_(opts[name].step))
    fused = statistics.median(times["torch fused"])
    rows = []
    for name, ts in times.items():
        ms = statistics.median(ts)
        row = dict(
            provider=name,
            ms=ms,
            gbps=n * BYTES_PER_PARAM / (ms * 1e-3) / 1e9,
            ratio_to_torch_fused=ms / fused,
            paired_ratio=paired_ratio(ts, times["torch fused"]),
            samples=len(ts),
        )
        if host_bound:
            row.update(spread_of(ts, times["torch fused"]))
        rows.append(row)
    return dict(shape_set=shape_set, n_tensors=len(params), n_params=n, dtype=str(dtype), rows=rows)


def spread_of(ts: list[float], base: list[float]) -> dict[str, float]:
    """The spread of a provider's times and of its paired ratios: 10th and 90th percentiles."""
    ratios = sorted(t / b for t, b in zip(ts, base, strict=True))
    ts = sorted(ts)

    def pct(xs: list[float], q: float) -> float:
        return xs[min(len(xs) - 1, int(q * len(xs)))]

    return dict(ms_p10=pct(ts, 0.1), ms_p90=pct(ts, 0.9), paired_p10=pct(ratios, 0.1), paired_p90=pct(ratios, 0.9))


def rotated(names: list[str], rounds: int) -> list[str]:
    """Every name once per round, the order rotated by one each round: a step that runs right
    after another one pays for what that one left behind (freed memory, evicted caches, the
    other tenants' phase), and no provider should pay for the same neighbour in every round."""
    return [names[(r + i) % len(names)] for r in range(rounds) for i in range(len(names))]


def torch_sums(params, bufs_of) -> list[torch.Tensor]:
    """The 9 sums per rows / cols group of every weight, with plain torch ops (what a user would
    write without nm_optim), from the pre-step p, g and v."""
    out = []
    for p in params:
        if p.dim() < 2:
            continue
        v = bufs_of(p)
        g = p.grad
        d0, d1 = p.shape[0], p.shape[1]
        pv, gv, vv = (p, g, v if v is not None else torch.zeros_like(p))
        terms = [pv, gv, vv, pv * pv, gv * gv, vv * vv, pv * gv, pv * vv, gv * vv]
        for t in terms:
            t3 = t.reshape(d0, d1, -1)
            out.append(t3.sum((1, 2)))  # float32 sums (torch reduces pairwise: accurate enough)
            out.append(t3.sum((0, 2)))
    return out


def step_and_sums(opt: torch.optim.Optimizer, params) -> Callable[[], list[torch.Tensor]]:
    """One step of `opt` preceded by the 9 sums of its pre-step values with torch ops."""

    def step():
        sums = torch_sums(params, lambda p: opt.state[p].get("momentum_buffer") if p in opt.state else None)
        opt.step()
        return sums

    return step


def _time_steps(steps: dict[str, Callable[[], object]], device: str, rounds: int, warmup: int,
                base_name: str, n: int) -> list[dict]:
    """Median ms of each step, interleaved round by round, and its ratio to `base_name`'s."""
    timer_ = timer(device)
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for name in rotated(list(steps), rounds):
        times[name].append(timer_(steps[name]))
    base = statistics.median(times[base_name])
    return [
        dict(provider=name, ms=statistics.median(ts), gbps=n * BYTES_PER_PARAM / (statistics.median(ts) * 1e-3) / 1e9,
             ratio_to_torch_fused=statistics.median(ts) / base, paired_ratio=paired_ratio(ts, times[base_name]),
             samples=len(ts), spread=(max(ts) - min(ts)) / statistics.median(ts))
        for name, ts in times.items()
    ]


def paired_ratio(ts: list[float], base: list[float]) -> float:
    """The median over rounds of this round's time over the base's time in the same round. The
    two ran back to back, so a slow phase of a shared machine (other tenants' memory traffic
    moves this machine's step times by 30-40% from round to round) slows both; the ratio of the
    two medians mixes different phases."""
    return statistics.median(t / b for t, b in zip(ts, base, strict=True))


def _quiet(opt):
    opt.recorder.enabled = False  # the step's own cost; the recorder adds a copy
    return opt


def bench_stats(device: str, rounds: int, warmup: int, compile_: bool, torch_sums_: bool = True) -> list[dict]:
    """VGG-16 with a rows and a cols track on every weight (what the theory needs), rows tracks
    only, track="layers"; 1000 small tensors with track="layers"; the symmetries that
    find_symmetries finds in VGG-16 and VGG-16-BN. Each set against torch's fused step without
    statistics on the same params."""
    params = make_params(vgg16_shapes(), device, torch.float32)
    n = sum(p.numel() for p in params)
    weights = [p for p in params if p.dim() >= 2]
    tracks = [(p, axis) for p in weights for axis in ("rows", "cols")]
    fused = torch.optim.SGD(params, fused=True, **HYPER)
    results = []
    if torch_sums_ or compile_:
        # In a block of their own: they allocate and free gigabytes of temporaries each step, and
        # whatever ran next paid for it.
        steps: dict[str, Callable[[], object]] = {"torch fused (no stats)": fused.step}
        if torch_sums_:
            steps["torch fused + sums (torch ops)"] = step_and_sums(torch.optim.SGD(params, fused=True, **HYPER),
                                                                    params)
        if compile_:
            eager = torch.optim.SGD(params, foreach=True, **HYPER)
            steps["torch.compile(step + sums)"] = torch.compile(step_and_sums(eager, params))
        results.append(dict(shape_set="vgg16 + rows/cols sums with torch ops", n_tensors=len(params), n_params=n,
                            dtype="torch.float32",
                            rows=_time_steps(steps, device, rounds, warmup, "torch fused (no stats)", n)))
        del steps
    steps = {"torch fused (no stats)": fused.step}
    backends = [b for b in nm_optim.available_backends(device) if b != "reference"]
    for backend in backends:
        steps[f"nm_optim {backend} (no stats)"] = nm_optim.SGD(params, backend=backend, **HYPER).step
        steps[f"nm_optim {backend} + rows/cols tracks"] = _quiet(
            nm_optim.SGD(params, backend=backend, track=tracks, **HYPER)).step
        steps[f"nm_optim {backend} + rows tracks"] = _quiet(
            nm_optim.SGD(params, backend=backend, track=[(p, "rows") for p in weights], **HYPER)).step
        steps[f"nm_optim {backend} track=layers"] = _quiet(
            nm_optim.SGD(params, backend=backend, track="layers", **HYPER)).step
    results.append(dict(shape_set="vgg16 + tracks", n_tensors=len(params), n_params=n, n_tracks=len(tracks),
                        n_groups=sum(p.shape[0] + p.shape[1] for p in weights), dtype="torch.float32",
                        rows=_time_steps(steps, device, rounds, warmup, "torch fused (no stats)", n)))
    del steps, fused, params, weights, tracks

    small = make_params(SHAPE_SETS["many"](), device, torch.float32)
    steps = {"torch fused (no stats)": torch.optim.SGD(small, fused=True, **HYPER).step}
    for backend in backends:
        steps[f"nm_optim {backend} (no stats)"] = nm_optim.SGD(small, backend=backend, **HYPER).step
        steps[f"nm_optim {backend} track=layers"] = _quiet(
            nm_optim.SGD(small, backend=backend, track="layers", **HYPER)).step
    m = sum(p.numel() for p in small)
    results.append(dict(shape_set="many (1000 x 4096) + track=layers", n_tensors=len(small), n_params=m,
                        dtype="torch.float32", rows=_time_steps(steps, device, rounds, warmup, "torch fused (no stats)", m)))
    del steps, small

    from nm_optim.models import example_input, get_model

    # VGG-16 for 224 x 224 inputs is the real one (fc1 [4096, 25088], its cols track in groups of
    # 49); the 32 x 32 models are kept for comparison with earlier results (the zoo's VGG pools to
    # 7 x 7 before the classifier, so their parameters are the same).
    for name, size in (("vgg16", 224), ("vgg16", 32), ("vgg16_bn", 32)):
        torch.manual_seed(0)
        model = get_model(name, num_classes=1000, image_size=size).to(device)
        syms = nm_optim.find_symmetries(model, example_input(model))
        mparams = [p for p in model.parameters()]
        gen = torch.Generator().manual_seed(1)
        for p in mparams:
            p.grad = (torch.randn(p.shape, generator=gen) * 1e-3).to(device)
        steps = {"torch fused (no stats)": torch.optim.SGD(mparams, fused=True, **HYPER).step}
        for backend in backends:
            steps[f"nm_optim {backend} (no stats)"] = nm_optim.SGD(mparams, backend=backend, **HYPER).step
            steps[f"nm_optim {backend} + symmetries"] = _quiet(
                nm_optim.SGD(mparams, backend=backend, symmetries=syms, **HYPER)).step
            # The same tracks (column blocks included) with all 9 sums each (sums None): what
            # statistics by need saves.
            all9 = [(p, axis, None, block) for sym in syms for p, axis, _, block in sym.track_asks()]
            steps[f"nm_optim {backend} + symmetries, all 9 sums"] = _quiet(
                nm_optim.SGD(mparams, backend=backend, symmetries=syms, track=all9, **HYPER)).step
        m = sum(p.numel() for p in mparams)
        label = f"{name} {size}x{size}" if name == "vgg16" else name
        results.append(dict(shape_set=f"{label} + find_symmetries ({len(syms)} symmetries)", n_tensors=len(mparams),
                            n_params=m, dtype="torch.float32",
                            rows=_time_steps(steps, device, rounds, warmup, "torch fused (no stats)", m)))
        del steps, model, mparams
    return results


def print_table(result: dict) -> None:
    print(
        f"\n{result['shape_set']}: {result['n_tensors']} tensors, {result['n_params']:,} params, "
        f"{result['dtype']}, momentum 0.9, weight decay 5e-4"
    )
    print(f"{'provider':<36}{'ms/step':>10}{'GB/s':>9}{'vs torch fused':>16}{'paired':>9}{'spread':>8}")
    for r in result["rows"]:
        spread = f"{r['spread']:>7.0%}" if "spread" in r else ""
        if "paired_p10" in r:
            spread = f"  paired p10-p90 {r['paired_p10']:.3f}-{r['paired_p90']:.3f}"
        print(f"{r['provider']:<36}{r['ms']:>10.3f}{r['gbps']:>9.2f}{r['ratio_to_torch_fused']:>15.3f}x"
              f"{r['paired_ratio']:>8.3f}x {spread}")


def measured_on() -> dict:
    """When, where and under what load a result was measured (the 1-minute load average of a
    shared machine tells how much its numbers may move)."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), cpu_model=model, cores=os.cpu_count(),
                load_average=list(os.getloadavg()) if hasattr(os, "getloadavg") else None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", choices=[*SHAPE_SETS, "all"], default="all")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", help="write the results to this file")
    ap.add_argument("--note", default="", help="a word on the machine's state, kept with each result measured")
    ap.add_argument("--merge", action="store_true",
                    help="with --json: replace that file's results of the shape sets run, keep the others")
    ap.add_argument("--stats", choices=["yes", "no", "only"], default="yes",
                    help="also time the statistics: VGG-16 with rows/cols, rows, layers tracks; 1000 small "
                         "tensors with track=layers; find_symmetries(vgg16 / vgg16_bn)")
    ap.add_argument("--no-torch-sums", action="store_true",
                    help="leave out torch fused + sums with torch ops (about 40x a step: slow)")
    ap.add_argument("--compile", action="store_true", help="include torch.compile(step + sums) (slow to compile)")
    args = ap.parse_args(argv)

    fix_mmap_threshold()
    dtype = getattr(torch, args.dtype)
    sets = list(SHAPE_SETS) if args.shapes == "all" else [args.shapes]
    results = []
    if args.stats != "only":
        for s in sets:
            before = measured_on()
            res = bench(s, args.device, dtype, args.rounds, args.warmup)
            res["measured"] = dict(before, load_average_after=measured_on()["load_average"])
            if args.note:
                res["measured"]["note"] = args.note
            print_table(res)
            results.append(res)
    if args.stats != "no":
        for res in bench_stats(args.device, args.rounds, args.warmup, args.compile, not args.no_torch_sums):
            print_table(res)
            results.append(res)
    if args.json:
        meta = dict(
            device=args.device,
            cpu=platform.processor() or platform.machine(),
            threads=torch.get_num_threads(),
            torch=torch.__version__,
            python=sys.version.split()[0],
            nm_optim=nm_optim.build_info(),
        )
        if args.merge and os.path.exists(args.json):
            with open(args.json) as f:
                old = json.load(f)
            ran = {r["shape_set"] for r in results}
            kept = [r for r in old.get("results", []) if r["shape_set"] not in ran]
            results = [*kept, *results]
            meta = dict(old.get("meta", {}), **meta) if not kept else old.get("meta", meta)
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, results=results), f, indent=2)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
