"""What a backend receives: the tensors of one bucket (Bucket) and everything else the op was
called with (StepArgs), unpacked once from the op's schema (nm_optim/ops/op.py). Every backend is
``step(bucket: Bucket, args: StepArgs) -> None``."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from torch import Tensor

from nm_optim.names import ALL_SUMS_MASK

if TYPE_CHECKING:
    from nm_optim.ops.plan import StatsLayout


class Bucket(NamedTuple):
    """Tensors of one device and dtype, stepped by one backend call. momentum_buffers and
    is_first are empty when momentum == 0. numels: the params' element counts, when the caller
    has them already (the kernels' tables are keyed by them). owner: the object whose lifetime
    keys the bucket's cached tables (nm_optim/ops/plan.py; default: the first param).
    stats_layout: the statistics layout of these tensors and the step's stats_offsets, when the
    caller has checked it already (the op does, nm_optim/ops/op.py); given only when some param
    is tracked."""

    params: Sequence[Tensor]
    grads: Sequence[Tensor]
    momentum_buffers: Sequence[Tensor]
    is_first: Sequence[bool]
    numels: tuple[int, ...] | None = None
    owner: object = None
    stats_layout: StatsLayout | None = None

    def subset(self, index: Sequence[int], has_momentum: bool) -> Bucket:
        """The tensors at `index`."""
        return Bucket(
            [self.params[i] for i in index],
            [self.grads[i] for i in index],
            [self.momentum_buffers[i] for i in index] if has_momentum else [],
            [self.is_first[i] for i in index] if has_momentum else [],
        )


@dataclass(frozen=True, slots=True)
class StepArgs:
    """The hyper-parameters and optional tensors of one fused step, in the op schema's order.

    lr_tensor, when given, overrides lr (read on the device: no host sync). grad_scale / found_inf
    are torch.amp.GradScaler's scale (the gradient is divided by it) and its inf flag (a
    non-zero value skips the step). With stats (float64 [rows, 9]), param i's statistics go to
    the rows stats_offsets[3i : 3i + 3] of its rows / cols / all tracks (-1: none), and
    stats_sums[i] says which sums they hold: a bit mask (bit k: names.STAT_NAMES[k]), one of
    names.SUM_MASKS; the other columns of its groups are written NaN. Empty: all 9 for every param.
    stats_blocks[i]: the column block of param i's "cols" track (that many consecutive columns of
    dim 1 form one group: ops/layout.py, geometry); empty: 1 for every param.
    """

    lr: float
    lr_tensor: Tensor | None = None
    weight_decay: float = 0.0
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    maximize: bool = False
    grad_scale: Tensor | None = None
    found_inf: Tensor | None = None
    backend: str = "reference"
    stats: Tensor | None = None
    stats_offsets: Sequence[int] = ()
    stats_sums: Sequence[int] = ()
    stats_blocks: Sequence[int] = ()

    @property
    def has_momentum(self) -> bool:
        return self.momentum != 0

    @property
    def with_stats(self) -> bool:
        """Whether any param of the call has a track."""
        return self.stats is not None and len(self.stats_offsets) > 0 and max(self.stats_offsets) >= 0

    def offsets_of(self, i: int) -> Sequence[int]:
        """Param i's rows / cols / all statistics rows (-1: none)."""
        return self.stats_offsets[3 * i : 3 * i + 3] if self.stats_offsets else (-1, -1, -1)

    def sums_of(self, i: int) -> int:
        """The bit mask of the sums param i's groups hold (names.ALL_SUMS_MASK: all 9)."""
        return self.stats_sums[i] if self.stats_sums else ALL_SUMS_MASK

    def block_of(self, i: int) -> int:
        """The column block of param i's "cols" track (1: one group per column)."""
        return self.stats_blocks[i] if self.stats_blocks else 1

    def subset(self, index: Sequence[int]) -> StepArgs:
        """The same step for the params at `index` (their statistics rows, sums and blocks follow
        them)."""
        if not self.stats_offsets:
            return self
        offsets = [o for i in index for o in self.stats_offsets[3 * i : 3 * i + 3]]
        if not any(o >= 0 for o in offsets):
            return dataclasses.replace(self, stats_offsets=(), stats_sums=(), stats_blocks=())
        sums = [self.stats_sums[i] for i in index] if self.stats_sums else ()
        blocks = [self.stats_blocks[i] for i in index] if self.stats_blocks else ()
        return dataclasses.replace(self, stats_offsets=offsets, stats_sums=sums, stats_blocks=blocks)


# The op's schema lists these fields after the four tensor lists, in this order (a test checks).
FIELDS = tuple(f.name for f in dataclasses.fields(StepArgs))
