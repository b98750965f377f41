"""Recipe: FSDP2 (``fully_shard``) with symmetries, launched by torchrun.

Find the symmetries on the plain model, shard it, then build the optimizer from the sharded
model's parameters: nm_optim.SGD matches each symmetry's members to the sharded params by name.
Each rank steps its shards; the statistics are those of the whole tensors, identical on every
rank (one all-reduce per step), so rank 0 compares the laws with the record.

    torchrun --nproc-per-node 2 examples/recipe_fsdp2.py [--steps 100] [--out record.npz]

On CPUs the processes talk over gloo; with GPUs, over NCCL (one GPU per process).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import fully_shard

import nm_optim
from nm_optim.app.data import load_digits
from nm_optim.app.distributed import end_process


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--out", default=None, help="rank 0 saves the record here (.npz)")
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # the same initial model on every rank
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(),
                          nn.Linear(32, 10)).to(device)
    syms = nm_optim.find_symmetries(model, torch.zeros(2, 1, 8, 8, device=device), loss=F.cross_entropy)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    opt = nm_optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3, symmetries=syms)

    train = load_digits().train
    gen = torch.Generator().manual_seed(0)  # the same global batches on every rank
    for _ in range(args.steps):
        idx = torch.randint(0, len(train), (64,), generator=gen).chunk(world)[rank]
        x, y = (t.to(device) for t in train.batch(idx))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()  # FSDP2 averages the gradients over the ranks
        opt.step()

    record = opt.recorder.snapshot()
    if rank == 0:
        print(nm_optim.theory.compare(record).table())
        if args.out:
            record.save(args.out)
    dist.barrier()
    dist.destroy_process_group()
    end_process(0)  # skips interpreter finalisation, where gloo's threads can abort a finished run


if __name__ == "__main__":
    main()
