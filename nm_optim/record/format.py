"""The record's data and its file format: Record (what was recorded), the .npz file, the checks
that a file is a readable record (RecordError), and the chunks the recorder collects and streams.
docs/architecture.md, "The record".

Format versions: the version stays 1 (nm_optim.names.RECORD_FORMAT_VERSION) through the checksums:
they are new keys that older readers ignore. A stream whose layout says ``"checksums": "crc32"``
must carry every checksum; one without (written before them) loads unverified, its fields
checked all the same. A file of a newer version is refused, naming the version. So through a
track's "sums" (the columns holding sums; the others NaN): a record without it was written when
every track reduced all 9, and reads so (names.track_sums)."""

from __future__ import annotations

import json
import os
import tokenize
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch

from nm_optim._io import atomic_write
from nm_optim.names import AXES, HYPER_NAMES, STAT_NAMES, SUM_SETS
from nm_optim.ops.layout import group_counts
from nm_optim.names import RECORD_FORMAT as FORMAT
from nm_optim.names import RECORD_FORMAT_VERSION as FORMAT_VERSION

STREAM_META = "meta.json"
STREAM_INDEX = "index.jsonl"
STREAM_DTYPES = ("float64", "float32")
_META_KEYS = ("steps", "first", "skipped", *HYPER_NAMES)


def _stats_file(k: int) -> str:
    return f"stats-{k}.bin"


@dataclass
class Record:
    """A recorded run: for each track, stats[steps, groups, 9]; for each recorded step the
    hyper-parameters of every param group, which tracks took their first momentum step, and
    whether GradScaler skipped it.

    A record read from a stream holds its stats as read-only memory maps of the stream's files
    (float64, or float32 for a float32 stream): reading a track reads only that track's bytes."""

    tracks: list[dict[str, Any]]
    steps: np.ndarray  # [S] int64, the optimizer step index (0-based)
    stats: list[np.ndarray]  # per track [S, groups, 9] float64 (float32 from a float32 stream)
    hyper: dict[str, np.ndarray]  # name -> [S, n_param_groups] float64 (nesterov as 0/1)
    first: np.ndarray  # [S, n_tracks] bool: the track's param created its momentum buffer
    skipped: np.ndarray  # [S] bool: found_inf was set, nothing was stepped
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def stat_names(self) -> tuple[str, ...]:
        return STAT_NAMES

    def to_numpy(self) -> dict[str, np.ndarray]:
        """track name -> array [steps, groups, 9] (columns: nm_optim.STAT_NAMES)."""
        return {t["name"]: s for t, s in zip(self.tracks, self.stats)}

    def __len__(self) -> int:
        return len(self.steps)

    def save(self, path: str | os.PathLike) -> Path:
        """Write one .npz file atomically: a temporary file in the same folder, fsync, rename.
        A crash leaves the old file (or none), never half of a new one. Memory-mapped stats (a
        record read from a stream) are copied through a bounded buffer, not loaded whole."""
        path = Path(path)
        meta = dict(self.meta)
        meta.update(format=FORMAT, format_version=FORMAT_VERSION, stat_names=list(STAT_NAMES),
                    tracks=self.tracks, hyper_names=list(self.hyper))
        arrays: dict[str, np.ndarray] = {
            "meta": np.array(json.dumps(meta)),
            "steps": self.steps,
            "first": self.first,
            "skipped": self.skipped,
        }
        for name, values in self.hyper.items():
            arrays[f"hyper_{name}"] = values
        for i, s in enumerate(self.stats):
            arrays[f"stats_{i}"] = s
        atomic_write(path, lambda f: np.savez(f, **arrays))
        return path


# -- checksums ------------------------------------------------------------------------------------------------
# A record stream's JSON files (meta.json, each line of index.jsonl) end with a "crc32" key: the
# CRC-32 of the file's (line's) bytes before the comma that precedes it, as 8 hex digits. So the
# check is over the bytes as written (no re-serialisation), and the file stays plain JSON that
# older readers load. Each index line also has "stats_crc32": per device, the CRC-32 of the
# chunk's bytes in its stats file. A .npz is a zip file: every member carries its CRC-32, which
# zipfile checks as numpy reads the member whole (load_record reads every member whole).
CHECKSUM = "crc32"


def _crc(data: bytes | memoryview) -> str:
    return f"{zlib.crc32(data):08x}"


def _seal(text: str) -> str:
    """The JSON object `text` with a last key "crc32" over its bytes up to that key's comma."""
    head = text.rstrip()
    head = head[:-1].rstrip() if head.endswith("}") else ""
    if not head.startswith("{") or head == "{":
        raise ValueError("only a non-empty JSON object can be sealed")
    crc = _crc(head.encode())
    return f'{head},\n "{CHECKSUM}": "{crc}"\n}}' if "\n" in text else f'{head},"{CHECKSUM}":"{crc}"}}'


def _seal_state(raw: bytes, obj: dict[str, Any]) -> bool | None:
    """Whether the JSON object `obj` parsed from `raw` passes its seal (None: it has none). The
    "crc32" key is removed from `obj`."""
    if CHECKSUM not in obj:
        return None
    last = list(obj)[-1] == CHECKSUM  # the seal covers everything before it
    crc = obj.pop(CHECKSUM)
    if not last:
        return False
    at = raw.rfind(f'"{CHECKSUM}"'.encode())
    cut = raw.rfind(b",", 0, at)
    return isinstance(crc, str) and cut > 0 and _crc(raw[:cut]) == crc


class RecordError(ValueError):
    """A file that is not a readable nm_optim record; the message names the file and what is
    wrong with it, in one line."""


# Errors numpy, zipfile and json raise on damaged or foreign files (NotImplementedError: zipfile,
# for a compression method byte that a flip changed; SyntaxError / TokenError: numpy parses a
# member's .npy header before zipfile has checked the member's CRC-32).
_READ_ERRORS = (ValueError, OSError, EOFError, KeyError, NotImplementedError, zipfile.BadZipFile, zlib.error,
                SyntaxError, tokenize.TokenError)


def _check_meta(meta: Any, fail: Callable[[str], NoReturn]) -> None:
    """The record's meta: its format, version, stat names, tracks and hyper-parameter names."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        fail(f"not an nm_optim record (format {meta.get('format') if isinstance(meta, dict) else None!r})")
    version = meta.get("format_version", 1)  # absent: written before the field existed
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        fail(f"damaged record: its meta's 'format_version' is {version!r}, not an int >= 1")
    if version > FORMAT_VERSION:
        fail(f"record format version {version} is newer than this nm_optim reads ({FORMAT_VERSION}); upgrade nm_optim")
    if "stat_names" in meta and meta["stat_names"] != list(STAT_NAMES):
        fail(f"damaged record: its meta's 'stat_names' are {meta['stat_names']!r}, not nm_optim's {list(STAT_NAMES)}")
    for key in ("tracks", "hyper_names"):
        if not isinstance(meta.get(key), list):
            fail(f"damaged record: its meta has no {key!r} list")
    for i, t in enumerate(meta["tracks"]):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            fail(f"damaged record: its meta's 'tracks' entry {i} is not a track (a dict with a 'name')")
        groups = t.get("num_groups")
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 0:
            fail(f"damaged record: track {t['name']!r} has 'num_groups' {groups!r}, not an int >= 0")
        if "shape" in t or "axis" in t:  # what the recorder writes: the count follows from them
            shape, axis = t.get("shape"), t.get("axis")
            if axis not in AXES or not isinstance(shape, list) or not all(
                    isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
                fail(f"damaged record: track {t['name']!r} has 'shape' {shape!r} and 'axis' {axis!r}, not a "
                     f"shape and one of {AXES}")
            # "block": the columns per group of a "cols" track (absent before column blocks: 1).
            block = t.get("block", 1)
            if isinstance(block, bool) or not isinstance(block, int) or block < 1 or (
                    block != 1 and (axis != "cols" or len(shape) < 2 or shape[1] % block)):
                fail(f"damaged record: track {t['name']!r} has 'block' {block!r}, not a positive int that divides the "
                     f"columns of a 'cols' track (its axis is {axis!r}, its shape {shape})")
            expected = group_counts(shape, block)[AXES.index(axis)]
            if groups != expected:
                fail(f"damaged record: track {t['name']!r} has 'num_groups' {groups}, but its shape {shape}, "
                     f"axis {axis!r} and block {block} make {expected}")
        # "sums": the columns that hold sums (the others NaN); absent in records written before
        # tracks could reduce fewer than 9 (names.track_sums reads those as all 9).
        if "sums" in t and t["sums"] not in [list(s) for s in SUM_SETS]:
            fail(f"damaged record: track {t['name']!r} has 'sums' {t['sums']!r}, not one of the sets "
                 f"{[list(s) for s in SUM_SETS]}")
    names = meta["hyper_names"]
    if not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        fail(f"damaged record: its meta's 'hyper_names' {names!r} are not distinct names")
    every = meta.get("record_every", 1)
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        fail(f"damaged record: its meta's 'record_every' is {every!r}, not an int >= 1")


def _check_consistent(record: Record, fail: Callable[[str], NoReturn]) -> None:
    """Every array of the right dtype, one row per recorded step, steps increasing, and each
    track's stats its groups."""
    steps = record.steps
    if steps.ndim != 1 or steps.dtype.kind not in "iu":
        fail(f"damaged record: 'steps' is {steps.dtype} of shape {list(steps.shape)}, not a list of int steps")
    n = steps.shape[0]
    if n and (steps[0] < 0 or (np.diff(steps.astype(np.int64)) <= 0).any()):
        fail("damaged record: 'steps' are not increasing optimizer steps >= 0")
    for i, (t, s) in enumerate(zip(record.tracks, record.stats)):
        if s.dtype not in (np.float64, np.float32):
            fail(f"damaged record: 'stats_{i}' is {s.dtype}, not float64 or float32")
        groups = t.get("num_groups") if isinstance(t, dict) else None
        if s.shape != (n, groups, len(STAT_NAMES)):
            fail(f"arrays disagree: 'stats_{i}' has shape {list(s.shape)}, expected [{n}, {groups}, "
                 f"{len(STAT_NAMES)}] ({n} steps recorded)")
    expected = {"first": (n, len(record.tracks)), "skipped": (n,)}
    for key, shape in expected.items():
        a = getattr(record, key)
        if a.dtype != np.bool_:
            fail(f"damaged record: {key!r} is {a.dtype}, not bool")
        if a.shape != shape:
            fail(f"arrays disagree: {key!r} has shape {list(a.shape)}, expected {list(shape)}")
    for name, values in record.hyper.items():
        if values.dtype not in (np.float64, np.float32):
            fail(f"damaged record: 'hyper_{name}' is {values.dtype}, not float64")
        if values.ndim != 2 or values.shape[0] != n:
            fail(f"arrays disagree: 'hyper_{name}' has shape {list(values.shape)}, expected [{n}, param groups]")


# -- chunks: the unit the recorder collects, streams and reads back ------------------------------------------


@dataclass
class _Chunk:
    """Consecutive records on the host: stats per device [k, rows, 9] and the per-step values."""

    steps: np.ndarray  # [k] int64
    stats: list[np.ndarray]  # per device (the track table's order), [k, rows, 9]
    first: np.ndarray  # [k, tracks] bool
    skipped: np.ndarray  # [k] bool
    hyper: dict[str, list[list[float]]]  # name -> k rows, one value per param group (ragged)

    def __len__(self) -> int:
        return len(self.steps)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.steps, self.first, self.skipped, *self.stats))

    def copy(self) -> _Chunk:
        return _Chunk(self.steps.copy(), [np.array(s) for s in self.stats], self.first.copy(), self.skipped.copy(),
                      {k: list(v) for k, v in self.hyper.items()})

    def rows(self, lo: int) -> _Chunk:
        if lo == 0:
            return self
        return _Chunk(self.steps[lo:], [s[lo:] for s in self.stats], self.first[lo:], self.skipped[lo:],
                      {k: v[lo:] for k, v in self.hyper.items()})

    def index_entry(self) -> dict[str, Any]:
        """The chunk's line of a stream's index.jsonl (everything but the stats)."""
        return {
            "records": len(self),
            "steps": self.steps.tolist(),
            "skipped": np.flatnonzero(self.skipped).tolist(),
            "first": np.argwhere(self.first).tolist(),
            "hyper": {k: [list(map(float, row)) for row in v] for k, v in self.hyper.items()},
        }


def _chunk_from_meta(meta: dict[str, list], lo: int, hi: int, stats: list[np.ndarray],
                     host_scalars: dict[torch.device, np.ndarray], n_tracks: int) -> _Chunk:
    """Rows [lo, hi) of a chunk's host-side lists, with (device, column) places read from
    `host_scalars` (whose row 0 is row `lo`)."""
    k = hi - lo
    skipped = [_resolve(v, r, host_scalars) for r, v in enumerate(meta["skipped"][lo:hi])]
    return _Chunk(
        steps=np.asarray(meta["steps"][lo:hi], dtype=np.int64).reshape(k),
        stats=stats,
        first=np.asarray(meta["first"][lo:hi], dtype=bool).reshape(k, n_tracks),
        skipped=np.asarray(skipped, dtype=np.float64).astype(bool).reshape(k),
        hyper={name: [_resolve(v, r, host_scalars) for r, v in enumerate(meta[name][lo:hi])] for name in HYPER_NAMES},
    )


def _concat(chunks: Sequence[_Chunk], rows: Sequence[int], n_tracks: int) -> _Chunk:
    """One chunk of `chunks` in order (rows: each device's row count, for an empty result)."""
    if len(chunks) == 1:
        return chunks[0]
    if not chunks:
        return _Chunk(np.zeros(0, np.int64), [np.zeros((0, r, len(STAT_NAMES))) for r in rows],
                      np.zeros((0, n_tracks), bool), np.zeros(0, bool), {k: [] for k in HYPER_NAMES})
    return _Chunk(
        np.concatenate([c.steps for c in chunks]),
        [np.concatenate([c.stats[d] for c in chunks]) for d in range(len(chunks[0].stats))],
        np.concatenate([c.first for c in chunks]),
        np.concatenate([c.skipped for c in chunks]),
        {k: [row for c in chunks for row in c.hyper[k]] for k in HYPER_NAMES},
    )


def _resolve(x: Any, row: int, host_scalars: dict[torch.device, np.ndarray]) -> Any:
    """A recorded value, with (device, column) places read from the chunk's host copy."""
    if isinstance(x, list):
        return [_resolve(v, row, host_scalars) for v in x]
    if isinstance(x, tuple):
        return float(host_scalars[x[0]][row, x[1]])
    return x


def _ragged(rows: list[list[float]], n: int, empty_width: int = 0) -> np.ndarray:
    """[steps, groups] float64; steps recorded before add_param_group get NaN for new groups."""
    width = max((len(r) for r in rows), default=empty_width)
    out = np.full((n, width), np.nan)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out
