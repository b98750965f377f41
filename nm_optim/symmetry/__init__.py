"""Symmetries of real networks: which parameter groups they act on, how to find them, and a check
that they hold (the paper: Kunin et al., ICLR 2021, section 3; docs/architecture.md, "Symmetries").

A symmetry is a set of `Member`s: (parameter, kernel track axis, role). Its groups are what the
conservation laws are about:

| kind | generator on group A | groups (PyTorch shapes) |
|---|---|---|
| `Translation` | θ_A ↦ θ_A + α·1 | final Linear W (C, D) before softmax: column j of W (groups 0..D-1) and the bias as one group (group D) |
| `Scale` | θ_A ↦ α θ_A | layer followed by BatchNorm: output channel o = row o of W plus b[o] |
| `Rescale` | (θ_A1, θ_A2) ↦ (α θ_A1, θ_A2 / α) | hidden unit c: A1 = row c of W_l plus b_l[c], A2 = column c of W_{l+1} (a block of columns after a Flatten) |

    syms = nm_optim.find_symmetries(model, example_inputs, loss=F.cross_entropy)  # torch.fx
    report = nm_optim.verify_symmetries(model, loss_fn, (x, y), syms)  # gradient and Hessian constraints
    print(report.table())
    opt = nm_optim.SGD(model.parameters(), lr=0.1, symmetries=syms)  # their tracks, one pass
    ...
    sym.group_stats(opt.recorder.snapshot())   # role -> [steps, groups, 9] sums per symmetry group

The loss decides the translation symmetry of a classifier's last Linear (it needs a softmax
cross-entropy, not MSE or BCE): without ``loss=`` (or a model declaring ``nm_optim_loss``, as the
zoo's classifiers do) none is claimed on the model's output. Under FSDP2, find the symmetries on
the plain model, then ``fully_shard`` it, then build the optimizer: ``nm_optim.SGD`` matches the
members to the sharded params by name.

Layers the detector does not know can be described by hand, e.g. a BatchNorm's affine parameters
feeding a conv through a ReLU: ``Rescale(bn.weight, conv.weight, bn.bias, name="bn1->conv2")``.

Transformers (attention, gated MLPs, pre-norm affine weights, embeddings into a LayerNorm, LM
heads; Hugging Face models and nn.TransformerEncoderLayer, which torch.fx cannot trace) are found
by module structure and confirmed by one gradient; their groups are rows or columns of ordinary
tracks picked by `Member.index` (the query slice of a fused in_proj_weight, a rotary pair, a
head). docs/transformers.md.

The package has four modules, one job each:

- `base`: the data model (`Member`, `Symmetry`, `Translation`, `Scale`, `Rescale`) and reading a
  record (`Symmetry.group_stats`, `symmetries_from_record`);
- `detect`: `find_symmetries` on the torch.fx graph (and the loss's), conservative: it claims only
  patterns it can prove; `found_on`, the model a symmetry was found on; `found_by`, how;
- `structural`: the module-structure candidates and the gradient that confirms them;
- `verify`: `verify_symmetries`, the gradient and Hessian constraints checked with torch.func.

It imports nothing from the optimizer, the op or the recorder, so these may import it.
"""

from __future__ import annotations

from nm_optim.names import KINDS
from nm_optim.symmetry.base import Member, Rescale, Scale, Symmetry, Translation, symmetries_from_record
from nm_optim.symmetry.detect import SymmetryDetectionError, find_symmetries, found_by, found_on
from nm_optim.symmetry.verify import SymmetryCheck, SymmetryReport, verify_symmetries

__all__ = [
    "KINDS",
    "Member",
    "Rescale",
    "Scale",
    "Symmetry",
    "SymmetryCheck",
    "SymmetryDetectionError",
    "SymmetryReport",
    "Translation",
    "find_symmetries",
    "found_by",
    "found_on",
    "symmetries_from_record",
    "verify_symmetries",
]
