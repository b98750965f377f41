"""Recipe: Lightning, with bf16 mixed precision, gradient clipping, warmup and checkpoints.

`configure_optimizers` returns an nm_optim.SGD (and a warmup schedule) as it would a
torch.optim.SGD; `NMOptimCallback` logs the norms, conserved quantities and hyper-parameters with
the trainer's loggers at its `log_every_n_steps`, and keeps the record in Lightning's checkpoints,
so `fit(ckpt_path=...)` continues the record exactly.

    python examples/recipe_lightning.py [--epochs 3] [--out lightning_logs] [--resume last.ckpt]

Needs `pip install lightning` and the demo extras (scikit-learn for the digits).
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

import nm_optim
from nm_optim.app.data import load_digits
from nm_optim.integrations.lightning import NMOptimCallback
from nm_optim.models import get_model


class DigitsModule(pl.LightningModule):
    def __init__(self, lr: float = 0.05, warmup: int = 10) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = get_model("small_vgg_bn", num_classes=10, in_channels=1, image_size=8)
        self.lr, self.warmup = lr, warmup

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        syms = nm_optim.find_symmetries(self.net, torch.zeros(2, 1, 8, 8), loss=F.cross_entropy)
        decay = [p for p in self.net.parameters() if p.ndim > 1]
        no_decay = [p for p in self.net.parameters() if p.ndim <= 1]
        opt = nm_optim.SGD([{"params": decay, "weight_decay": 5e-3}, {"params": no_decay, "weight_decay": 0.0}],
                           lr=self.lr, momentum=0.9, symmetries=syms)
        warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, k / self.warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}

    def train_dataloader(self):
        train = load_digits().train
        x, y = train.batch(torch.arange(len(train)))
        gen = torch.Generator().manual_seed(0)
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64, shuffle=True,
                                           generator=gen)


def main(argv: list[str] | None = None) -> pl.Trainer:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--out", default="lightning_logs")
    ap.add_argument("--resume", default=None, help="a checkpoint of an earlier run (e.g. OUT/ckpt/last.ckpt)")
    args = ap.parse_args(argv)

    trainer = pl.Trainer(
        max_epochs=args.epochs, precision="bf16-mixed", gradient_clip_val=1.0, log_every_n_steps=5,
        accelerator="auto", devices=1, enable_progress_bar=False, enable_model_summary=False,
        logger=CSVLogger(args.out, name="digits"),
        callbacks=[NMOptimCallback(), ModelCheckpoint(dirpath=f"{args.out}/ckpt", save_last=True)],
    )
    trainer.fit(DigitsModule(), ckpt_path=args.resume)
    result = nm_optim.theory.compare(trainer.optimizers[0].recorder.snapshot())
    print(result.table())
    return trainer


if __name__ == "__main__":
    main()
