"""Writing files so that a crash never leaves half of one: a temporary file in the same folder,
fsync, rename over the target. Used for records, summaries and checkpoints.

The process umask is never set here, not even for a moment: it is process-wide, so setting it
(even to read it back) makes files that other threads create meanwhile group/world-writable."""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

# How a new file is opened: created here or not at all (never through a planted symlink).
_CREATE = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
_CREATE |= getattr(os, "O_BINARY", 0)


def _create_new(folder: Path, prefix: str, suffix: str) -> tuple[int, Path]:
    """A new file `folder/prefix<random>suffix` opened with mode 0o666, so that the OS applies the
    umask (and any default ACL) exactly as open() would; mkstemp's fixed 0o600 would make outputs
    unreadable to the rest of a group sharing a results folder."""
    for _ in range(100):
        path = folder / f"{prefix}{secrets.token_hex(8)}{suffix}"
        try:
            return os.open(path, _CREATE, 0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file in {folder}")


def _umask() -> int:
    """The current umask, read without setting it: /proc/self/status on Linux, else the mode the
    OS gives a probe file."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    fd, probe = _create_new(Path(tempfile.gettempdir()), ".nm_optim_umask.", ".probe")
    try:
        return 0o777 & ~os.fstat(fd).st_mode & 0o666
    finally:
        os.close(fd)
        os.unlink(probe)


def new_file_mode() -> int:
    """What open() gives a new file: 0o666 less the umask (the umask is read, never set)."""
    return 0o666 & ~_umask()


def _temp_prefix(path: Path, pid: int) -> str:
    # The writer's pid is in the name, so a later save can tell a crashed writer's leftover
    # (its process is gone) from a concurrent writer's file in progress.
    return f".{path.name}.{pid}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Delete the temporary files that writers of `path` killed mid-save (SIGKILL, power loss)
    left next to it: a killed save of a large record must not leave hundreds of MB behind."""
    removed = []
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = tmp.name[len(path.name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
                removed.append(tmp)
    return removed


def atomic_write(path: str | os.PathLike, write: Callable[[IO], None], binary: bool = True) -> Path:
    """Call `write(file)` on a temporary file next to `path`, then fsync and rename it to `path`.
    A crash (or an exception in `write`) leaves the old file, or none, never a partial one; a
    temporary file a killed earlier save left behind is removed. The file gets the mode open()
    would give it (0o666 less the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = _create_new(path.parent, _temp_prefix(path, os.getpid()), ".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
