"""Tracks: which per-group statistics the fused step reduces, and where they land.

A track is (param, axis): "rows" gives one group per index of dim 0 (an output neuron or channel),
"cols" one per index of dim 1 (an input neuron or channel), "all" one group for the whole tensor.
For every group the kernel emits the 9 sums of the pre-step values (STAT_NAMES): g is the gradient
after AMP unscaling and the maximize sign, before weight decay; v is the momentum buffer before
the step (zeros on the first step and when momentum is 0).

Each distinct (param, axis) owns a fixed block of rows in a float64 [rows, 9] tensor on its
param's device; the kernel writes it in place every step, so nothing moves to the host in
`step()`. Two tracks that name the same (param, axis) share one block (no duplicate work).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from nm_optim.names import AXES, STAT_NAMES
from nm_optim.ops.layout import group_counts


def describe_value(x: Any) -> str:
    """`x` for an error message: a tensor by its shape and dtype (its repr prints the values,
    thousands of lines for a weight matrix), a sequence item by item, anything else by repr."""
    if isinstance(x, Tensor):
        return f"a tensor of shape {tuple(x.shape)} ({str(x.dtype).removeprefix('torch.')})"
    if isinstance(x, tuple | list):
        inner = ", ".join(describe_value(v) for v in x)
        return f"({inner}{',' if len(x) == 1 else ''})" if isinstance(x, tuple) else f"[{inner}]"
    return repr(x)


def num_groups(shape: Sequence[int], axis: str) -> int:
    return group_counts(shape)[AXES.index(axis)]


def track_pairs(spec: Any, param_groups: Sequence[dict[str, Any]]) -> list[tuple[Tensor, str]]:
    """The (param, axis) pairs of a `track` argument: None, "layers" (an "all" track for every
    param) or an iterable of (param, axis) pairs."""
    if spec is None:
        return []
    if isinstance(spec, str):
        if spec != "layers":
            raise ValueError(f"track must be 'layers' or a list of (param, axis) pairs, got {spec!r}")
        return [(p, "all") for group in param_groups for p in group["params"]]
    pairs = []
    for item in spec:
        if not (isinstance(item, tuple | list) and len(item) == 2 and isinstance(item[0], Tensor)):
            raise TypeError(f"each track must be a (param, axis) pair, got {describe_value(item)}")
        pairs.append((item[0], item[1]))
    return pairs


@dataclass(frozen=True)
class Track:
    """One resolved track: a block of `num_groups` rows starting at `row` in the stats tensor of
    `device`."""

    name: str
    param: Tensor
    axis: str
    shape: tuple[int, ...]
    num_groups: int
    device: torch.device
    row: int

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "axis": self.axis,
            "shape": list(self.shape),
            "num_groups": self.num_groups,
            "dtype": str(self.param.dtype).removeprefix("torch."),
        }


def _param_names(param_groups: Sequence[dict[str, Any]], fallback: dict[int, str] | None = None) -> dict[int, str]:
    """id(param) -> name: the param group's names, else `fallback` (e.g. a symmetry member's
    name), else "group{i}.param{j}"."""
    names: dict[int, str] = {}
    fallback = fallback or {}
    for gi, group in enumerate(param_groups):
        given = group.get("param_names")
        for pi, p in enumerate(group["params"]):
            names[id(p)] = given[pi] if given is not None else fallback.get(id(p), f"group{gi}.param{pi}")
    return names


def _check_axis(name: str, shape: tuple[int, ...], axis: Any) -> None:
    if axis not in AXES:
        raise ValueError(
            f"track {name!r}: axis must be one of {AXES}, got {describe_value(axis)} (param shape {shape})"
        )
    if axis == "rows" and len(shape) < 1:
        raise ValueError(f"track {name!r}: axis 'rows' needs a tensor with at least 1 dimension, got shape {shape}")
    if axis == "cols" and len(shape) < 2:
        raise ValueError(
            f"track {name!r}: axis 'cols' needs a tensor with at least 2 dimensions, got shape {shape}"
        )


class TrackTable:
    """The optimizer's tracks, their rows in the per-device stats tensors, and the lookup the
    step uses (param -> the first row of its rows / cols / all track, -1 where absent)."""

    def __init__(self, spec: str | Iterable[tuple[Tensor, str]] | None, param_groups: Sequence[dict[str, Any]],
                 names: dict[int, str] | None = None):
        self._names = names = _param_names(param_groups, names)
        pairs = track_pairs(spec, param_groups)

        self.tracks: list[Track] = []
        self._slots: dict[tuple[int, str], Track] = {}
        self._rows_used: dict[torch.device, int] = {}
        for p, axis in pairs:
            if id(p) not in names:
                raise ValueError(
                    f"track on a tensor of shape {tuple(p.shape)} that is not a parameter of this optimizer"
                )
            name = names[id(p)]
            shape = tuple(p.shape)
            _check_axis(name, shape, axis)
            slot = self._slots.get((id(p), axis))
            if slot is None:
                row = self._rows_used.get(p.device, 0)
                n = num_groups(shape, axis)
                slot = Track(f"{name}:{axis}", p, axis, shape, n, p.device, row)
                self._rows_used[p.device] = row + n
                self._slots[(id(p), axis)] = slot
            self.tracks.append(slot)
        self._offsets: dict[int, tuple[int, int, int]] = {}
        for (pid, axis), t in self._slots.items():
            r, c, a = self._offsets.get(pid, (-1, -1, -1))
            r, c, a = (t.row if axis == "rows" else r, t.row if axis == "cols" else c, t.row if axis == "all" else a)
            self._offsets[pid] = (r, c, a)
        self._stats: dict[torch.device, Tensor] = {}

    def __len__(self) -> int:
        return len(self.tracks)

    def param_name(self, p: Tensor) -> str:
        """The name this table gives `p` (its tracks are f"{name}:{axis}")."""
        return self._names[id(p)]

    def offsets(self, p: Tensor) -> tuple[int, int, int] | None:
        return self._offsets.get(id(p))

    def stats(self, device: torch.device) -> Tensor:
        """The float64 [rows, 9] tensor the kernel writes for params on `device`."""
        t = self._stats.get(device)
        if t is None:
            t = torch.full((self._rows_used.get(device, 0), len(STAT_NAMES)), float("nan"),
                           dtype=torch.float64, device=device)
            self._stats[device] = t
        return t

    def begin_step(self) -> None:
        """Groups not stepped this time (no grad, or a step skipped by found_inf) read NaN."""
        for t in self._stats.values():
            t.fill_(float("nan"))

    def devices(self) -> list[torch.device]:
        return list(self._rows_used)

    def last_stats(self) -> list[Tensor]:
        """One float64 CPU tensor [num_groups, 9] per track, aligned with the track list."""
        host = {d: self.stats(d).cpu() for d in self._rows_used}
        return [host[t.device][t.row : t.row + t.num_groups].clone() for t in self.tracks]

    def check_unchanged(self) -> None:
        """RuntimeError if a tracked param's shape or device is no longer the one its track's
        rows were laid out for (e.g. ``p.data = smaller``). Called by every step, before it writes
        anything, so the statistics recorded so far all describe the shapes of the tracks."""
        for t in self._slots.values():
            p = t.param
            if p.shape != t.shape or p.device != t.device:
                self._changed(t)

    def _changed(self, t: Track) -> None:
        name = self._names[id(t.param)]
        axes = sorted(a for (pid, a) in self._slots if pid == id(t.param))
        raise RuntimeError(
            f"parameter {name!r} is tracked ({', '.join(axes)}) with shape {t.shape} on {t.device}, the "
            f"shape it had when the optimizer was created, but it is now {tuple(t.param.shape)} on "
            f"{t.param.device}. A track's groups are fixed when the optimizer is created: save the history "
            "recorded so far with opt.recorder.save(path), then re-track the parameter at its new shape by "
            "creating a new nm_optim.SGD with track=[...]."
        )
