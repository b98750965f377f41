"""The recorder: every `record_every`-th step's statistics and the hyper-parameters that step used,
kept without stalling training, saved to one self-describing file.

On the device, each recorded step is one device-to-device copy of the stats tensor into a chunk
buffer of `chunk` steps; a full chunk goes to pinned host memory with one asynchronous copy, and
is collected (the only wait, on an event long since passed) when the next chunk is full or when
the record is read. Device memory is one chunk, whatever the run length. Host-known values (step,
momentum, first steps...) are kept on the host; lr and found_inf, which may live on the device,
are copied there without a sync.
"""

from __future__ import annotations

import json
import numbers
import os
import time
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
from torch import Tensor

from nm_optim._io import atomic_write
from nm_optim._version import __version__
from nm_optim.names import HYPER_NAMES, STAT_NAMES
from nm_optim.names import RECORD_FORMAT as FORMAT
from nm_optim.names import RECORD_FORMAT_VERSION as FORMAT_VERSION
from nm_optim.tracks import TrackTable, describe_value


@dataclass
class Record:
    """A recorded run: for each track, stats[steps, groups, 9]; for each recorded step the
    hyper-parameters of every param group, which tracks took their first momentum step, and
    whether GradScaler skipped it."""

    tracks: list[dict[str, Any]]
    steps: np.ndarray  # [S] int64, the optimizer step index (0-based)
    stats: list[np.ndarray]  # per track [S, groups, 9] float64
    hyper: dict[str, np.ndarray]  # name -> [S, n_param_groups] float64 (nesterov as 0/1)
    first: np.ndarray  # [S, n_tracks] bool: the track's param created its momentum buffer
    skipped: np.ndarray  # [S] bool: found_inf was set, nothing was stepped
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def stat_names(self) -> tuple[str, ...]:
        return STAT_NAMES

    def to_numpy(self) -> dict[str, np.ndarray]:
        """track name -> float64 array [steps, groups, 9] (columns: nm_optim.STAT_NAMES)."""
        return {t["name"]: s for t, s in zip(self.tracks, self.stats)}

    def __len__(self) -> int:
        return len(self.steps)

    def save(self, path: str | os.PathLike) -> Path:
        """Write one .npz file atomically: a temporary file in the same folder, fsync, rename.
        A crash leaves the old file (or none), never half of a new one."""
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


class RecordError(ValueError):
    """A file that is not a readable nm_optim record; the message names the file and what is
    wrong with it, in one line."""


# Errors numpy, zipfile and json raise on damaged or foreign files.
_READ_ERRORS = (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)


def load_record(path: str | os.PathLike) -> Record:
    """Read a file written by `Recorder.save` / `Record.save`. A missing, damaged or foreign
    file, or one whose arrays disagree, raises RecordError naming the file and the problem."""
    path = Path(path)

    def fail(what: str) -> NoReturn:
        raise RecordError(f"{path}: {what}")

    if not path.is_file():
        fail("no such file")
    try:
        z = np.load(path, allow_pickle=False)
    except _READ_ERRORS:
        fail("not an nm_optim record (not a .npz file, or a damaged one)")
    if not isinstance(z, np.lib.npyio.NpzFile):
        fail("a single array (.npy), not an nm_optim record (.npz)")
    with z:
        def read(key: str) -> np.ndarray:
            if key not in z.files:
                fail(f"damaged or incomplete record: no {key!r} entry" if "meta" in z.files
                     else "not an nm_optim record (no 'meta' entry)")
            try:
                return z[key]
            except _READ_ERRORS as e:
                fail(f"damaged record: entry {key!r} cannot be read ({type(e).__name__})")

        try:
            meta = json.loads(str(read("meta")))
        except json.JSONDecodeError:
            fail("damaged record: its 'meta' entry is not valid JSON")
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            fail(f"not an nm_optim record (format {meta.get('format') if isinstance(meta, dict) else None!r})")
        if meta.get("format_version", 0) > FORMAT_VERSION:
            fail(f"record format version {meta['format_version']} is newer than this nm_optim reads "
                 f"({FORMAT_VERSION}); upgrade nm_optim")
        for key in ("tracks", "hyper_names"):
            if not isinstance(meta.get(key), list):
                fail(f"damaged record: its meta has no {key!r} list")
        tracks = meta.pop("tracks")
        record = Record(
            tracks=tracks,
            steps=read("steps"),
            stats=[read(f"stats_{i}") for i in range(len(tracks))],
            hyper={name: read(f"hyper_{name}") for name in meta.pop("hyper_names")},
            first=read("first"),
            skipped=read("skipped"),
            meta=meta,
        )
    _check_consistent(record, fail)
    return record


def _check_consistent(record: Record, fail: Callable[[str], NoReturn]) -> None:
    """Every array has one row per recorded step, and each track's stats its groups."""
    n = record.steps.shape[0] if record.steps.ndim == 1 else fail(f"'steps' has shape {record.steps.shape}")
    for i, (t, s) in enumerate(zip(record.tracks, record.stats)):
        groups = t.get("num_groups") if isinstance(t, dict) else None
        if s.shape != (n, groups, len(STAT_NAMES)):
            fail(f"arrays disagree: 'stats_{i}' has shape {list(s.shape)}, expected [{n}, {groups}, "
                 f"{len(STAT_NAMES)}] ({n} steps recorded)")
    expected = {"first": (n, len(record.tracks)), "skipped": (n,)}
    for key, shape in expected.items():
        if getattr(record, key).shape != shape:
            fail(f"arrays disagree: {key!r} has shape {list(getattr(record, key).shape)}, expected {list(shape)}")
    for name, values in record.hyper.items():
        if values.ndim != 2 or values.shape[0] != n:
            fail(f"arrays disagree: 'hyper_{name}' has shape {list(values.shape)}, expected [{n}, param groups]")


class Recorder:
    """Attached to an nm_optim.SGD with tracks as `opt.recorder`.

    It reads the optimizer through what it is given: the track table (whose stats tensors the
    kernels write), the current param groups (for the hyper-parameters of each step) and a
    function giving extra JSON-able metadata for the record (the symmetries' descriptions)."""

    def __init__(self, tracks: TrackTable, param_groups: Callable[[], list[dict[str, Any]]], record_every: int = 1,
                 chunk: int = 256, meta: Callable[[], dict[str, Any]] | None = None) -> None:
        record_every = _positive_int("record_every", record_every)
        chunk = _positive_int("chunk", chunk)
        self._tracks = tracks
        self._param_groups = param_groups
        self._meta = meta or dict
        self.record_every = record_every
        self.chunk = chunk
        self.enabled = True
        self._step = 0
        self._slot = 0
        # Device side, one chunk per device: the stats, and the per-step scalars that may be
        # tensors (a tensor lr or weight_decay, GradScaler's found_inf).
        self._stats_buf: dict[torch.device, Tensor] = {}
        self._scalar_buf: dict[torch.device, Tensor] = {}
        self._chunk_meta = self._new_meta()
        self._in_flight: list[tuple[dict, dict, Any, dict]] = []
        # Host side: the record so far.
        self._host_stats: dict[torch.device, list[np.ndarray]] = {}
        self._host_meta = self._new_meta()

    # -- called by SGD.step --------------------------------------------------------------------
    def after_step(self, first_params: set[int], found_inf: Tensor | None) -> None:
        step = self._step
        self._step += 1
        if not self.enabled or step % self.record_every:
            return
        table = self._tracks
        slot = self._slot
        for device in table.devices():
            stats = table.stats(device)
            buf = self._stats_buf.get(device)
            if buf is None:
                buf = self._stats_buf[device] = torch.empty((self.chunk, *stats.shape), dtype=torch.float64, device=device)
            buf[slot].copy_(stats, non_blocking=True)
        m = self._chunk_meta
        m["steps"].append(step)
        m["first"].append([id(t.param) in first_params for t in table.tracks])
        m["skipped"].append(self._scalar(found_inf, slot, 0) if found_inf is not None else 0.0)
        groups = self._param_groups()
        for hi, name in enumerate(HYPER_NAMES):
            m[name].append([self._scalar(g[name], slot, 1 + hi * len(groups) + gi) for gi, g in enumerate(groups)])
        self._slot += 1
        if self._slot == self.chunk:
            self._flush()

    def _scalar(self, x: Any, slot: int, column: int) -> float | tuple[torch.device, int]:
        """A host float, or where on the device the value was copied (no sync)."""
        if not isinstance(x, Tensor):
            return float(x)
        buf = self._scalar_buf.get(x.device)
        width = 1 + len(HYPER_NAMES) * len(self._param_groups())
        if buf is None or buf.shape[1] < width:
            old = buf
            buf = self._scalar_buf[x.device] = torch.full((self.chunk, width), float("nan"), dtype=torch.float64, device=x.device)
            if old is not None:
                buf[:, : old.shape[1]].copy_(old)
        value = x.detach().reshape(-1)[0]
        if column == 0:  # found_inf: the step was skipped
            value = value.ne(0)
        buf[slot, column].copy_(value, non_blocking=True)
        return (x.device, column)

    # -- reading ---------------------------------------------------------------------------
    def snapshot(self) -> Record:
        """Everything recorded so far (waits for the copies in flight)."""
        if self._slot:
            self._flush()
        self._collect(keep=0)
        # No check of the params' current shapes: SGD.step refuses a tracked param whose shape
        # changed before recording it, so everything here was recorded with the tracks' shapes
        # (and the history stays saveable after such a change).
        table = self._tracks
        meta = self._host_meta
        n = len(meta["steps"])
        whole = {d: np.concatenate(c) for d, c in self._host_stats.items() if c}
        stats = []
        for t in table.tracks:
            full = whole.get(t.device)
            stats.append(
                np.zeros((n, t.num_groups, len(STAT_NAMES))) if full is None
                else np.ascontiguousarray(full[:, t.row : t.row + t.num_groups])
            )
        groups = self._group_index()
        tracks = [dict(t.describe(), param_group=groups.get(id(t.param), -1)) for t in table.tracks]
        return Record(
            tracks=tracks,
            steps=np.asarray(meta["steps"], dtype=np.int64),
            stats=stats,
            hyper={k: _ragged(meta[k], n) for k in HYPER_NAMES},
            first=np.asarray(meta["first"], dtype=bool).reshape(n, len(tracks)),
            skipped=np.asarray(meta["skipped"], dtype=np.float64).astype(bool).reshape(n),
            meta=dict(
                nm_optim=__version__,
                torch=torch.__version__,
                record_every=self.record_every,
                saved_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                **self._meta(),
            ),
        )

    def to_numpy(self) -> dict[str, np.ndarray]:
        """track name -> float64 array [steps, groups, 9]."""
        return self.snapshot().to_numpy()

    def save(self, path: str | os.PathLike) -> Path:
        """Save everything recorded so far to one .npz file, atomically (see Record.save)."""
        return self.snapshot().save(path)

    def __len__(self) -> int:
        return len(self._host_meta["steps"]) + sum(len(m["steps"]) for *_, m in self._in_flight) + self._slot

    # -- checkpointing -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything recorded so far and the step counter, for a training checkpoint: a
        recorder that loads it (on an optimizer with the same tracks) continues so that its
        record equals that of a run never interrupted.

        Waits for the copies in flight (as :meth:`snapshot` does). Tensors and plain Python
        values only, so ``torch.load(..., weights_only=True)`` reads it back."""
        if self._slot:
            self._flush()
        self._collect(keep=0)
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "record_every": self.record_every,
            "enabled": self.enabled,
            "step": self._step,
            "tracks": [t.name for t in self._tracks.tracks],
            "stats": {
                str(d): torch.from_numpy(np.concatenate(c)) for d, c in self._host_stats.items() if c
            },
            "meta": {k: list(v) for k, v in self._host_meta.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved, replacing anything recorded here so far."""
        if state.get("format") != FORMAT:
            raise ValueError(f"not an nm_optim recorder state (format {state.get('format')!r})")
        tracks = [t.name for t in self._tracks.tracks]
        if list(state["tracks"]) != tracks:
            raise ValueError(
                f"recorder state has tracks {list(state['tracks'])}, but this optimizer tracks {tracks}"
            )
        rows: dict[str, int] = {}
        for t in self._tracks.tracks:
            rows[str(t.device)] = max(rows.get(str(t.device), 0), t.row + t.num_groups)
        saved = dict(state["stats"])
        if set(saved) != set(rows) and len(saved) == len(rows) == 1:
            # A run checkpointed on one device and resumed on another (cpu -> cuda, say).
            saved = {next(iter(rows)): next(iter(saved.values()))}
        for device, stats in saved.items():
            if stats.dim() != 3 or device not in rows or stats.shape[1] < rows[device]:
                raise ValueError(f"recorder state: stats for {device} of shape {list(stats.shape)} do not fit these tracks")
        self._collect(keep=0)
        self.record_every = int(state["record_every"])
        self.enabled = bool(state["enabled"])
        self._step = int(state["step"])
        self._slot = 0
        self._chunk_meta = self._new_meta()
        self._host_stats = {
            torch.device(d): [s.detach().cpu().numpy().astype(np.float64, copy=True)] for d, s in saved.items()
        }
        self._host_meta = {k: list(state["meta"][k]) for k in self._new_meta()}

    @property
    def device_bytes(self) -> int:
        """Device memory the recorder holds: one chunk per device, whatever the run length."""
        bufs = [*self._stats_buf.values(), *self._scalar_buf.values()]
        return sum(b.numel() * b.element_size() for b in bufs)

    # -- internals -------------------------------------------------------------------------
    @staticmethod
    def _new_meta() -> dict[str, list]:
        return {k: [] for k in ("steps", "first", "skipped", *HYPER_NAMES)}

    def _flush(self) -> None:
        """Start the device-to-host copies of the filled part of the chunk (no wait)."""
        k = self._slot
        stats = {d: _to_host_async(b[:k]) for d, b in self._stats_buf.items()}
        scalars = {d: _to_host_async(b[:k]) for d, b in self._scalar_buf.items()}
        event = None
        cuda = [d for d in (*stats, *scalars) if d.type == "cuda"]
        if cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(cuda[0]))
        self._in_flight.append((stats, scalars, event, self._chunk_meta))
        self._chunk_meta = self._new_meta()
        self._slot = 0
        self._collect(keep=1)

    def _collect(self, keep: int) -> None:
        """Move finished chunks into the host record, leaving `keep` chunks in flight (the wait
        is on copies issued a whole chunk of steps earlier)."""
        while len(self._in_flight) > keep:
            stats, scalars, event, meta = self._in_flight.pop(0)
            if event is not None:
                event.synchronize()
            for device, t in stats.items():
                self._host_stats.setdefault(device, []).append(t.numpy().copy())
            host_scalars = {d: t.numpy() for d, t in scalars.items()}
            for name, values in meta.items():
                self._host_meta[name].extend(_resolve(v, row, host_scalars) for row, v in enumerate(values))

    def _group_index(self) -> dict[int, int]:
        return {id(p): gi for gi, g in enumerate(self._param_groups()) for p in g["params"]}


def _positive_int(name: str, value: Any) -> int:
    """`value` as an int: any integral type (numpy's too), but not a bool; at least 1."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int (any integral type but bool), got "
                        f"{type(value).__name__} {describe_value(value)}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {int(value)}")
    return int(value)


def _resolve(x: Any, row: int, host_scalars: dict[torch.device, np.ndarray]) -> Any:
    """A recorded value, with (device, column) places read from the chunk's host copy."""
    if isinstance(x, list):
        return [_resolve(v, row, host_scalars) for v in x]
    if isinstance(x, tuple):
        return float(host_scalars[x[0]][row, x[1]])
    return x


def _to_host_async(t: Tensor) -> Tensor:
    if t.device.type == "cuda":
        dst = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        dst.copy_(t, non_blocking=True)
        return dst
    return t.clone()


def _ragged(rows: list[list[float]], n: int) -> np.ndarray:
    """[steps, groups] float64; steps recorded before add_param_group get NaN for new groups."""
    width = max((len(r) for r in rows), default=0)
    out = np.full((n, width), np.nan)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out
