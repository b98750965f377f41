"""A Hugging Face GPT-2, built from a small config (no download), trained with nm_optim.SGD on the
standard library's source; its attention, norm and LM-head symmetries found by module structure,
recorded, and compared with the Neural Mechanics laws (docs/transformers.md).

    python examples/transformer_hf.py [--steps 200] [--figure gpt2.png]

Needs transformers (`pip install transformers`).
"""

from __future__ import annotations

import argparse

import torch
import transformers

import nm_optim
from nm_optim.app.demo_transformer import encode, stdlib_text


def main(argv: list[str] | None = None) -> nm_optim.theory.Comparison:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--figure", default=None, help="also draw theory vs. experiment to this PNG")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    data = encode(stdlib_text(200_000))
    # tie_word_embeddings=False: a tied LM head has no translation symmetry (find_symmetries says why)
    config = transformers.GPT2Config(vocab_size=int(data.max()) + 1, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                     tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():  # GPT-2 starts its biases at 0, where the key bias's law reads 0 = 0
        for block in model.transformer.h:
            block.attn.c_attn.bias.normal_(0.0, 0.1)

    def batch(gen: torch.Generator) -> torch.Tensor:
        start = torch.randint(0, len(data) - 65, (16,), generator=gen)
        return torch.stack([data[i : i + 64] for i in start.tolist()])

    ids = batch(torch.Generator().manual_seed(1))
    syms = nm_optim.find_symmetries(model, ids)  # torch.fx cannot trace GPT-2: by module structure
    for s in syms:
        print(f"{s.kind:<11} {s.num_groups:>4} groups  {s.name}")
    opt = nm_optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-3, symmetries=syms)
    gen = torch.Generator().manual_seed(0)
    for _ in range(args.steps):
        x = batch(gen)
        opt.zero_grad()
        model(x, labels=x).loss.backward()  # the model's own cross-entropy over the vocabulary
        opt.step()

    result = nm_optim.theory.compare(opt.recorder.snapshot())
    print(result.table())
    if args.figure:
        from nm_optim import plot

        plot.figure(result, path=args.figure)
        print(f"wrote {args.figure}")
    return result


if __name__ == "__main__":
    main()
