"""The README's "API in a dozen lines", runnable: find a network's symmetries, train it with
nm_optim.SGD on real data (scikit-learn's handwritten digits), and compare the recorded run with
the Neural Mechanics predictions.

    python examples/theory_quickstart.py [--steps 300] [--figure theory.png]

Needs the demo extras (`pip install nm_optim[demo]`: scikit-learn, matplotlib).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import nm_optim
from nm_optim.app.data import load_digits
from nm_optim.models import get_model


def main(argv: list[str] | None = None) -> nm_optim.theory.Comparison:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--figure", default=None, help="also draw theory vs. experiment to this PNG")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    train = load_digits().train  # 8x8 grayscale images that ship with scikit-learn
    model = get_model("small_vgg_bn", num_classes=10, in_channels=1, image_size=8)

    # translation / scale / rescale; the loss decides translation (softmax cross-entropy: yes, MSE: no)
    syms = nm_optim.find_symmetries(model, train.batch(torch.arange(2))[0], loss=F.cross_entropy)
    opt = nm_optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-3, symmetries=syms)
    gen = torch.Generator().manual_seed(0)
    for _ in range(args.steps):
        x, y = train.batch(torch.randint(0, len(train), (64,), generator=gen))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()  # no host synchronisation: the statistics stay on the device

    result = nm_optim.theory.compare(opt.recorder.snapshot())  # per symmetry and group
    print(result.table())
    if args.figure:
        from nm_optim import plot

        plot.figure(result, path=args.figure)
        print(f"wrote {args.figure}")
    return result


if __name__ == "__main__":
    main()
