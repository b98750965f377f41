"""Recipe: the Hugging Face Trainer with nm_optim.SGD, warmup and the usual no-decay groups.

The Trainer takes the optimizer and scheduler through ``optimizers=(opt, scheduler)``;
`NMOptimTrainerCallback` sends the norms and hyper-parameters of every layer to the Trainer's
``report_to`` integrations (here TensorBoard) at ``logging_steps``, not to the console, and keeps
the record in the Trainer's checkpoints, so ``train(resume_from_checkpoint=True)`` continues it.
The model is a 2-layer BERT built from a config (no download).

    python examples/recipe_huggingface.py [--steps 40] [--out hf_out] [--resume]

Needs `pip install transformers accelerate tensorboard`.
"""

from __future__ import annotations

import argparse

import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments
from transformers import get_linear_schedule_with_warmup

import nm_optim
from nm_optim.integrations.huggingface import NMOptimTrainerCallback


class Tokens(torch.utils.data.Dataset):
    """Random token sequences labelled by the parity of their first token."""

    def __init__(self, n: int = 256, length: int = 12, vocab: int = 64) -> None:
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, length), generator=gen)
        self.labels = self.ids[:, 0] % 2

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Hugging Face's convention: no weight decay on biases and LayerNorm weights."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if name.endswith("bias") or "LayerNorm" in name else decay).append((name, p))
    return [{"params": [p for _, p in decay], "param_names": [n for n, _ in decay], "weight_decay": weight_decay},
            {"params": [p for _, p in no_decay], "param_names": [n for n, _ in no_decay], "weight_decay": 0.0}]


def main(argv: list[str] | None = None) -> Trainer:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--out", default="hf_out")
    ap.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=16, num_labels=2)
    model = BertForSequenceClassification(config)
    opt = nm_optim.SGD(param_groups(model, 1e-2), lr=0.05, momentum=0.9, track="layers")
    schedule = get_linear_schedule_with_warmup(opt, num_warmup_steps=args.steps // 10, num_training_steps=args.steps)
    training = TrainingArguments(
        output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=16, logging_steps=5,
        save_steps=max(1, args.steps // 2), report_to=["tensorboard"], use_cpu=not torch.cuda.is_available(),
        seed=0, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=training, train_dataset=Tokens(), optimizers=(opt, schedule))
    NMOptimTrainerCallback.attach(trainer)
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    print(f"recorded {opt.recorder.steps_done} steps of {len(opt.tracks)} layers")
    return trainer


if __name__ == "__main__":
    main()
