"""Which params may share memory: those are stepped in separate kernel calls, in the group's
order, so that each sees the memory as torch's loop leaves it (late weight tying, views of one
storage)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor


def memory_span(p: Tensor) -> tuple[torch.device, int, int] | None:
    """The device and the byte addresses [lo, hi) that hold `p`'s elements (all of them between
    its first and last element, so views that interleave count as overlapping: the safe side);
    None for a tensor without elements or without storage of its own (a DTensor, a fake
    tensor)."""
    if p.numel() == 0 or type(p) not in (Tensor, torch.nn.Parameter):
        return None
    try:
        lo = p.data_ptr()
    except (RuntimeError, NotImplementedError):
        return None
    return p.device, lo, lo + p.element_size() * (1 + sum((n - 1) * st for n, st in zip(p.shape, p.stride())))


def call_levels(params: list[Tensor]) -> list[int]:
    """For each param, the kernel call it goes to within its (device, dtype): 0, or one past the
    call of every earlier param whose memory may overlap it (a repeated param overlaps itself).
    Params in one call share no memory, and overlapping ones are stepped in their order."""
    levels = [0] * len(params)
    by_device: dict[torch.device, list[tuple[int, int, int]]] = {}
    for i, p in enumerate(params):
        span = memory_span(p)
        if span is not None:
            by_device.setdefault(span[0], []).append((span[1], span[2], i))
    for spans in by_device.values():
        for cluster in _overlapping(sorted(spans)):
            members = sorted(cluster, key=lambda c: c[2])  # in the group's order
            for k, (lo, hi, i) in enumerate(members):
                levels[i] = max((levels[j] + 1 for lo_j, hi_j, j in members[:k] if lo_j < hi and lo < hi_j), default=0)
    return levels


def _overlapping(spans: list[tuple[int, int, int]]) -> Iterator[list[tuple[int, int, int]]]:
    """The clusters of two or more spans [lo, hi) (sorted by lo) linked by overlaps."""
    cluster: list[tuple[int, int, int]] = []
    end = 0
    for span in spans:
        if cluster and span[0] >= end:
            if len(cluster) > 1:
                yield cluster
            cluster = []
        end = max(end, span[1]) if cluster else span[1]
        cluster.append(span)
    if len(cluster) > 1:
        yield cluster
