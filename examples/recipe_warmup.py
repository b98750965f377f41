"""Recipe: a plain training loop as most scripts write it, moved to nm_optim.SGD.

Linear warmup from lr = 0, then a cosine schedule down to lr = 0; weight decay on the weights
only (biases and normalisation layers in a param group without it); momentum 0.9. The laws of
every symmetry the model has are then compared with the record, each member with its own param
group's hyper-parameters (nm_optim.theory.compare).

    python examples/recipe_warmup.py [--steps 200] [--warmup 20]

Needs the demo extras (`pip install nm_optim[demo]`: scikit-learn for the digits).
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

import nm_optim
from nm_optim.app.data import load_digits
from nm_optim.models import get_model


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """The usual split: weight decay on matrices and kernels, none on biases and norm layers."""
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(warmup: int, steps: int):
    """lr factor at step k: linear from 0 over `warmup` steps, then cosine down to 0 at `steps`."""
    def factor(k: int) -> float:
        if k < warmup:
            return k / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (k - warmup) / max(1, steps - warmup))))
    return factor


def main(argv: list[str] | None = None) -> nm_optim.theory.Comparison:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--lr", type=float, default=0.05)
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    train = load_digits().train
    model = get_model("small_vgg_bn", num_classes=10, in_channels=1, image_size=8)
    syms = nm_optim.find_symmetries(model, train.batch(torch.arange(2))[0])

    opt = nm_optim.SGD(param_groups(model, 5e-3), lr=args.lr, momentum=0.9, symmetries=syms)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(args.warmup, args.steps))
    gen = torch.Generator().manual_seed(0)
    for _ in range(args.steps):
        x, y = train.batch(torch.randint(0, len(train), (64,), generator=gen))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()

    result = nm_optim.theory.compare(opt.recorder.snapshot())
    print(result.table())
    return result


if __name__ == "__main__":
    main()
