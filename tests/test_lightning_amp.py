"""Lightning's mixed precision with gradient clipping, as a user runs it: nm_optim.SGD trains where
torch.optim.SGD trains, to the same bits.

Lightning refuses gradient clipping for an optimizer that says it unscales inside its step
(``_step_supports_amp_scaling``, lightning/pytorch/plugins/precision/amp.py), and reads that
attribute with or without a GradScaler (bf16-mixed has none). torch.optim.SGD sets it only for
fused=True; nm_optim.SGD does the same (nm_optim/sgd.py).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import nm_optim

pl = pytest.importorskip("lightning.pytorch")

STEPS = 6


class Net(pl.LightningModule):
    def __init__(self, make_opt):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
        self.make_opt = make_opt

    def training_step(self, batch, _):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return self.make_opt(self.net.parameters())


def loader():
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 6, generator=gen), torch.randint(0, 3, (64,), generator=gen)
    # Large inputs so that clipping at 0.05 really cuts the gradients.
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(10 * x, y), batch_size=8)


def precision_args(precision):
    if precision == "16-mixed":
        # Lightning turns precision="16-mixed" on the CPU into bf16-mixed (no scaler); the plugin
        # with a CPU GradScaler runs the fp16 recipe itself: scale, unscale_, clip, step, update.
        from lightning.pytorch.plugins.precision import MixedPrecision

        return dict(plugins=[MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))])
    return dict(precision=precision)


def train(make_opt, precision, clip=0.05):
    model = Net(make_opt)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, gradient_clip_val=clip, max_steps=STEPS, **precision_args(precision),
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on workers and on the CPU's AMP
        trainer.fit(model, loader())
    assert trainer.global_step == STEPS
    return model, trainer


def bits(t):
    return t.detach().view(torch.int32 if t.dtype == torch.float32 else torch.int64)


def sgd_kwargs():
    return dict(lr=0.1, momentum=0.9, weight_decay=1e-3)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_with_clipping_trains_like_torch_sgd(precision, backend):
    if backend not in nm_optim.available_backends("cpu"):
        pytest.skip(f"backend {backend!r} not available here")
    ours, trainer = train(lambda ps: nm_optim.SGD(ps, backend=backend, **sgd_kwargs()), precision)
    theirs, _ = train(lambda ps: torch.optim.SGD(ps, foreach=False, **sgd_kwargs()), precision)
    if precision == "16-mixed":  # the GradScaler path: Lightning unscaled, clipped, then stepped
        assert trainer.precision_plugin.scaler is not None and trainer.precision_plugin.precision == "16-mixed"
    unclipped, _ = train(lambda ps: torch.optim.SGD(ps, foreach=False, **sgd_kwargs()), precision, clip=0.0)
    moved = False
    for (name, p), q, r in zip(ours.named_parameters(), theirs.parameters(), unclipped.parameters()):
        assert torch.equal(bits(p), bits(q)), f"{precision}: {name} differs from torch.optim.SGD's run"
        assert torch.equal(bits(p.grad), bits(q.grad)), f"{precision}: {name}.grad differs"
        moved |= not torch.equal(p, r)
    assert moved, "clipping at 0.05 changed nothing: the test would not see clipping skipped"


def test_fused_true_is_refused_with_clipping_as_torch_fused_is():
    """fused=True means the step unscales (torch's contract): Lightning then refuses clipping for
    both optimizers alike."""
    for make in (lambda ps: torch.optim.SGD(ps, fused=True, **sgd_kwargs()),
                 lambda ps: nm_optim.SGD(ps, fused=True, **sgd_kwargs())):
        with pytest.raises(RuntimeError, match="does not allow for gradient clipping"):
            train(make, "bf16-mixed")
