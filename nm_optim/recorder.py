"""The recorder: every `record_every`-th step's statistics and the hyper-parameters that step used,
kept without stalling training, in memory or streamed to disk, and read back whole or live.

On the device, each recorded step is one device-to-device copy of the stats tensor into a chunk
buffer of `chunk` steps; a full chunk goes to pinned host memory with one asynchronous copy, and
is collected (the only wait, on an event long since passed) when the next chunk is full or when
the record is read. Device memory is one chunk, whatever the run length. Host-known values (step,
momentum, first steps...) are kept on the host; lr and found_inf, which may live on the device,
are copied there without a sync.

Where the collected chunks go:

- in memory (the default): the whole history stays in host memory; ``Recorder.save(path)``
  writes it as one ``.npz`` file (see :class:`Record`). Fine for small runs.
- streamed (``recorder.stream_to(folder)``): every collected chunk is appended to a *record
  stream*, a folder read back by :func:`load_record` with memory maps; the host keeps only the
  last `keep_records` records (for cheap live reads), whatever the run length. A checkpoint
  (:meth:`Recorder.state_dict`) holds the stream's position, not its contents.

A record stream (docs/architecture.md, "The record")::

    meta.json       the record's meta (as the .npz's, with "stream": the layout below), atomic,
                    its last key "crc32" (nm_optim/record/format.py, "checksums")
    stats-K.bin     device K's statistics: raw, C order, [records, rows_K, 9] of the stream dtype
                    (float64, or float32), appended chunk by chunk; a track is rows
                    [row, row + num_groups) of its device's file
    index.jsonl     one JSON line per chunk, appended after the chunk's statistics: records,
                    steps, skipped (indices), first ([index, track] pairs), hyper (rows per name),
                    stats_crc32 (per device, of the chunk's stats bytes) and last "crc32" (the line's)

A chunk exists once its index line is complete: a crash (even mid-write) loses at most the chunk
being written, never an earlier one; bytes past the last complete line are ignored when reading
and overwritten when the stream is reopened to continue (the stats files are never shortened:
see RecordStream._cut). Appends are fsync'ed by default (data, then
index), so the same holds for a power loss. By default a writer thread appends the chunks
(RecordStream), so training does not wait for the disk unless two chunks are already queued.
Every recorded step is on disk once the recorder is closed: ``recorder.close()``, the end of a
``with recorder:`` block, the recorder's garbage collection (soon after), and any normal end of the process
(interpreter shutdown, sys.exit, an uncaught exception, app.distributed.end_process) write the
chunk being filled and what was queued; only a killed process (or a bare os._exit) loses what
was queued (at most two chunks) and the chunk being filled.

float32 streams halve the disk and page-cache footprint but round every stored sum to 24 bits:
a relative error of up to 2**-24 ~ 6e-8 per stored sum (exactly: the float32 nearest the float64
sum). The exact laws (nm_optim.theory) compare sums of consecutive records, so they then hold to
~1e-7 of the terms' magnitudes: below the float32 arithmetic of the update itself for float32
params (~1e-6, the tolerance of the one-step identities), but it dominates for float64 params
(~1e-15). A quantity that cancels (a rescale's |θ_A1|² - |θ_A2|², a translation's Σθ near 0)
loses 6e-8 of the magnitudes that cancel, not of the result. Keep float64 to study rounding-level
effects.
"""
from __future__ import annotations

import numbers
import os
import secrets
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from nm_optim import _lazy
from nm_optim._version import __version__
from nm_optim.names import HYPER_NAMES, PRODUCT_SUMS, STAT_NAMES
from nm_optim.names import RECORD_FORMAT as FORMAT
from nm_optim.names import RECORD_FORMAT_VERSION as FORMAT_VERSION
from nm_optim.tracks import Track, TrackTable, describe_value
from nm_optim.record.format import (_META_KEYS, STREAM_DTYPES, Record, _Chunk, _chunk_from_meta,
                                    _concat, _ragged, _stats_file)
from nm_optim.record.stream import _ORPHANS as _orphans
from nm_optim.record.stream import RecordStream, _StreamReader, close_at_exit, close_orphans, superseded


class Recorder:
    """Attached to an nm_optim.SGD with tracks as `opt.recorder`.

    It reads the optimizer through what it is given: the track table (whose stats tensors the
    kernels write), the current param groups (for the hyper-parameters of each step) and a
    function giving extra JSON-able metadata for the record (the symmetries' descriptions).

    Reading: :meth:`snapshot` (everything; O(history)), :meth:`latest` / :meth:`since` (the last
    records; O(records returned), whatever the history), :attr:`steps_done`, ``len(recorder)``.
    Storing: in host memory, or streamed to disk with :meth:`stream_to` (bounded host memory)."""

    def __init__(self, tracks: TrackTable, param_groups: Callable[[], list[dict[str, Any]]], record_every: int = 1,
                 chunk: int = 256, meta: Callable[[], dict[str, Any]] | None = None) -> None:
        record_every = _positive_int("record_every", record_every)
        chunk = _positive_int("chunk", chunk)
        self._tracks = tracks
        self._param_groups = param_groups
        self._meta = meta or dict
        self.record_every = record_every
        self.chunk = chunk
        # Streaming: the newest records kept on the host for live reads (latest / since), besides
        # the chunk being filled; older ones are read from the stream.
        self.keep_records = 64
        self.enabled = True
        self._step = 0
        self._slot = 0
        # Device side, one chunk per device: the stats, and the per-step scalars that may be
        # tensors (a tensor lr or weight_decay, GradScaler's found_inf).
        self._stats_buf: dict[torch.device, Tensor] = {}
        self._scalar_buf: dict[torch.device, Tensor] = {}
        self._chunk_meta = self._new_meta()
        self._in_flight: list[tuple[dict, dict, Any, dict]] = []
        # Host side: collected chunks (all of them in memory; the newest keep_records when streaming).
        self._chunks: list[_Chunk] = []
        self._collected = 0  # records collected: in self._chunks, and before them in the stream
        self._stream: RecordStream | None = None
        self._reads: Counter[str] = Counter()  # work done by latest / since (tests count it)

    # -- called by SGD.step --------------------------------------------------------------------
    # Host bookkeeping (counters, lists, chunk flushes) that changes every step: under
    # torch.compile it runs eagerly, so the compiled step neither guards on it nor recompiles.
    @_lazy.disable
    def after_step(self, first_params: set[int], found_inf: Tensor | None) -> None:
        groups = self._param_groups()
        if _creating_torch_state(groups):
            return  # not a step of the run: neither recorded nor counted
        step = self._step
        self._step += 1
        if _orphans:
            close_orphans()
        if self._in_flight:
            self._collect_ready()
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
        # Most steps create no momentum buffer: they skip the loop over the 1000s of tracks.
        m["first"].append([id(t.param) in first_params for t in table.tracks] if first_params
                          else [False] * len(table.tracks))
        m["skipped"].append(self._scalar(found_inf, slot, 0) if found_inf is not None else 0.0)
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
    @property
    def steps_done(self) -> int:
        """Optimizer steps this recorder has seen (recorded or not; skipped ones included)."""
        return self._step

    def __len__(self) -> int:
        """Records so far (one per record_every steps while enabled)."""
        return self._collected + sum(len(m["steps"]) for *_, m in self._in_flight) + self._slot

    def snapshot(self) -> Record:
        """Everything recorded so far (waits for the copies in flight). O(history): in memory,
        a copy of it all; streamed, the stream read back with memory maps (the partial chunk is
        written first). For watching a run, use :meth:`latest` or :meth:`since`."""
        self._sync()
        # No check of the params' current shapes: SGD.step refuses a tracked param whose shape
        # changed before recording it, so everything here was recorded with the tracks' shapes
        # (and the history stays saveable after such a change).
        if self._stream is not None:
            whole = _StreamReader(self._stream.path).chunk()
        else:
            whole = _concat(self._chunks, self._rows(), len(self._tracks))
        return self._record(whole)

    def latest(self, k: int = 1) -> Record:
        """The last `k` records (fewer if fewer were recorded), without reading the rest: the
        cost is O(k), whatever the history. Synchronises with the device (the partial chunk is
        read where it is, not flushed)."""
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 0:
            raise ValueError(f"latest(k) needs an int k >= 0, got {describe_value(k)}")
        need = [int(k)]

        def take(steps: np.ndarray) -> tuple[int, bool]:
            lo = max(len(steps) - need[0], 0)
            need[0] -= len(steps) - lo
            return lo, need[0] == 0

        return self._record(self._tail(take))

    def since(self, step: int) -> Record:
        """The records of optimizer steps >= `step` (0-based, as in Record.steps), without
        reading older ones: O(records returned), whatever the history. ``since(last + 1)``
        after reading up to step `last` gives exactly the new records."""
        if isinstance(step, bool) or not isinstance(step, numbers.Integral):
            raise TypeError(f"since(step) needs an int step, got {describe_value(step)}")

        def take(steps: np.ndarray) -> tuple[int, bool]:
            lo = int(np.searchsorted(steps, step, side="left"))
            return lo, lo > 0

        return self._record(self._tail(take))

    def to_numpy(self) -> dict[str, np.ndarray]:
        """track name -> array [steps, groups, 9]."""
        return self.snapshot().to_numpy()

    def save(self, path: str | os.PathLike) -> Path:
        """Save everything recorded so far to one .npz file, atomically (see Record.save)."""
        return self.snapshot().save(path)

    # -- streaming ---------------------------------------------------------------------------
    def stream_to(self, path: str | os.PathLike, *, dtype: str = "float64", overwrite: bool = False,
                  fsync: bool = True, background: bool = True) -> Path:
        """From now on append every collected chunk to the record stream folder `path` (created;
        an existing stream there is replaced only with `overwrite`), and keep only the last
        `keep_records` records in host memory (besides the chunk being filled). What was
        recorded so far is written first.

        dtype: "float64" (exact) or "float32" (half the bytes; each stored sum rounded to a
        relative 2**-24 ~ 6e-8: see the module docstring for what that costs the laws).
        fsync: make every chunk durable before its index line (a power loss loses at most the
        last chunk); without it only a process crash is covered.
        background: write chunks in a writer thread (RecordStream), so training does not wait
        for the disk (one more chunk of host memory); False: in the training thread.

        Read it back with ``nm_optim.load_record(path)`` (memory-mapped). Returns the path."""
        if self._stream is not None:
            raise RuntimeError(f"this recorder already streams to {self._stream.path}")
        name = str(dtype).removeprefix("torch.")
        if name not in STREAM_DTYPES:
            raise ValueError(f"dtype must be one of {STREAM_DTYPES}, got {describe_value(dtype)}")
        self._sync()
        stream = RecordStream.create(path, self._stream_meta(name), overwrite=overwrite, fsync=fsync,
                                     background=background)
        for c in self._chunks:
            stream.append(c)
        self._stream = stream
        close_at_exit(self)
        self._trim()
        return stream.path

    def close(self) -> None:
        """Write every record still held (the partial chunk, the chunks in flight or queued) to
        the stream and wait until it is on disk. Called for you when the process ends normally
        (interpreter shutdown, sys.exit, an uncaught exception, app.distributed.end_process), after
        the recorder is garbage-collected (at the next step of any recorder, stream created,
        opened or loaded, or the exit), and at the end of a ``with recorder:`` block; only a
        crash (a killed process, os._exit without end_process) loses records. Recording goes on
        if the run does (the next chunks are written in the training thread); calling it again
        writes only what was recorded since. In memory (no stream) there is nothing to write."""
        stream = self._stream
        if stream is None or superseded(stream):
            return  # in memory; or the folder was since replaced or reopened (a resume) here
        # Written in this thread: at interpreter shutdown no new writer thread may start.
        stream.drain()
        stream.background = False
        self._sync()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # `del opt` (the recorder collected with its optimizer): its last records are written at
        # the next safe point (the next step of any recorder, a stream created, opened or loaded,
        # the process's end), not here: the garbage collector may run in the middle of anything.
        if getattr(self, "_stream", None) is not None and (self._slot or self._in_flight) \
                and not superseded(self._stream):
            _orphans.append(self)  # kept alive until then

    def _release_stream(self) -> None:
        """Drop the stream (a collected recorder, its last records written: close_orphans)."""
        self._stream = None

    @property
    def stream(self) -> RecordStream | None:
        """The record stream this recorder appends to (None: in memory)."""
        return self._stream

    @property
    def host_bytes(self) -> int:
        """Host memory the recorder holds for records: all of them in memory, at most
        keep_records records when streaming, plus up to two chunks queued for the writer thread
        (and, on a GPU, a chunk whose copy is in flight), whatever the run length. The chunk being filled is :attr:`device_bytes` (host memory too
        on the CPU)."""
        flight = sum(t.numel() * t.element_size() for s, sc, _, _ in self._in_flight for t in (*s.values(), *sc.values()))
        queued = self._stream.queued_bytes if self._stream is not None else 0
        return sum(c.nbytes for c in self._chunks) + flight + queued

    @property
    def device_bytes(self) -> int:
        """Device memory the recorder holds: one chunk per device, whatever the run length."""
        bufs = [*self._stats_buf.values(), *self._scalar_buf.values()]
        return sum(b.numel() * b.element_size() for b in bufs)

    # -- checkpointing -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything recorded so far and the step counter, for a training checkpoint: a
        recorder that loads it (on an optimizer with the same tracks) continues so that its
        record equals that of a run never interrupted.

        In memory: the records themselves. Streaming: the stream's path and length ("stream"),
        after writing and fsync'ing everything recorded, and no records: loading it cuts the
        stream back to that length. Waits for the copies in flight (as :meth:`snapshot` does).
        Tensors and plain Python values only, so ``torch.load(..., weights_only=True)`` reads
        it back.

        Its keys are the same whatever was recorded, and whether or not the recorder streams:
        "stream" always ({"path": None, ...} in memory) and "stats" a tuple of one tensor per
        device ([records, rows, 9], in the order of "devices"; no records when streaming), which
        torch.distributed.checkpoint keeps whole. So the recorder is a
        torch.distributed.checkpoint.stateful.Stateful as it is: ``dcp.load`` loads in place
        into the state_dict of a fresh recorder, whose tensors have no records yet, then hands
        it to :meth:`load_state_dict`."""
        self._sync()
        state: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "record_every": self.record_every,
            "enabled": self.enabled,
            "step": self._step,
            "tracks": [t.name for t in self._tracks.tracks],
        }
        if self._stream is not None:
            self._stream.sync()
            state["stream"] = {"path": str(self._stream.path.resolve()), "records": self._stream.records,
                               "dtype": self._stream.dtype.name, "id": self._stream.id}
            chunks: list[_Chunk] = []
        else:
            state["stream"] = {"path": None, "records": 0, "dtype": None, "id": None}
            chunks = self._chunks
        whole = _concat(chunks, self._rows(), len(self._tracks))
        state["devices"] = [str(d) for d in self._tracks.devices()]
        state["stats"] = tuple(torch.from_numpy(np.ascontiguousarray(s)) for s in whole.stats)
        state["meta"] = {
            "steps": whole.steps.tolist(),
            "first": whole.first.tolist(),
            "skipped": whole.skipped.astype(np.float64).tolist(),
            **{k: [list(r) for r in whole.hyper[k]] for k in HYPER_NAMES},
        }
        return state

    def load_state_dict(self, state: dict[str, Any], stream: str | os.PathLike | None = None) -> None:
        """Restore what :meth:`state_dict` saved, replacing anything recorded here so far.

        A state that refers to a stream continues that stream (at `stream` if given: the run's
        folder may have moved), cut back to the state's length: records written after the
        checkpoint are dropped, so the record equals an uninterrupted run's. A state with the
        records themselves, loaded into a streaming recorder, restarts its stream with them."""
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
        stats = state["stats"]
        # a dict {device: stats} is what nm_optim wrote before "stats" became a tuple
        saved = dict(stats) if isinstance(stats, dict) else dict(zip(state["devices"], stats, strict=True))
        n = len(state["meta"]["steps"])
        if not n:  # no records (a stream's position, or nothing recorded): no stats to fit
            saved = {d: s for d, s in saved.items() if s.shape[0]}
        if set(saved) != set(rows) and len(saved) == len(rows) == 1:
            # A run checkpointed on one device and resumed on another (cpu -> cuda, say).
            saved = {next(iter(rows)): next(iter(saved.values()))}
        for device, stats in saved.items():
            if stats.dim() != 3 or device not in rows or stats.shape[1] != rows[device]:
                raise ValueError(
                    f"recorder state: stats for {device} of shape {list(stats.shape)} do not fit these tracks, whose "
                    f"groups take {rows.get(device, 0)} rows there ({_groups_of(self._tracks.tracks)}). A 'cols' "
                    "track with a column block has fewer groups (nm_optim/tracks.py): a run recorded with one "
                    "group per column continues with track=[(param, 'cols')], which keeps them")
        meta = {k: list(state["meta"][k]) for k in _META_KEYS}
        n = len(meta["steps"])
        if any(len(v) != n for v in meta.values()) or any(s.shape[0] != n for s in saved.values()):
            raise ValueError("recorder state: its lists and stats hold different numbers of records")
        if n and set(saved) != set(rows):
            raise ValueError(f"recorder state: stats for {sorted(saved)}, these tracks live on {sorted(rows)}")
        tail = None
        if n:
            host = [saved[str(d)].detach().cpu().numpy().astype(np.float64, copy=True) for d in self._tracks.devices()]
            self._check_saved_sums(host)
            tail = _chunk_from_meta(meta, 0, n, host, {}, len(tracks))
        link = state.get("stream")
        if link is not None and link.get("path") is None:
            link = None  # the records are in the state itself
        opened = None
        if link is not None:
            where = Path(stream) if stream is not None else Path(link["path"])
            opened = self._stream if self._stream is not None and self._stream.path.resolve() == where.resolve() \
                else RecordStream.open(where, background=True)
            if opened.track_names != tracks:
                raise ValueError(f"record stream {where} has tracks {opened.track_names}, this optimizer tracks {tracks}")
            # The stream's meta says which sums its tracks hold; the records appended now must hold
            # them too (a track reducing fewer would leave NaN where the meta promises sums).
            for t, have in zip(self._tracks.tracks, opened.track_sums):
                lost = [n for n in have if n not in t.sums]
                if lost:
                    raise ValueError(
                        f"record stream {where}: track {t.name!r} holds the sums {list(have)}, this optimizer's "
                        f"reduces {list(t.sums)} (not {lost}); ask for them to continue it: "
                        f"track=[(param, {t.axis!r}, {list(have)})]")
            for t, groups in zip(self._tracks.tracks, opened.track_groups):
                if groups != t.num_groups:
                    raise ValueError(
                        f"record stream {where}: track {t.name!r} holds {groups} groups, this optimizer's "
                        f"{t.num_groups} (column block {t.block}); a stream recorded with one group per column "
                        f"continues with track=[(param, {t.axis!r})], which keeps them (nm_optim/tracks.py)")
            if link.get("id") and opened.id != link["id"]:
                raise ValueError(f"record stream {where} is not the one of this state (another run replaced it: "
                                 f"id {opened.id}, the state's {link['id']})")
            records = int(link["records"])
            if opened.records < records:
                raise ValueError(f"record stream {where} holds {opened.records} records, fewer than the {records} "
                                 "of the checkpoint (was it cut, or written by another run?)")
        # Everything checked: now change state.
        self.record_every = int(state["record_every"])
        self.enabled = bool(state["enabled"])
        self._step = int(state["step"])
        self._slot = 0
        self._chunk_meta = self._new_meta()
        self._in_flight = []
        self._chunks = []
        if opened is not None:
            opened.truncate(int(link["records"]))
            self._stream = opened
            close_at_exit(self)
        elif self._stream is not None:
            self._stream.truncate(0)
        self._collected = self._stream.records if self._stream is not None else 0
        if tail is not None:
            self._add(tail)

    def _check_saved_sums(self, host: list[np.ndarray]) -> None:
        """ValueError if the records of an in-memory state lack a sum this optimizer's tracks
        hold (a run whose tracks reduced only the products, resumed by tracks reducing all 9):
        the record's meta would promise sums that its first records hold as NaN. The state
        carries no "sums" (a key dcp.load would miss in older checkpoints), so the records tell:
        Σp is NaN in every record of a track while Σp² is finite in one (the data cannot do that:
        a p that makes Σp NaN or inf makes Σp² so too) where the track reduced only the products."""
        index = {d: k for k, d in enumerate(self._tracks.devices())}
        p, pp = STAT_NAMES.index("p"), STAT_NAMES.index("pp")
        for t in self._tracks.tracks:
            if "p" not in t.sums:
                continue
            s = host[index[t.device]][:, t.row : t.row + t.num_groups]
            if np.isfinite(s[..., pp]).any() and np.isnan(s[..., p]).all():
                lost = [n for n in t.sums if n not in PRODUCT_SUMS]
                raise ValueError(
                    f"recorder state: track {t.name!r} holds no {lost} in any of its records, which this optimizer's "
                    f"track reduces ({list(t.sums)}): the run was recorded with fewer sums; resume it with the "
                    f"sums it recorded (track=[(param, {t.axis!r}, sums)]; symmetries= ask for their laws' sums)")

    # -- internals -------------------------------------------------------------------------
    @staticmethod
    def _new_meta() -> dict[str, list]:
        return {k: [] for k in _META_KEYS}

    def _rows(self) -> list[int]:
        """Rows of each device's stats tensor, in the track table's device order."""
        return [self._tracks.stats(d).shape[0] for d in self._tracks.devices()]

    def _sync(self) -> None:
        """Flush the partial chunk and collect every chunk in flight (streaming: and write it)."""
        if self._slot:
            self._flush()
        self._collect(keep=0)
        if self._stream is not None:
            self._stream.drain()

    def _flush(self) -> None:
        """Start the device-to-host copies of the filled part of the chunk (no wait)."""
        k = self._slot
        # Streaming on the CPU, the chunk is written from the buffer itself, before the next step
        # can overwrite it (_collect_ready below): no copy of it.
        direct = self._stream is not None and not self._stream.background
        stats = {d: b[:k] if direct and d.type == "cpu" else _to_host_async(b[:k]) for d, b in self._stats_buf.items()}
        scalars = {d: _to_host_async(b[:k]) for d, b in self._scalar_buf.items()}
        event = None
        cuda = [d for d in (*stats, *scalars) if d.type == "cuda"]
        if cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(cuda[0]))
        self._in_flight.append((stats, scalars, event, self._chunk_meta))
        self._chunk_meta = self._new_meta()
        self._slot = 0
        self._collect_ready()
        self._collect(keep=1)

    def _collect_ready(self) -> None:
        """Collect the chunks whose copies have finished (on the CPU: all, at once), so a
        stream is at most the chunk being filled behind the run (plus one whose copy is still
        in flight on a GPU)."""
        while self._in_flight and (self._in_flight[0][2] is None or self._in_flight[0][2].query()):
            self._collect(keep=len(self._in_flight) - 1)

    def _collect(self, keep: int) -> None:
        """Move finished chunks into the host record (or the stream), leaving `keep` chunks in
        flight (the wait is on copies issued a whole chunk of steps earlier)."""
        while len(self._in_flight) > keep:
            stats, scalars, event, meta = self._in_flight.pop(0)
            if event is not None:
                event.synchronize()
            host = [_host_numpy(stats[d]) for d in self._tracks.devices()]
            host_scalars = {d: t.numpy() for d, t in scalars.items()}
            self._add(_chunk_from_meta(meta, 0, len(meta["steps"]), host, host_scalars, len(self._tracks)))

    def _add(self, chunk: _Chunk) -> None:
        self._collected += len(chunk)
        if self._stream is None:
            self._chunks.append(chunk)
            return
        self._stream.append(chunk)
        keep = min(len(chunk), self.keep_records)
        if keep < len(chunk):
            self._chunks = []  # the kept records stay consecutive
        if keep:
            # a copy: the chunk may be a view of the device buffer, and its older rows are freed
            self._chunks.append(chunk.rows(len(chunk) - keep).copy())
        self._trim()

    def _trim(self) -> None:
        """Streaming: drop the oldest kept chunks beyond keep_records records."""
        if self._stream is None:
            return
        total = sum(len(c) for c in self._chunks)
        while self._chunks and total - len(self._chunks[0]) >= self.keep_records:
            total -= len(self._chunks.pop(0))
        if self.keep_records == 0:
            self._chunks = []

    def _segments(self) -> Iterator[tuple[np.ndarray, Callable[[int], _Chunk]]]:
        """The records, newest first, as (steps, read rows lo: of them) per segment: the partial
        chunk on the device, the chunks in flight, the collected ones, then (streaming) the
        stream's older records on disk."""
        n_tracks = len(self._tracks)
        m = self._chunk_meta
        k = self._slot

        def device_rows(lo: int) -> _Chunk:
            # a copy: on the CPU the buffer itself is the device chunk, overwritten by later steps
            stats = [self._stats_buf[d][lo:k].to("cpu", copy=True).numpy() for d in self._tracks.devices()]
            scalars = {d: b[lo:k].to("cpu").numpy() for d, b in self._scalar_buf.items()}
            return _chunk_from_meta(m, lo, k, stats, scalars, n_tracks)

        yield np.asarray(m["steps"], dtype=np.int64), device_rows
        for stats, scalars, event, meta in reversed(self._in_flight):
            def flight_rows(lo: int, stats=stats, scalars=scalars, event=event, meta=meta) -> _Chunk:
                if event is not None:
                    event.synchronize()
                host = [_host_numpy(stats[d][lo:]) for d in self._tracks.devices()]
                hs = {d: t[lo:].numpy() for d, t in scalars.items()}
                return _chunk_from_meta(meta, lo, len(meta["steps"]), host, hs, n_tracks)

            yield np.asarray(meta["steps"], dtype=np.int64), flight_rows
        for c in reversed(self._chunks):
            yield c.steps, c.rows
        on_disk = self._collected - sum(len(c) for c in self._chunks)
        if self._stream is not None and on_disk > 0:
            self._stream.drain()
            reader = _StreamReader(self._stream.path)
            old = reader.chunk(0, on_disk)
            yield old.steps, old.rows

    def _tail(self, take: Callable[[np.ndarray], tuple[int, bool]]) -> _Chunk:
        """The newest records: for each segment, newest first, take(steps) says from which row
        on to read it and whether older segments are needed no more."""
        parts = []
        for steps, read in self._segments():
            if not len(steps):
                continue
            lo, done = take(steps)
            self._reads["segments"] += 1
            if lo < len(steps):
                parts.append(read(lo))
                self._reads["rows"] += len(steps) - lo
            if done:
                break
        parts.reverse()
        return _concat(parts, self._rows(), len(self._tracks))

    def _record(self, c: _Chunk) -> Record:
        """A Record of the chunk `c`, with this optimizer's tracks and meta."""
        table = self._tracks
        order = {d: i for i, d in enumerate(table.devices())}
        stats = [c.stats[order[t.device]][:, t.row : t.row + t.num_groups] for t in table.tracks]
        # the caller's own arrays (the history is never handed out to be written), except memory
        # maps of a stream, read-only views that load nothing until read
        stats = [s if isinstance(s, np.memmap) else np.array(s) for s in stats]
        groups = self._group_index()
        tracks = [dict(t.describe(), param_group=groups.get(id(t.param), -1)) for t in table.tracks]
        n = len(c)
        return Record(
            tracks=tracks,
            steps=np.array(c.steps),
            stats=stats,
            hyper={k: _ragged(c.hyper[k], n, len(self._param_groups())) for k in HYPER_NAMES},
            first=np.array(c.first).reshape(n, len(tracks)),
            skipped=np.array(c.skipped).reshape(n),
            meta=dict(
                nm_optim=__version__,
                torch=torch.__version__,
                record_every=self.record_every,
                saved_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                **self._meta(),
            ),
        )

    def _stream_meta(self, dtype: str) -> dict[str, Any]:
        """meta.json of a new stream: the record's meta and the stream's layout."""
        table = self._tracks
        devices = table.devices()
        order = {d: i for i, d in enumerate(devices)}
        groups = self._group_index()
        return dict(
            format=FORMAT,
            format_version=FORMAT_VERSION,
            stat_names=list(STAT_NAMES),
            tracks=[dict(t.describe(), param_group=groups.get(id(t.param), -1)) for t in table.tracks],
            hyper_names=list(HYPER_NAMES),
            nm_optim=__version__,
            torch=torch.__version__,
            record_every=self.record_every,
            created_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **self._meta(),
            stream={
                "id": secrets.token_hex(8),  # a checkpoint names its stream: a replaced one is refused
                "dtype": dtype,
                # the most records a chunk holds: a crash mid-write leaves at most that many past
                # the index's records (load_record refuses more: an index that lost chunks)
                "chunk": self.chunk,
                "devices": [{"device": str(d), "rows": r, "file": _stats_file(k)}
                            for k, (d, r) in enumerate(zip(devices, self._rows()))],
                "track_rows": [[order[t.device], t.row] for t in table.tracks],
            },
        )

    def _group_index(self) -> dict[int, int]:
        return {id(p): gi for gi, g in enumerate(self._param_groups()) for p in g["params"]}


def _creating_torch_state(groups: list[dict[str, Any]]) -> bool:
    """Whether this step() is torch.distributed.checkpoint creating a fresh optimizer's state:
    get_state_dict / set_state_dict call its _init_optim_state (torch/distributed/checkpoint/
    state_dict.py), which sets every group's lr to 0 (a float, or a CPU tensor), steps with zero
    grads and restores the lrs. A step of the run with lr 0 (a warmup from 0) is a step: only
    that function's frame on the call stack tells them apart, and the stack is looked at only
    when every lr is 0."""
    for g in groups:
        lr = g["lr"]
        if isinstance(lr, Tensor):
            # torch puts a CPU tensor there: any other device is the run's own (and reading it would sync)
            if lr.device.type != "cpu" or lr.numel() != 1 or lr.item() != 0:
                return False
        elif lr != 0:
            return False
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "_init_optim_state" and \
                frame.f_globals.get("__name__") == "torch.distributed.checkpoint.state_dict":
            return True
        frame = frame.f_back
    return False


def _groups_of(tracks: Sequence[Track]) -> str:
    """Each track's groups, for an error message."""
    return ", ".join(f"{t.name}: {t.num_groups}" for t in tracks)


def _positive_int(name: str, value: Any) -> int:
    """`value` as an int: any integral type (numpy's too), but not a bool; at least 1."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int (any integral type but bool), got "
                        f"{type(value).__name__} {describe_value(value)}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {int(value)}")
    return int(value)


def _to_host_async(t: Tensor) -> Tensor:
    if t.device.type == "cuda":
        dst = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        dst.copy_(t, non_blocking=True)
        return dst
    return t.clone()


def _host_numpy(t: Tensor) -> np.ndarray:
    """A host tensor as numpy, copied out of pinned memory (scarce: never kept for the history)."""
    a = t.numpy()
    return a.copy() if t.is_pinned() else a
