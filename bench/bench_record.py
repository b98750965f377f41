"""The recorder's host memory, write time and load time: in memory vs streamed to disk.

VGG-16-BN (nm_optim.models, 32x32 inputs) with every symmetry find_symmetries finds: 33,025
groups, 2.38 MB of statistics per recorded step. No training: each step writes random numbers
into the tracks' stats tensors (what the kernel writes) and calls the recorder's per-step hook,
so the numbers are the recorder's own. Each mode runs in a fresh subprocess (clean RSS).

    python bench/bench_record.py                   # 2,000 steps, every mode
    python bench/bench_record.py --steps 500 --json out.json
    python bench/bench_record.py --steps 600 --compute-ms 50 --modes stream-float64 stream-float64-inline
    python bench/bench_record.py --live              # snapshot() vs latest(1) / since() as the history grows

Modes: in memory; streamed float64 / float32 with fsync per chunk and a writer thread (the
defaults); streamed in the training thread ("inline"), with and without fsync (without: a process
crash still loses at most a chunk, a power loss may lose more). The steps here take no time, so the
writer thread cannot hide the disk: write time per step is bounded by the disk's bandwidth either
way; in training it overlaps the writes with the steps' compute.

Per mode: host memory growth (the recorder's own bytes, `Recorder.host_bytes`, and the process's
anonymous RSS, which excludes the page cache a memory map uses), write time per step (mean, and
the slowest step: a chunk of 256 steps reaching the host or the disk), the checkpoint's recorder
state (torch.save'd size), and reading back: the whole record (load_record: an .npz reads all of
it, a stream maps it), one scale symmetry's sums, and the latest step (Recorder.latest(1)) vs
Recorder.snapshot().
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("memory", "stream-float64", "stream-float32", "stream-float64-inline", "stream-float64-inline-nofsync")


def rss_anon_mb() -> float:
    """Anonymous resident memory (heap, not file-backed pages) of this process, MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def mem_available_mb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_mode(mode: str, steps: int, folder: Path, compute_ms: float = 0.0) -> dict:
    import torch

    import nm_optim

    torch.manual_seed(0)
    model = nm_optim.models.get_model("vgg16_bn")
    syms = nm_optim.find_symmetries(model, torch.randn(2, 3, 32, 32))
    opt = nm_optim.SGD(model.named_parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, symmetries=syms)
    rec = opt.recorder
    device = torch.device("cpu")
    stats = opt._tracks.stats(device)
    rows = stats.shape[0]
    noise = [torch.randn(stats.shape, dtype=torch.float64) for _ in range(4)]
    path = folder / mode
    if mode.startswith("stream"):
        rec.stream_to(path, dtype=mode.split("-")[1], overwrite=True, fsync="nofsync" not in mode,
                      background="inline" not in mode)
    base = rss_anon_mb()
    times = []
    first = {id(p) for g in opt.param_groups for p in g["params"]}
    for i in range(steps):
        stats.copy_(noise[i % 4])  # what the kernel writes (outside the timed part)
        if compute_ms:
            time.sleep(compute_ms / 1e3)  # the rest of a training step: the writer thread's time
        t0 = time.perf_counter()
        rec.after_step(first if i == 0 else set(), None)
        times.append(time.perf_counter() - t0)
    drain = time.perf_counter()
    if rec.stream is not None:
        rec.stream.drain()  # the writer thread's backlog when the loop ends
    drain = time.perf_counter() - drain
    out = {
        "mode": mode, "steps": steps, "compute_ms": compute_ms, "final_drain_s": drain, "groups": rows, "mb_per_step": rows * 9 * 8 / 1e6,
        "write_ms_per_step_mean": 1e3 * statistics.fmean(times),
        "write_ms_per_step_median": 1e3 * statistics.median(times),
        "write_ms_slowest_step": 1e3 * max(times),
        "recorder_host_mb": rec.host_bytes / 1e6,
        "rss_anon_growth_mb": rss_anon_mb() - base,
    }
    t0 = time.perf_counter()
    latest = rec.latest(1)
    out["latest1_ms"] = 1e3 * (time.perf_counter() - t0)
    assert int(latest.steps[-1]) == steps - 1
    scale = next(s for s in syms if s.kind == "scale" and s.num_groups >= 256)
    if mode == "memory":
        # the checkpoint holds the whole history: measure its size without a second copy
        out["checkpoint_recorder_mb"] = rec.host_bytes / 1e6
        return out
    buf = io.BytesIO()
    torch.save(rec.state_dict(), buf)
    out["checkpoint_recorder_mb"] = len(buf.getvalue()) / 1e6
    t0 = time.perf_counter()
    rec.snapshot()
    out["snapshot_ms"] = 1e3 * (time.perf_counter() - t0)
    out["disk_mb"] = sum(f.stat().st_size for f in path.iterdir()) / 1e6
    base = rss_anon_mb()
    t0 = time.perf_counter()
    record = nm_optim.load_record(path)
    out["load_ms"] = 1e3 * (time.perf_counter() - t0)
    t0 = time.perf_counter()
    g = scale.group_stats(record)["A"]
    out["read_one_symmetry_ms"] = 1e3 * (time.perf_counter() - t0)
    out["read_one_symmetry"] = f"{scale.name}: {g.shape[1]} groups, {g.nbytes / 1e6:.1f} MB"
    out["read_one_symmetry_rss_anon_growth_mb"] = rss_anon_mb() - base
    del g, record
    if mode == "stream-float64":
        # what a record of this length costs as one .npz (the in-memory format): export, then load
        npz = folder / "record.npz"
        record = nm_optim.load_record(path)
        t0 = time.perf_counter()
        record.save(npz)
        out["npz_export_s"] = time.perf_counter() - t0
        del record
        base = rss_anon_mb()
        t0 = time.perf_counter()
        loaded = nm_optim.load_record(npz)
        out["npz_load_s"] = time.perf_counter() - t0
        out["npz_load_rss_anon_growth_mb"] = rss_anon_mb() - base
        t0 = time.perf_counter()
        scale.group_stats(loaded)
        out["npz_read_one_symmetry_ms"] = 1e3 * (time.perf_counter() - t0)
        npz.unlink()
    return out


def live_costs(at=(10, 1000, 5000)) -> dict:
    """Reading a running record: snapshot() (everything) vs latest(1) and since(step - 10), in
    memory, at several history lengths (VGG-16-BN's symmetries, median of 20 reads)."""
    import torch

    import nm_optim

    torch.manual_seed(0)
    model = nm_optim.models.get_model("vgg16_bn")
    syms = nm_optim.find_symmetries(model, torch.randn(2, 3, 32, 32))
    # the smallest symmetries only, so 5,000 steps fit in memory: the costs are what is measured
    small = sorted(syms, key=lambda s: s.num_groups)[:4]
    opt = nm_optim.SGD(model.named_parameters(), lr=0.1, momentum=0.9, symmetries=small)
    stats = opt._tracks.stats(torch.device("cpu"))
    rec = opt.recorder
    out = {"groups": stats.shape[0]}
    for n in at:
        while rec.steps_done < n:
            stats.normal_()
            rec.after_step(set(), None)
        for name, read in (("snapshot", rec.snapshot), ("latest1", lambda: rec.latest(1)),
                           ("since10", lambda: rec.since(rec.steps_done - 10))):
            times = []
            for _ in range(20):
                t0 = time.perf_counter()
                read()
                times.append(time.perf_counter() - t0)
            out[f"{name}_ms_at_{n}"] = 1e3 * statistics.median(times)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--modes", nargs="*", default=list(MODES), choices=MODES)
    ap.add_argument("--dir", default=None, help="where the streams go (default: a temporary folder)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--compute-ms", type=float, default=0.0,
                    help="simulated compute per step (sleep), outside the timed part: shows the writer thread's overlap")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child process: this mode only
    ap.add_argument("--live", action="store_true", help="only the costs of reading a running record")
    args = ap.parse_args()
    if args.live:
        print(json.dumps(live_costs()))
        return
    if args.one:
        print(json.dumps(run_mode(args.one, args.steps, Path(args.dir), args.compute_ms)))
        return
    results = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for mode in args.modes:
            need = args.steps * 2.38 * (1.1 if mode in ("memory", "stream-float64") else 0.1) + 1300
            if mem_available_mb() < need + 2000:  # leave room for everyone else on the machine
                print(f"skipping {mode}: needs ~{need:.0f} MB, {mem_available_mb():.0f} MB available", file=sys.stderr)
                continue
            res = subprocess.run([sys.executable, __file__, "--one", mode, "--steps", str(args.steps), "--dir", tmp,
                                  "--compute-ms", str(args.compute_ms)], check=False,
                                 capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
            if res.returncode:
                print(res.stderr, file=sys.stderr)
                raise SystemExit(f"{mode} failed")
            results.append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
