"""One writer process per data directory: an OS lock (``fcntl.flock``) on ``DATA_DIR/.kvrag.lock``.

The data dir holds state that belongs to one process: FAISS snapshots (written with fixed temp names), the
blob read cache, and with the embedded default (SQLite + local files) the catalog and every blob, whose
orphan collection and If-Match checks assume one writer. A second ``kvrag serve`` (or a maintenance command)
on the same folder is refused with one line naming the holder instead of silently sharing it.

flock locks belong to the open file: the kernel drops them when the holding process exits in any way, so a
``kill -9`` leaves nothing to clean and the next start takes the lock at once. The lock file's contents (the
holder's pid and host) only make the refusal readable; they are never trusted for the decision.

Within one process the lock is shared: a second store opened on the same folder (tests re-opening a store to
simulate a restart, the CLI's engine commands) reuses the held lock, counted, and the last release drops it.
"""

from __future__ import annotations

import fcntl
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

from kvstore.errors import Unavailable

LOCK_NAME = ".kvrag.lock"


class DataDirInUse(Unavailable):
    """Another process holds the data directory (its one writer)."""


@dataclass
class _Held:
    fd: int
    count: int


_held: dict[Path, _Held] = {}
_guard = threading.Lock()


def _holder(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        return "another process"
    return text or "another process"


@dataclass(frozen=True)
class DataDirLock:
    """A held lock on one data directory; :meth:`release` once per :func:`acquire`."""

    path: Path

    def release(self) -> None:
        with _guard:
            held = _held.get(self.path)
            if held is None:
                return
            held.count -= 1
            if held.count > 0:
                return
            del _held[self.path]
            os.close(held.fd)  # closing the descriptor drops the flock


def acquire(data_dir: Path, name: str = LOCK_NAME) -> DataDirLock:
    """Take ``data_dir``'s writer lock (the file ``name`` in it) without waiting; :class:`DataDirInUse` when another
    process holds it."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = (data_dir / name).resolve()
    with _guard:
        held = _held.get(path)
        if held is not None:
            held.count += 1
            return DataDirLock(path)
        # O_CLOEXEC: a program this process starts must not inherit (and so keep alive) the lock.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            what = "data directory" if name == LOCK_NAME else "SQLite catalog"
            where = data_dir if name == LOCK_NAME else data_dir / name.removesuffix(".kvrag.lock")
            raise DataDirInUse(f"{what} {where} is in use by {_holder(path)}: one kvrag process per "
                               f"{what} (stop it, or give this one its own KVRAG_DATA_DIR; replicas "
                               "share PostgreSQL and an object store, not a folder)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        _held[path] = _Held(fd=fd, count=1)
        return DataDirLock(path)


def acquire_sqlite_catalog(url: str) -> DataDirLock | None:
    """The writer lock of a SQLite catalog file (``<file>.kvrag.lock`` beside it), for a catalog outside the data
    dir: two processes with their own data dirs must not both write one SQLite file. None for other catalogs."""
    if not url.startswith("sqlite"):
        return None
    file = url.split("///", 1)[-1]
    if not file or file == ":memory:":
        return None
    path = Path(file).resolve()
    return acquire(path.parent, f"{path.name}.kvrag.lock")


def reset_after_fork() -> None:
    """Forget locks inherited through ``fork()``: a forked child shares its parent's open file, so it would take
    the parent's lock for its own. Registered with ``os.register_at_fork``."""
    global _guard
    _held.clear()
    _guard = threading.Lock()  # another thread may have held it at the fork


os.register_at_fork(after_in_child=reset_after_fork)

__all__ = ["LOCK_NAME", "DataDirInUse", "DataDirLock", "acquire", "acquire_sqlite_catalog"]
