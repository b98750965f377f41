"""Time per optimizer step under FSDP2 (fully_shard), 2 CPU processes with gloo on loopback:
torch.optim.SGD, nm_optim.SGD without tracks, and with tracks, and the share of the one
all-reduce per step that makes the tracks' statistics those of the whole tensors.

    python bench/bench_dist.py                       # 4 x Linear(1024, 1024), 50 timed steps
    python bench/bench_dist.py --dim 2048 --layers 8 --steps 30 --json out.json

Each worker builds the model, shards every Linear (and the root) with fully_shard, runs one
backward to get sharded grads, then times opt.step() alone (the grads are kept, so every step
does the same work), a barrier before each step so both ranks start together. Per configuration:
the median step time of the slower rank, and (with tracks) the median time of the all-reduce
inside the step (which includes waiting for the other rank to finish its kernels), the size of
the reduced block, and the same all-reduce timed alone (both ranks released by a barrier).
Momentum 0.9, weight decay 1e-4. On a shared machine the times are noisy: compare the columns of
one run.

Configurations: torch (torch.optim.SGD, its default foreach path), nm (no tracks), nm-all (an
"all" track per param: track="layers"), nm-rows-cols-all (rows, cols and all of every weight,
all of every bias).

`--compile` adds torch.compile against eager, in this one process (no torch.distributed), on
the same model: for each configuration, opt.step eager and torch.compile(opt.step) — the time of
the compiled step's first call (tracing, Inductor's code generation and the C++ compiler: the
compile time) and the median steady-state step — and a whole training step (forward, backward,
step) eager and with torch.compile on both the model and opt.step. Inductor's cache goes to a
fresh folder, so the compile times are cold. Minutes on a CPU: not in the default run.

    python bench/bench_dist.py --compile --json bench/results/cpu_bench_dist.json
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

CONFIGS = ("torch", "nm", "nm-all", "nm-rows-cols-all")
HYPER = {"lr": 1e-3, "momentum": 0.9, "weight_decay": 1e-4}


def make_optimizer(config: str, model):
    """The optimizer of a configuration (CONFIGS) over `model`'s params."""
    import torch

    import nm_optim

    if config == "torch":
        return torch.optim.SGD(model.parameters(), **HYPER)
    if config == "nm":
        return nm_optim.SGD(model.parameters(), **HYPER)
    if config == "nm-all":
        return nm_optim.SGD(model.named_parameters(), track="layers", **HYPER)
    named = list(model.named_parameters())
    spec = [(p, ax) for _, p in named for ax in (("rows", "cols", "all") if p.dim() == 2 else ("all",))]
    return nm_optim.SGD(named, track=spec, **HYPER)


def worker(rank: int, world: int, init_file: str, out: str, dim: int, layers: int, steps: int, warmup: int,
           threads: int) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import nm_optim
    import nm_optim.tracks

    warnings.simplefilter("ignore")
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))

    reduce_times: list[float] = []
    real_reduce = nm_optim.tracks.all_reduce_sum

    def timed_reduce(stats, group):
        t0 = time.perf_counter()
        real_reduce(stats, group)
        reduce_times.append(time.perf_counter() - t0)
        timed_reduce.elements = stats.numel()

    nm_optim.tracks.all_reduce_sum = timed_reduce
    results = {}
    for config in CONFIGS:
        torch.manual_seed(0)
        model = torch.nn.Sequential(*[torch.nn.Linear(dim, dim) for _ in range(layers)])
        for layer in model:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = make_optimizer(config, model)
        model(torch.randn(32, dim)).square().mean().backward()
        reduce_times.clear()
        times = []
        for i in range(warmup + steps):
            dist.barrier()
            t0 = time.perf_counter()
            opt.step()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        reduces = reduce_times[warmup:]
        bare = []  # the same all-reduce alone, both ranks released together by a barrier
        if reduces:
            block = torch.zeros(timed_reduce.elements, dtype=torch.float64)
            for i in range(warmup + steps):
                dist.barrier()
                t0 = time.perf_counter()
                dist.all_reduce(block)
                if i >= warmup:
                    bare.append(time.perf_counter() - t0)
        results[config] = {
            "step_ms": 1e3 * statistics.median(times),
            "allreduce_ms": 1e3 * statistics.median(reduces) if reduces else 0.0,
            "allreduce_calls_per_step": len(reduce_times) / (warmup + steps),
            "allreduce_bytes": 8 * getattr(timed_reduce, "elements", 0) if reduces else 0,
            "bare_allreduce_ms": 1e3 * statistics.median(bare) if bare else 0.0,
        }
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def compile_worker(config: str, kind: str, dim: int, layers: int, steps: int, warmup: int, threads: int) -> dict:
    """One cell of the compile section, in a fresh process: `kind` "step" (opt.step alone, the
    grads of one backward kept) or "train" (zero_grad, forward, backward, step), eager then
    compiled. Inductor's one-time start-up (its imports, its compile workers) is spent first on an
    unrelated function and reported apart, so the first call measures this graph's compile."""
    # a fresh Inductor cache before torch is imported: cold compiles, whatever ran before
    cache = os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench_dist_inductor.")
    atexit.register(shutil.rmtree, cache, ignore_errors=True)
    import torch

    torch.set_num_threads(threads)
    warnings.simplefilter("ignore")
    t0 = time.perf_counter()
    torch.compile(lambda t: t * 2 + 1)(torch.ones(3))
    startup = time.perf_counter() - t0
    x = torch.randn(32, dim, generator=torch.Generator().manual_seed(1))

    def timed(fn) -> tuple[float, float]:
        """(seconds of the first call, median ms of the steady state)."""
        t0 = time.perf_counter()
        fn()
        first = time.perf_counter() - t0
        times = []
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            fn()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        return first, 1e3 * statistics.median(times)

    out = {"inductor_startup_s": startup}
    for compiled in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = torch.nn.Sequential(*[torch.nn.Linear(dim, dim) for _ in range(layers)])
        opt = make_optimizer(config, model)
        step = torch.compile(opt.step) if compiled else opt.step
        if kind == "step":
            model(x).square().mean().backward()
            fn = step
        else:
            forward = torch.compile(model) if compiled else model

            def fn(forward=forward, opt=opt, step=step):
                opt.zero_grad(set_to_none=True)
                forward(x).square().mean().backward()
                step()

        first, ms = timed(fn)
        out["compiled" if compiled else "eager"] = {"first_call_s": first, "step_ms": ms}
    return out


def compile_section(args: argparse.Namespace) -> dict:
    """The compile-vs-eager cells, each in its own process (see compile_worker)."""
    results: dict = {}
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    for config in CONFIGS:
        results[config] = {}
        for kind in ("step", "train"):
            cmd = [sys.executable, __file__, "--dim", str(args.dim), "--layers", str(args.layers), "--steps",
                   str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads),
                   "--compile-worker", config, kind]
            proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"compile worker {config} {kind} failed:\n{proc.stderr[-3000:]}")
            results[config][kind] = json.loads(proc.stdout.strip().splitlines()[-1])
            r = results[config][kind]
            print(f"  {config} {kind}: eager {r['eager']['step_ms']:.3f} ms, compiled {r['compiled']['step_ms']:.3f} "
                  f"ms, compile {r['compiled']['first_call_s']:.2f} s", flush=True)
    return results


def print_compile(results: dict, args: argparse.Namespace) -> None:
    numel = args.layers * (args.dim * args.dim + args.dim)
    print(f"\ntorch.compile vs eager, 1 process ({args.threads} thread(s)): {args.layers} x Linear({args.dim}, "
          f"{args.dim}), {numel:,} params, batch 32; median of {args.steps} steps; compile s: the first call, "
          "cold (a fresh process and Inductor cache, Inductor's start-up spent before)")
    print(f"{'config':<18} {'step eager ms':>14} {'step compiled ms':>17} {'compile s':>10} "
          f"{'train eager ms':>15} {'train compiled ms':>18} {'compile s':>10}")
    for config, r in results.items():
        se, sc, te, tc = r["step"]["eager"], r["step"]["compiled"], r["train"]["eager"], r["train"]["compiled"]
        print(f"{config:<18} {se['step_ms']:>14.3f} {sc['step_ms']:>17.3f} {sc['first_call_s']:>10.2f} "
              f"{te['step_ms']:>15.3f} {tc['step_ms']:>18.3f} {tc['first_call_s']:>10.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (default: 1)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--compile", action="store_true",
                    help="also torch.compile vs eager in one process (minutes: cold compiles)")
    ap.add_argument("--no-fsdp", action="store_true", help="skip the FSDP2 section (with --compile)")
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--compile-worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.compile_worker:
        config, kind = args.compile_worker
        print(json.dumps(compile_worker(config, kind, args.dim, args.layers, args.steps, args.warmup, args.threads)))
        return
    if args.worker:
        rank, init, out = args.worker
        worker(int(rank), 2, init, out, args.dim, args.layers, args.steps, args.warmup, args.threads)
        return
    # the machine's load around the run: on a shared machine the times are only as good as this
    report: dict = {"load_average_before": os.getloadavg(), "cpus": os.cpu_count()}
    if not args.no_fsdp:
        report.update(fsdp_section(args))
    if args.compile:
        print("\ntorch.compile vs eager (compiling: minutes)...", flush=True)
        report["compile"] = compile_section(args)
        print_compile(report["compile"], args)
    report["load_average_after"] = os.getloadavg()
    print(f"\nload average (1, 5, 15 min) before {report['load_average_before']}, after "
          f"{report['load_average_after']} on {report['cpus']} CPUs")
    if args.json:
        report["args"] = {k: v for k, v in vars(args).items() if k not in ("json", "worker", "compile_worker")}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))


def fsdp_section(args: argparse.Namespace) -> dict:
    """The FSDP2 timings (two worker processes); prints the table, returns the results."""
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"),
                   OMP_NUM_THREADS=str(args.threads))
        common = ["--dim", str(args.dim), "--layers", str(args.layers), "--steps", str(args.steps),
                  "--warmup", str(args.warmup), "--threads", str(args.threads)]
        procs = [subprocess.Popen([sys.executable, __file__, *common, "--worker", str(r), str(Path(tmp, "init")), tmp],
                                  env=env) for r in range(2)]
        if any(p.wait() != 0 for p in procs):
            sys.exit("a worker failed")
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(2)]
    numel = args.layers * (args.dim * args.dim + args.dim)
    print(f"FSDP2, 2 processes (gloo, CPU, {args.threads} thread(s) each): {args.layers} x Linear({args.dim}, "
          f"{args.dim}), {numel:,} params, {numel // 2:,} per rank; median of {args.steps} steps, slower rank")
    print(f"{'config':<18} {'step ms':>9} {'vs torch':>9} {'all-reduce ms':>14} {'share':>7} {'reduced':>10} "
          f"{'bare all-reduce ms':>19}")
    summary = {}
    base = max(r["torch"]["step_ms"] for r in ranks)
    for config in CONFIGS:
        step = max(r[config]["step_ms"] for r in ranks)
        red = max(r[config]["allreduce_ms"] for r in ranks)
        nbytes = ranks[0][config]["allreduce_bytes"]
        bare = max(r[config]["bare_allreduce_ms"] for r in ranks)
        summary[config] = {"step_ms": step, "allreduce_ms": red, "allreduce_bytes": nbytes, "bare_allreduce_ms": bare,
                           "allreduce_calls_per_step": ranks[0][config]["allreduce_calls_per_step"]}
        share = f"{100 * red / step:.0f}%" if red else "-"
        print(f"{config:<18} {step:>9.3f} {step / base:>8.2f}x {red:>14.3f} {share:>7} "
              f"{(f'{nbytes / 1024:.1f} KiB' if nbytes else '-'):>10} {(f'{bare:.3f}' if bare else '-'):>19}")
    return {"results": summary, "per_rank": ranks}


if __name__ == "__main__":
    main()
