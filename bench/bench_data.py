"""Images per second of `nm-optim train --data imagefolder:DIR`'s data loading against the rate of
the training step itself: whether decoding starves the step.

An ImageFolder of JPEGs (generated here: --images files of --source-size pixels, as Tiny
ImageNet's 64x64 JPEGs; or a real one, --data DIR) is read as train reads it
(nm_optim.app.data.batches over the loop's step order, nm_optim.app.loop.step_indices) with
0 worker processes (decoding in the training process) and with each --workers count, and is
compared with:

- step: forward, backward and nm_optim.SGD.step (tracking the model's symmetries, as train does)
  of --model on batches already in memory, images/s: what the data loading must keep up with;
- train: the two together in one loop (batches from the loader, then the step), images/s, with
  each workers count: what a run gets.

    python bench/bench_data.py                          # 2,000 generated 64x64 JPEGs, mlp
    python bench/bench_data.py --model small_vgg --workers 1 2 4 --json out.json
    python bench/bench_data.py --data ~/tiny-imagenet-200 --image-size 64 --model vgg16

Rates are over --batches batches after one that is not timed (it starts the worker processes);
the median of --repeats runs each.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import nm_optim
from nm_optim import models
from nm_optim.app import data as data_app
from nm_optim.app.loop import step_indices
from nm_optim.symmetry import find_symmetries


def write_jpegs(root: Path, n: int, size: int, classes: int = 10, seed: int = 0) -> None:
    """`n` JPEGs of smooth random colour fields (compressible as photographs are, unlike noise)
    in `classes` class folders."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = root / f"class_{i % classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((size, size), Image.BICUBIC).save(folder / f"{i:05d}.jpg", quality=90)


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def loading_rate(train, batch_size: int, batches: int, workers: int, seed: int = 0) -> float:
    """Images/s of reading `batches` batches as train does, after one untimed batch."""
    loader = data_app.batches(train, step_indices(len(train), batch_size, seed, 0, batches + 1), workers=workers)
    next(loader)
    start = time.perf_counter()
    n = 0
    for x, _ in loader:
        n += len(x)
    rate = n / (time.perf_counter() - start)
    del loader
    return rate


def make_step(model_name: str, train, batch_size: int):
    """One training step of `model_name` on a batch, as nm_optim.app.loop.train does it."""
    torch.manual_seed(0)
    c, h, _ = train.shape
    net = models.get_model(model_name, num_classes=train.num_classes, in_channels=c, image_size=h)
    example = train.batch(torch.arange(2))[0]
    opt = nm_optim.SGD(net.named_parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4,
                       symmetries=find_symmetries(net, example, loss=F.cross_entropy))

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        opt.step()

    return step


def step_rate(step, train, batch_size: int, batches: int) -> float:
    """Images/s of the step alone, on batches decoded beforehand."""
    ready = [train.batch(idx) for idx in step_indices(len(train), batch_size, 0, 0, min(batches, 8) + 1)]
    step(*ready[0])
    start = time.perf_counter()
    n = 0
    for i in range(batches):
        x, y = ready[1 + i % (len(ready) - 1)]
        step(x, y)
        n += len(x)
    return n / (time.perf_counter() - start)


def train_rate(step, train, batch_size: int, batches: int, workers: int) -> float:
    """Images/s of loading and stepping in one loop, as train runs."""
    loader = data_app.batches(train, step_indices(len(train), batch_size, 0, 0, batches + 1), workers=workers)
    step(*next(loader))
    start = time.perf_counter()
    n = 0
    for x, y in loader:
        step(x, y)
        n += len(x)
    rate = n / (time.perf_counter() - start)
    del loader
    return rate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=None, help="an ImageFolder tree (default: generated JPEGs)")
    p.add_argument("--images", type=int, default=2000, help="generated JPEGs (default: 2000)")
    p.add_argument("--source-size", type=int, default=64, help="side of the generated JPEGs (default: 64)")
    p.add_argument("--image-size", type=int, default=64, help="what train resizes to (--image-size; default: 64)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=20, help="timed batches per measurement (default: 20)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model", default="mlp", help=f"one of {', '.join(models.MODELS)} (default: mlp)")
    p.add_argument("--workers", type=int, nargs="+", default=None,
                   help="worker counts to measure besides 0 (default: 1 and the cores available)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)
    worker_counts = sorted({0, *(args.workers or (1, cores()))})

    with tempfile.TemporaryDirectory() as tmp:
        root = args.data
        if root is None:
            root = Path(tmp) / "images"
            write_jpegs(root, args.images, args.source_size)
        train = data_app.load(f"imagefolder:{root}", image_size=args.image_size).train
        print(f"{len(train)} images from {root if args.data else 'generated JPEGs'}, resized to {args.image_size}, "
              f"batches of {args.batch_size}, {cores()} cores, {torch.get_num_threads()} torch threads", flush=True)
        median = lambda f: statistics.median(f() for _ in range(args.repeats))  # noqa: E731
        step = make_step(args.model, train, args.batch_size)
        rates = {"step": median(lambda: step_rate(step, train, args.batch_size, args.batches))}
        print(f"  step alone ({args.model}): {rates['step']:8.0f} images/s", flush=True)
        rows = []
        for w in worker_counts:
            load = median(lambda: loading_rate(train, args.batch_size, args.batches, w))
            both = median(lambda: train_rate(step, train, args.batch_size, args.batches, w))
            rows.append({"workers": w, "loading_images_per_s": load, "train_images_per_s": both,
                         "loading_over_step": load / rates["step"], "train_over_step": both / rates["step"]})
            print(f"  workers {w:2d}: loading {load:8.0f} images/s ({load / rates['step']:.2f}x the step), "
                  f"loading + step {both:8.0f} images/s ({both / rates['step']:.2f}x)", flush=True)

    if args.json is not None:
        meta = dict(cpu=platform.processor() or platform.machine(), cores=cores(), threads=torch.get_num_threads(),
                    torch=torch.__version__, python=platform.python_version(), nm_optim=nm_optim.build_info(),
                    images=len(train), data=str(args.data) if args.data else f"generated {args.source_size}px JPEGs",
                    image_size=args.image_size, batch_size=args.batch_size, batches=args.batches,
                    repeats=args.repeats, model=args.model, load_average=os.getloadavg())
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(meta=meta, step_images_per_s=rates["step"], results=rows), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
