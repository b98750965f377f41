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
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

CONFIGS = ("torch", "nm", "nm-all", "nm-rows-cols-all")


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
        hyper = {"lr": 1e-3, "momentum": 0.9, "weight_decay": 1e-4}
        if config == "torch":
            opt = torch.optim.SGD(model.parameters(), **hyper)
        elif config == "nm":
            opt = nm_optim.SGD(model.parameters(), **hyper)
        elif config == "nm-all":
            opt = nm_optim.SGD(model.named_parameters(), track="layers", **hyper)
        else:
            named = list(model.named_parameters())
            spec = [(p, ax) for _, p in named for ax in (("rows", "cols", "all") if p.dim() == 2 else ("all",))]
            opt = nm_optim.SGD(named, track=spec, **hyper)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (default: 1)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        rank, init, out = args.worker
        worker(int(rank), 2, init, out, args.dim, args.layers, args.steps, args.warmup, args.threads)
        return
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
    if args.json:
        args.json.write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k not in ("json", "worker")},
                                         "results": summary, "per_rank": ranks}, indent=1))


if __name__ == "__main__":
    main()
