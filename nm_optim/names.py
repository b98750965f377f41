"""The vocabulary every layer shares: the statistics, the track axes, the hyper-parameters, the
symmetry kinds and roles, the backends and the record format.

This module imports nothing from nm_optim, so every other module may import it (nothing imports
upward). The meaning of each name is in docs/architecture.md.
"""

from __future__ import annotations

# The 9 sums the fused step reduces for every group of every track, in this column order, of the
# pre-step values p, g (the gradient after AMP unscaling and the maximize sign, before weight
# decay) and v (the momentum buffer before the step; 0 on its first step). They close the one-step
# dynamics exactly (docs/architecture.md, "The statistics").
STAT_NAMES = ("p", "g", "v", "pp", "gg", "vv", "pg", "pv", "gv")
STAT_INDEX = {name: i for i, name in enumerate(STAT_NAMES)}

# Statistics by need. A track reduces one of these sets of sums, the smallest holding what it was
# asked for: all 9, or the 6 products (the sums the scale and rescale laws read); the columns of
# the other sums read NaN. The op takes a set as a bit mask (bit k: STAT_NAMES[k]).
PRODUCT_SUMS = ("pp", "gg", "vv", "pg", "pv", "gv")
SUM_SETS = (PRODUCT_SUMS, STAT_NAMES)  # smallest first
ALL_SUMS_MASK = (1 << len(STAT_NAMES)) - 1
PRODUCT_SUMS_MASK = sum(1 << STAT_INDEX[name] for name in PRODUCT_SUMS)
SUM_MASKS = (PRODUCT_SUMS_MASK, ALL_SUMS_MASK)

# The sums each kind of law reads: its exact and continuous forms, its error measure (the natural
# scale: Σp² for every kind) and its breaking ratio (Σg², Σp² and the vanishing term).
LAW_SUMS = {
    "translation": ("p", "g", "v", "pp", "gg"),
    "scale": PRODUCT_SUMS,
    "rescale": PRODUCT_SUMS,
}


def sums_mask(names: "tuple[str, ...] | list[str]") -> int:
    """The bit mask of these sums (bit k: STAT_NAMES[k]); ValueError for a name not in STAT_NAMES."""
    bad = [n for n in names if n not in STAT_INDEX]
    if bad:
        raise ValueError(f"unknown statistics {bad}: the sums are {STAT_NAMES}")
    return sum(1 << STAT_INDEX[n] for n in set(names))


def mask_sums(mask: int) -> tuple[str, ...]:
    """The sums of a bit mask, in STAT_NAMES order."""
    return tuple(n for k, n in enumerate(STAT_NAMES) if mask >> k & 1)


def sum_set(names: "tuple[str, ...] | list[str]") -> tuple[str, ...]:
    """The smallest of SUM_SETS holding `names` (the sums a track asking for them reduces)."""
    want = sums_mask(names)
    return next(mask_sums(m) for m in SUM_MASKS if want & ~m == 0)

def track_sums(track: "dict[str, object]") -> tuple[str, ...]:
    """The sums a record's track holds (its meta entry's "sums"): all 9 for a record written
    before tracks said which (every track reduced all 9 then)."""
    sums = track.get("sums")
    return STAT_NAMES if sums is None else tuple(sums)  # type: ignore[arg-type]


# A track's axis: one group per index of dim 0, one per index of dim 1 (reducing over dim 0 and
# dims >= 2), or the whole tensor as one group.
AXES = ("rows", "cols", "all")

# The param-group hyper-parameters that the theory needs and the record keeps for every step
# (nesterov as 0 / 1), in the order of torch.optim.SGD's arguments.
HYPER_NAMES = ("lr", "momentum", "dampening", "weight_decay", "nesterov")

# The symmetries of the Neural Mechanics paper (Kunin et al., ICLR 2021, section 3) and the roles
# of their parameter groups: A for translation and scale; A1 (incoming) and A2 (outgoing) for
# rescale.
KINDS = ("translation", "scale", "rescale")
ROLES = {"translation": ("A",), "scale": ("A",), "rescale": ("A1", "A2")}

# The implementations of the one op (nm_optim/ops): "auto" picks the fastest available per device.
BACKENDS = ("reference", "cpu", "cuda", "triton")

# The record file (nm_optim/record/): a .npz whose "meta" JSON names this format.
RECORD_FORMAT = "nm_optim.record"
RECORD_FORMAT_VERSION = 1


def check_backend_name(backend: object) -> None:
    """ValueError unless `backend` is "auto" or one of BACKENDS (the message torch-style)."""
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"Invalid backend: {backend!r}; expected 'auto' or one of {BACKENDS}")
