"""Record streams: a folder the recorder appends chunks to (meta.json, one raw stats file per
device, index.jsonl), memory-mapped on reading; and load_record, which reads a stream or a .npz.
docs/architecture.md, "The record"."""

from __future__ import annotations

import json
import numbers
import os
import sys
import threading
import weakref
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, a second writing process goes undetected
    fcntl = None  # type: ignore[assignment]

from nm_optim._io import atomic_write
from nm_optim.names import HYPER_NAMES, STAT_NAMES, track_sums
from nm_optim.record.format import (_READ_ERRORS, CHECKSUM, STREAM_DTYPES, STREAM_INDEX, STREAM_META, Record,
                                    RecordError, _Chunk, _check_consistent, _check_meta, _crc, _ragged, _seal,
                                    _seal_state, _stats_file)


# -- record streams -------------------------------------------------------------------------------------------


def _index_lines(data: bytes) -> tuple[list[bytes], int]:
    """The complete lines of an index file and the byte length they span (a torn last line, from a
    crash mid-append, is not part of the stream)."""
    end = data.rfind(b"\n") + 1
    return (data[:end].splitlines() if end else []), end


def _count(x: Any) -> int:
    """A JSON int >= 0 (not a bool, a float or a string): ValueError otherwise."""
    if isinstance(x, bool) or not isinstance(x, int) or x < 0:
        raise ValueError(f"{x!r} is not an int >= 0")
    return x


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _entry_problem(e: dict[str, Any], n_tracks: int, n_devices: int, checksums: bool, last_step: int) -> str | None:
    """What is wrong with a chunk's index entry (None: nothing): every field's type and range,
    and its steps after `last_step` (the previous chunk's last)."""
    k = e.get("records")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        return f"'records' is {k!r}, not an int >= 1"
    steps = e.get("steps")
    if not isinstance(steps, list) or len(steps) != k or not all(isinstance(x, int) and not isinstance(x, bool)
                                                                for x in steps):
        return f"'steps' is not a list of {k} ints"
    if any(b <= a for a, b in zip([last_step, *steps], steps)):
        return "'steps' do not increase (from one chunk to the next too), or are negative"
    skipped = e.get("skipped")
    if not isinstance(skipped, list) or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < k
                                                for i in skipped):
        return f"'skipped' is not a list of record indices in [0, {k})"
    first = e.get("first")
    if not isinstance(first, list) or not all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in p)
            and 0 <= p[0] < k and 0 <= p[1] < n_tracks for p in first):
        return f"'first' is not a list of [record in [0, {k}), track in [0, {n_tracks})] pairs"
    hyper = e.get("hyper")
    if not isinstance(hyper, dict) or set(hyper) != set(HYPER_NAMES):
        return f"'hyper' has not the keys {list(HYPER_NAMES)}"
    for name, rows in hyper.items():
        if not isinstance(rows, list) or len(rows) != k or not all(
                isinstance(r, list) and all(_is_number(x) for x in r) for r in rows):
            return f"'hyper' {name!r} is not {k} rows of numbers"
    crcs = e.get("stats_crc32")
    if (checksums or crcs is not None) and (not isinstance(crcs, list) or len(crcs) != n_devices
                                            or not all(isinstance(c, str) for c in crcs)):
        return f"'stats_crc32' is not a list of {n_devices} checksums"
    return None


def _whole_line(raw: bytes) -> bool:
    """Whether `raw` is a whole sealed index line (without its newline)."""
    try:
        entry = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(entry, dict) and _seal_state(raw, entry) is True


def _index_line(entry: dict[str, Any]) -> str:
    """A chunk's sealed line of index.jsonl."""
    return _seal(json.dumps(entry, separators=(",", ":"))) + "\n"


def _stats_crcs(stats: list[np.ndarray], dtype: np.dtype) -> list[str]:
    """Per device, the CRC-32 of a chunk's stats as they are stored."""
    return [_crc(memoryview(np.ascontiguousarray(s, dtype=dtype)).cast("B")) for s in stats]


class _StreamReader:
    """A record stream folder, read: its meta, its committed chunks and memory maps of its stats."""

    def __init__(self, path: Path) -> None:
        self.path = path
        meta_path = path / STREAM_META
        if not meta_path.is_file():
            self.fail(f"not an nm_optim record (a folder without {STREAM_META})")
        try:
            raw = meta_path.read_bytes()
            meta = json.loads(raw)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            self.fail(f"damaged record: {STREAM_META} is not valid JSON")
        sealed = _seal_state(raw, meta) if isinstance(meta, dict) else None
        if sealed is False:
            self.fail(f"damaged record: {STREAM_META} fails its checksum")
        _check_meta(meta, self.fail)
        layout = meta.get("stream")
        try:
            self.dtype = np.dtype(layout["dtype"])
            self.rows = [_count(d["rows"]) for d in layout["devices"]]
            self.track_rows = [(_count(k), _count(r)) for k, r in layout["track_rows"]]
            if self.dtype.name not in STREAM_DTYPES or len(self.track_rows) != len(meta["tracks"]) \
                    or any(k >= len(self.rows) for k, _ in self.track_rows):
                raise ValueError
        except (TypeError, KeyError, ValueError):
            self.fail(f"damaged record: {STREAM_META} has no valid 'stream' layout")
        # Streams written with checksums say so in their layout (and their meta.json is sealed);
        # older ones, without, load unverified.
        self.checksums = layout.get("checksums") == CHECKSUM
        if self.checksums and sealed is None:
            self.fail(f"damaged record: {STREAM_META} has lost its checksum")
        self.meta = meta
        index = path / STREAM_INDEX
        if not index.is_file():  # created with the stream, never removed
            self.fail(f"damaged record: {STREAM_INDEX} is missing")
        try:
            data = index.read_bytes()
        except OSError as e:
            self.fail(f"{STREAM_INDEX} cannot be read ({e.strerror or e})")
        lines, self.index_bytes = _index_lines(data)
        tail = data[self.index_bytes:]
        if len(tail) > 1 and _whole_line(tail[:-1]):
            # A crash leaves a prefix of the line; a whole line and one more byte is damage (its
            # newline changed), which would otherwise drop the last chunk silently.
            self.fail(f"damaged record: the last line of {STREAM_INDEX} ends in {tail[-1:]!r}, not a newline")
        self.entries: list[dict[str, Any]] = []
        last_step = -1
        for i, line in enumerate(lines):
            where = f"line {i + 1} of {STREAM_INDEX}"
            try:
                entry = json.loads(line)
            except (ValueError, UnicodeDecodeError):
                self.fail(f"damaged record: {where} is not a chunk entry (not JSON)")
            if not isinstance(entry, dict):
                self.fail(f"damaged record: {where} is not a chunk entry")
            sealed = _seal_state(line, entry)
            if sealed is False or (sealed is None and self.checksums):
                self.fail(f"damaged record: {where} fails its checksum" if sealed is False
                          else f"damaged record: {where} has no checksum")
            problem = _entry_problem(entry, len(self.track_rows), len(self.rows), self.checksums, last_step)
            if problem:
                self.fail(f"damaged record: {where}: {problem}")
            if entry["steps"]:
                last_step = entry["steps"][-1]
            self.entries.append(entry)
        self.records = sum(e["records"] for e in self.entries)

    def fail(self, what: str) -> NoReturn:
        raise RecordError(f"{self.path}: {what}")

    def row_bytes(self, k: int) -> int:
        return self.rows[k] * len(STAT_NAMES) * self.dtype.itemsize

    def check_sizes(self, n: int) -> None:
        """RecordError unless every stats file holds at least `n` records."""
        for k in range(len(self.rows)):
            f = self.path / _stats_file(k)
            size = f.stat().st_size if f.is_file() else 0
            if size < n * self.row_bytes(k):
                self.fail(f"damaged record: {_stats_file(k)} holds {size // max(self.row_bytes(k), 1)} records, "
                          f"{STREAM_INDEX} lists {n}")

    def stats(self, n: int | None = None) -> list[np.ndarray]:
        """Per device, a read-only memory map [n, rows, 9] of the first n records."""
        n = self.records if n is None else n
        self.check_sizes(n)
        out = []
        for k, rows in enumerate(self.rows):
            f = self.path / _stats_file(k)
            if n == 0 or rows == 0:
                out.append(np.zeros((n, rows, len(STAT_NAMES)), self.dtype))
            else:
                out.append(np.memmap(f, dtype=self.dtype, mode="r", shape=(n, rows, len(STAT_NAMES))))
        return out

    def chunk(self, lo: int = 0, hi: int | None = None) -> _Chunk:
        """Records [lo, hi) as a chunk whose stats are memory-mapped."""
        hi = self.records if hi is None else hi
        n_tracks = len(self.track_rows)
        steps, skipped, first = [], [], []
        hyper: dict[str, list] = {k: [] for k in HYPER_NAMES}
        start = 0
        try:
            for e in self.entries:
                k = int(e["records"])
                if start + k > lo and start < hi:
                    a, b = max(lo - start, 0), min(hi - start, k)
                    steps += e["steps"][a:b]
                    skipped += [start + i for i in e["skipped"] if a <= i < b]
                    first += [(start + i, t) for i, t in e["first"] if a <= i < b]
                    for name in HYPER_NAMES:
                        rows = e["hyper"][name]
                        if len(rows) != k:
                            raise ValueError
                        hyper[name] += rows[a:b]
                start += k
            n = hi - lo
            skip = np.zeros(n, bool)
            skip[np.asarray(skipped, dtype=np.int64) - lo] = True
            fst = np.zeros((n, n_tracks), bool)
            if first:
                idx = np.asarray(first, dtype=np.int64)
                fst[idx[:, 0] - lo, idx[:, 1]] = True
        except (ValueError, KeyError, TypeError, IndexError):
            self.fail(f"damaged record: an entry of {STREAM_INDEX} is inconsistent")
        stats = [s[lo:hi] for s in self.stats(hi)]
        return _Chunk(np.asarray(steps, dtype=np.int64).reshape(hi - lo), stats, fst, skip, hyper)

    def verify(self, n: int) -> None:
        """RecordError naming the first chunk among those holding the first `n` records whose
        stats bytes fail their checksum (chunks written without one are not checked)."""
        self.check_sizes(n)
        start = 0
        for j, e in enumerate(self.entries):
            if start >= n:
                break
            k = e["records"]
            for d, crc in enumerate(e.get("stats_crc32") or ()):
                size = self.row_bytes(d)
                with open(self.path / _stats_file(d), "rb") as f:
                    f.seek(start * size)
                    data = f.read(k * size)
                if _crc(data) != crc:
                    self.fail(f"damaged record: {_stats_file(d)} fails its checksum in chunk {j} (records {start} to "
                              f"{start + k - 1}, line {j + 1} of {STREAM_INDEX}); the {start} records before it are "
                              f"intact: load_record(path, records={start}) reads them")
            start += k

    def check_extent(self) -> None:
        """RecordError if a stats file holds more records than a crash or a cut can leave past
        the index's (a deleted, emptied or cut index.jsonl would load as a shorter record)."""
        layout = self.meta["stream"]
        chunk = layout.get("chunk")
        if chunk is None:
            return  # written before the layout said its chunk size: not checked
        spare = layout.get("spare_bytes", [0] * len(self.rows))
        try:
            bound = max([_count(chunk), *(e["records"] for e in self.entries)])
            spare = [_count(b) for b in spare]
            if len(spare) != len(self.rows):
                raise ValueError
        except (TypeError, ValueError):
            self.fail(f"damaged record: {STREAM_META} has no valid 'stream' layout ('chunk', 'spare_bytes')")
        for k in range(len(self.rows)):
            row = self.row_bytes(k)
            size = (self.path / _stats_file(k)).stat().st_size
            if row and size > max(spare[k], (self.records + bound) * row):
                self.fail(f"damaged record: {STREAM_INDEX} lists {self.records} records, but {_stats_file(k)} holds "
                          f"{size // row}: the index lost chunks (deleted, emptied or cut)")

    def record(self, n: int | None = None, verify: bool = True) -> Record:
        """The first `n` records (all: None), their stats bytes verified first (with `verify`)."""
        n = self.records if n is None else n
        if verify:
            self.verify(n)
        self.check_extent()
        meta = dict(self.meta)
        meta.pop("stream")
        tracks = meta.pop("tracks")
        names = meta.pop("hyper_names")
        c = self.chunk(0, n)
        stats = []
        for t, (k, row) in zip(tracks, self.track_rows):
            groups = t.get("num_groups") if isinstance(t, dict) else None
            if not isinstance(groups, int) or k >= len(c.stats) or row + groups > self.rows[k]:
                self.fail(f"damaged record: track {t.get('name') if isinstance(t, dict) else t!r} does not fit "
                          f"the stream's layout")
            stats.append(c.stats[k][:, row : row + groups])
        record = Record(tracks=tracks, steps=c.steps, stats=stats,
                        hyper={k: _ragged(c.hyper.get(k, []), len(c)) for k in names},
                        first=c.first, skipped=c.skipped, meta=meta)
        _check_consistent(record, self.fail)
        return record


# The streams of this process with a writer thread, by folder: a stream reopened (a resume in the
# same process) or replaced waits for the writes still queued there first.
_ACTIVE: weakref.WeakValueDictionary[str, RecordStream] = weakref.WeakValueDictionary()


class _WriterLock:
    """This process's claim on a stream folder: an exclusive flock on the folder itself, taken by
    the first RecordStream of the process that writes there and held until the last one is
    collected or the process ends (the kernel drops it even on SIGKILL: no stale lock). Two
    processes appending to one stream (e.g. every rank of a distributed run) would interleave
    their chunks into a stream that no longer describes either run."""

    def __init__(self, path: Path) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise RuntimeError(
                f"record stream {path} is being written by another process. Under torch.distributed every "
                "rank holds the same record: stream from rank 0 only (if dist.get_rank() == 0), or give each "
                "rank its own folder") from None
        weakref.finalize(self, os.close, fd)


_LOCKS: weakref.WeakValueDictionary[str, _WriterLock] = weakref.WeakValueDictionary()


def _claim(path: Path) -> _WriterLock | None:
    """The folder's writer lock, shared by every RecordStream of this process on it."""
    if fcntl is None:
        return None
    key = str(path.resolve())
    lock = _LOCKS.get(key)
    if lock is None:
        lock = _LOCKS[key] = _WriterLock(path)
    return lock


# What writes to a stream and holds records not yet handed to it (the recorder's partial chunk),
# by the stream it writes to: closed at a normal exit, before the writer threads are joined.
# (Weak: a recorder collected with its optimizer writes them itself, in Recorder.__del__.)
_OWNERS: weakref.WeakSet[Any] = weakref.WeakSet()
# The RecordStream of this process that last created or opened each folder: an older one there was
# replaced (overwrite=True) or reopened (a resume), and must not append at exit over the new one.
_CURRENT: weakref.WeakValueDictionary[str, RecordStream] = weakref.WeakValueDictionary()


def close_at_exit(owner: Any) -> None:
    """Call `owner.close()` (while `owner` lives) when the process ends normally, or in drain_all."""
    _OWNERS.add(owner)


def superseded(stream: RecordStream) -> bool:
    """Whether another RecordStream of this process has since created or opened `stream`'s folder
    (none there: `stream` itself is being collected, its weak reference cleared first)."""
    current = _CURRENT.get(stream.key)
    return current is not None and current is not stream


# Owners collected with records still to write (Recorder.__del__ puts itself here): closed at the
# next safe point, never inside the garbage collector, which may run in the middle of anything.
_ORPHANS: list[Any] = []


def close_orphans() -> None:
    """Close the collected owners that still hold records (see _ORPHANS)."""
    while _ORPHANS:
        owner = _ORPHANS.pop()
        _close(owner)
        owner._release_stream()  # collected: its stream, and the folder's writer lock, go now


def _close(owner: Any) -> None:
    try:
        owner.close()
    except Exception as e:  # noqa: BLE001  (one owner's failure must not cost the others their records)
        print(f"nm_optim: writing the last records of {owner!r} failed: {type(e).__name__}: {e}", file=sys.stderr)


def _close_all() -> None:
    close_orphans()
    for owner in list(_OWNERS):
        _close(owner)


def drain_all() -> None:
    """Write what every stream owner of this process still holds (the recorders' partial chunks)
    and wait for every queued write (before a process ends without finalising the interpreter:
    app.distributed.end_process)."""
    _close_all()
    for active in list(_ACTIVE.values()):
        active.drain(raise_error=False)


# Run before the interpreter joins non-daemon threads (threading._register_atexit, as
# concurrent.futures does), so a writer thread still writes normally; atexit otherwise.
try:
    threading._register_atexit(_close_all)  # type: ignore[attr-defined]
except (AttributeError, RuntimeError):
    import atexit

    atexit.register(_close_all)


def _settle(path: Path) -> None:
    """Wait for this process's queued writes to the stream in `path`, if any."""
    active = _ACTIVE.get(str(Path(path).resolve()))
    if active is not None:
        active.drain(raise_error=False)


class RecordStream:
    """An open record stream, appended to chunk by chunk (see the module docstring).

    background: chunks are written by a writer thread (at most one queued behind the one being
    written; `append` waits when both are taken), so the disk time overlaps training;
    :meth:`drain` waits for them, and every read of the stream from this process, `sync`,
    `truncate` and the recorder's snapshot / state_dict drain first. A write error is raised by
    the next call. The thread is not a daemon: a process that ends normally or by an exception
    writes what was queued."""

    def __init__(self, path: Path, reader: _StreamReader, fsync: bool, background: bool = False) -> None:
        self.path = path
        self._lock = _claim(path)  # before anything is cut or written
        self.key = str(path.resolve())
        self.background = background
        self._cond = threading.Condition()
        self._pending: list[_Chunk] = []
        self._busy = False
        self._error: BaseException | None = None
        self.dtype = reader.dtype
        self.rows = reader.rows
        self.track_names = [t["name"] for t in reader.meta["tracks"]]
        # The sums each track's columns hold (all 9 in a stream written before tracks said so).
        self.track_sums = [track_sums(t) for t in reader.meta["tracks"]]
        # Each track's groups (a "cols" track with a column block has fewer: nm_optim/tracks.py).
        self.track_groups = [t["num_groups"] for t in reader.meta["tracks"]]
        self.id = str(reader.meta["stream"].get("id", ""))
        self.records = reader.records
        self.fsync = fsync
        self._row_bytes = [reader.row_bytes(k) for k in range(len(self.rows))]
        # Records whose stats are in the files: the next chunk's stats go right after them, over
        # anything a crash or a cut left there (see _cut).
        self._written = self.records
        reader.check_sizes(self.records)
        # Cut what a crash left past the last complete chunk: a torn index line.
        self._cut(reader.index_bytes)
        _CURRENT[self.key] = self

    @classmethod
    def create(cls, path: str | os.PathLike, meta: dict[str, Any], *, overwrite: bool = False,
               fsync: bool = True, background: bool = False) -> RecordStream:
        """A new, empty stream in folder `path` with `meta` (which has the "stream" layout). An
        existing stream there is replaced only with `overwrite`; any other non-empty folder is
        refused."""
        path = Path(path)
        close_orphans()
        _settle(path)
        if path.exists():
            if not path.is_dir():
                raise FileExistsError(f"{path} exists and is not a folder; a record stream is a folder")
            lock = _claim(path)  # noqa: F841  (held until the stream below holds it too)
            content = {p.name for p in path.iterdir()}
            ours = {STREAM_META, STREAM_INDEX} | {p for p in content if (p.startswith("stats-") and p.endswith(".bin"))
                                                  or (p.startswith(".") and p.endswith(".tmp"))}
            if content and not content <= ours:
                raise FileExistsError(f"{path} holds files that are not a record stream: give an empty or new folder")
            if content and not overwrite:
                raise FileExistsError(f"{path} holds a record stream: give overwrite=True to replace it, or another folder")
            for name in content:
                (path / name).unlink()
        path.mkdir(parents=True, exist_ok=True)
        for k in range(len(meta["stream"]["devices"])):
            (path / _stats_file(k)).touch()
        (path / STREAM_INDEX).touch()
        meta = dict(meta, stream=dict(meta["stream"], checksums=CHECKSUM))
        atomic_write(path / STREAM_META, lambda f: f.write(_seal(json.dumps(meta, indent=1)).encode()))
        return cls(path, _StreamReader(path), fsync, background)

    @classmethod
    def open(cls, path: str | os.PathLike, *, fsync: bool = True, background: bool = False) -> RecordStream:
        """An existing stream, to continue (bytes past its last complete chunk are cut)."""
        close_orphans()
        _settle(Path(path))
        return cls(Path(path), _StreamReader(Path(path)), fsync, background)

    def _cut(self, index_bytes: int) -> None:
        """Cut the index file to `index_bytes`. The stats files are never shortened: a reader in
        this or another process may have them memory-mapped (load_record), and a page of a
        mapping past the end of its file kills the reader with SIGBUS. Their bytes past the
        index's records are ignored by readers and overwritten by the next chunks."""
        index = self.path / STREAM_INDEX
        if index.exists() and index.stat().st_size != index_bytes:
            os.truncate(index, index_bytes)

    def append(self, chunk: _Chunk) -> None:
        """The chunk's stats, then (the commit) its index line; with a writer thread, queued
        (the chunk must not change afterwards)."""
        if not len(chunk):
            return
        if len(chunk.stats) != len(self.rows):
            raise ValueError(f"record stream {self.path}: a chunk for {len(chunk.stats)} devices, the stream has "
                             f"{len(self.rows)}")
        for k, s in enumerate(chunk.stats):
            if s.shape[1:] != (self.rows[k], len(STAT_NAMES)):
                raise ValueError(f"record stream {self.path}: stats of shape {list(s.shape[1:])} for device {k}, "
                                 f"the stream has [{self.rows[k]}, {len(STAT_NAMES)}]")
        self._raise_error()
        if not self.background:
            self._write(chunk)
        else:
            with self._cond:
                while len(self._pending) >= 2:
                    self._cond.wait()
                self._pending.append(chunk)
                if not self._busy:
                    self._busy = True
                    _ACTIVE[str(self.path.resolve())] = self
                    threading.Thread(target=self._worker, name=f"nm_optim record writer {self.path.name}").start()
        self.records += len(chunk)

    def _worker(self) -> None:
        while True:
            with self._cond:
                if not self._pending:
                    self._busy = False
                    self._cond.notify_all()
                    return
                chunk = self._pending[0]
            try:
                if self._error is None:
                    self._write(chunk)
            except BaseException as e:  # noqa: BLE001  (raised in the training thread by the next call)
                self._error = e
            with self._cond:
                self._pending.pop(0)
                self._cond.notify_all()

    @property
    def queued_bytes(self) -> int:
        """Host memory of the chunks queued for the writer thread (the one being written too)."""
        with self._cond:
            return sum(c.nbytes for c in self._pending)

    def drain(self, raise_error: bool = True) -> None:
        """Wait until every queued chunk is written."""
        with self._cond:
            while self._busy:
                self._cond.wait()
        if raise_error:
            self._raise_error()

    def _raise_error(self) -> None:
        if self._error is not None:
            e, self._error = self._error, None
            raise OSError(f"record stream {self.path}: writing a chunk failed: {e}") from e

    def _write(self, chunk: _Chunk) -> None:
        crcs = []
        for k, s in enumerate(chunk.stats):
            data = memoryview(np.ascontiguousarray(s, dtype=self.dtype)).cast("B")
            crcs.append(_crc(data))
            fd = os.open(self.path / _stats_file(k), os.O_RDWR | os.O_CREAT, 0o666)
            with os.fdopen(fd, "r+b") as f:
                f.seek(self._written * self._row_bytes[k])  # the records' end, not the file's (see _cut)
                f.write(data)
                if self.fsync:
                    f.flush()
                    os.fsync(f.fileno())
        line = _index_line(dict(chunk.index_entry(), stats_crc32=crcs))
        with open(self.path / STREAM_INDEX, "ab") as f:
            f.write(line.encode())
            if self.fsync:
                f.flush()
                os.fsync(f.fileno())
        self._written += len(chunk)

    def sync(self) -> None:
        """Write what is queued and fsync it all (a checkpoint that refers to it follows)."""
        self.drain()
        for name in (*(_stats_file(k) for k in range(len(self.rows))), STREAM_INDEX):
            fd = os.open(self.path / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def truncate(self, records: int) -> None:
        """Cut the stream back to its first `records` records (a resume from a checkpoint taken
        there): the index is rewritten atomically; the next chunks' stats overwrite the cut
        records in place (the files are not shortened: see _cut). A record loaded before stays
        readable, and shows the new run's values past the cut as they are written."""
        self.drain()
        if records > self.records:
            raise ValueError(f"record stream {self.path} holds {self.records} records, fewer than the {records} "
                             "the checkpoint refers to (was it written by another run, or cut?)")
        if records == self.records:
            return
        reader = _StreamReader(self.path)
        # The stats past the cut stay (see _cut): meta.json says so first, or load_record would
        # take them for chunks the index lost.
        layout = reader.meta["stream"]
        if "chunk" in layout:
            spare = layout.get("spare_bytes") or [0] * len(self.rows)
            sizes = [(self.path / _stats_file(k)).stat().st_size for k in range(len(self.rows))]
            self.update_meta(stream=dict(layout, spare_bytes=[max(a, b) for a, b in zip(spare, sizes)]))
        kept, start = [], 0
        for e in reader.entries:
            k = int(e["records"])
            if start + k <= records:
                kept.append(e)
            elif start < records:
                part = reader.chunk(start, records)
                kept.append(dict(part.index_entry(), stats_crc32=_stats_crcs(part.stats, self.dtype)))
            start += k
        text = "".join(_index_line(e) for e in kept).encode()
        atomic_write(self.path / STREAM_INDEX, lambda f: f.write(text))
        self.records = self._written = records

    def update_meta(self, **extra: Any) -> None:
        """Add (or replace) top-level keys of meta.json, atomically (e.g. what the run was)."""
        meta = dict(_StreamReader(self.path).meta)  # its checksum verified (and dropped)
        meta.update(extra)
        text = json.dumps(meta, indent=1)
        if meta["stream"].get("checksums") == CHECKSUM:
            text = _seal(text)
        atomic_write(self.path / STREAM_META, lambda f: f.write(text.encode()))



def load_record(path: str | os.PathLike, *, records: int | None = None, verify: bool = True) -> Record:
    """Read a record: a .npz file written by `Recorder.save` / `Record.save`, or a record stream
    folder written by `Recorder.stream_to` (its stats memory-mapped, nothing loaded until read).
    A missing, damaged or foreign file, one that fails its checksums, or one whose fields are of
    the wrong type, shape or range or disagree, raises RecordError naming the file and the
    problem, in one line.

    records: read only the first `records` records (all: None). Of a stream, only the chunks
    holding them are verified, so the records before a damaged chunk stay readable: the error
    for the first bad chunk gives the number to pass. (Streams written before checksums load
    unverified: the format in nm_optim/record/format.py, "checksums".)

    verify: check a stream's stats bytes against their checksums (reads them all once: ~1 GB/s,
    e.g. 0.36 s for 378 MB); False keeps load_record O(index) for a quick look at a large stream.
    meta.json and index.jsonl are always checked, and a .npz always (zip's CRC-32s)."""
    path = Path(path)

    def fail(what: str) -> NoReturn:
        raise RecordError(f"{path}: {what}")

    if records is not None and (isinstance(records, bool) or not isinstance(records, numbers.Integral)
                                or records < 0):
        raise ValueError(f"load_record: records must be an int >= 0 or None, got {records!r}")
    if path.is_dir():
        close_orphans()  # a collected recorder's last records may be for this stream
        _settle(path)  # chunks this process's writer thread still has queued there
        reader = _StreamReader(path)
        if records is not None and records > reader.records:
            fail(f"records must be at most the {reader.records} records {STREAM_INDEX} lists, got {records}")
        return reader.record(None if records is None else int(records), verify=bool(verify))
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
                if "CRC" in str(e):  # zipfile's check of the member's CRC-32, read whole
                    fail(f"damaged record: entry {key!r} fails its CRC-32 checksum")
                fail(f"damaged record: entry {key!r} cannot be read ({type(e).__name__})")

        try:
            meta = json.loads(str(read("meta")))
        except json.JSONDecodeError:
            fail("damaged record: its 'meta' entry is not valid JSON")
        _check_meta(meta, fail)
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
    if records is not None:
        if records > len(record):
            fail(f"records must be at most the {len(record)} records it holds, got {records}")
        n = int(records)
        record = Record(tracks=record.tracks, steps=record.steps[:n], stats=[s[:n] for s in record.stats],
                        hyper={k: v[:n] for k, v in record.hyper.items()}, first=record.first[:n],
                        skipped=record.skipped[:n], meta=record.meta)
    return record

