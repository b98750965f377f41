"""Train a small MLP with nm_optim.SGD, side by side with torch.optim.SGD, on a synthetic task.

    python examples/train_small.py [--steps 300] [--backend auto]

Both optimizers start from the same weights and see the same batches; the script prints the loss
curves and how far the two models drifted apart (float32 rounding only: the update is the same).
"""

from __future__ import annotations

import argparse
import time

import torch

import nm_optim


def make_data(n: int = 4096, dim: int = 32, classes: int = 10, seed: int = 0):
    """A learnable synthetic task: labels from a random teacher network."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=gen)
    teacher = torch.randn(dim, classes, generator=gen)
    y = (torch.tanh(x @ teacher) + 0.1 * torch.randn(n, classes, generator=gen)).argmax(1)
    return x, y


def make_model(dim: int = 32, classes: int = 10, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(dim, 128), torch.nn.ReLU(), torch.nn.Linear(128, 128), torch.nn.ReLU(),
        torch.nn.Linear(128, classes),
    )


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--backend", default="auto", help="auto | reference | cpu | cuda")
    args = ap.parse_args(argv)

    x, y = make_data()
    models = {"nm_optim.SGD": make_model(), "torch.optim.SGD": make_model()}
    hyper = dict(lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    opts = {
        "nm_optim.SGD": nm_optim.SGD(models["nm_optim.SGD"].parameters(), backend=args.backend, **hyper),
        "torch.optim.SGD": torch.optim.SGD(models["torch.optim.SGD"].parameters(), **hyper),
    }
    gen = torch.Generator().manual_seed(1)
    losses: dict[str, list[float]] = {name: [] for name in models}
    seconds = {name: 0.0 for name in models}
    for step in range(args.steps):
        idx = torch.randint(0, len(x), (args.batch_size,), generator=gen)
        for name, model in models.items():
            opts[name].zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            t0 = time.perf_counter()
            opts[name].step()
            seconds[name] += time.perf_counter() - t0
            losses[name].append(loss.item())
        if step % max(1, args.steps // 6) == 0 or step == args.steps - 1:
            print(f"step {step:5d}   " + "   ".join(f"{n}: loss {l[-1]:.4f}" for n, l in losses.items()))
    drift = max(
        (p - q).abs().max().item()
        for p, q in zip(models["nm_optim.SGD"].parameters(), models["torch.optim.SGD"].parameters())
    )
    print(f"max |w_nm_optim - w_torch| after {args.steps} steps: {drift:.2e}")
    print("optimizer.step() time: " + ", ".join(f"{n} {s * 1e3:.1f} ms" for n, s in seconds.items()))
    return {"losses": losses, "drift": drift}


if __name__ == "__main__":
    main()
