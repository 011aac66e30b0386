"""A bounded on-disk cache of fetched blobs, least recently used out first, in front of the object store.

Hand-written rather than a library (e.g. diskcache) because content addressing makes it small: a cache file
is named by the SHA-256 of its bytes, so every hit is verified against its own name (a damaged or truncated
file is dropped and the blob fetched again, never served) and there is no metadata to keep consistent. The
LRU order lives in memory; file mtimes (refreshed on a hit) seed it again after a restart. The cache is
disposable: files are written atomically (temp file + rename) but not fsynced, and any cache I/O error only
costs a fetch.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

log = logging.getLogger(__name__)
_BLOB_ID = re.compile(r"[0-9a-f]{64}")


def _remove(path: Path) -> None:
    """Unlink, ignoring a file already gone or one that cannot be removed (it only costs disk until a restart)."""
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("blob cache: could not remove %s (%s)", path.name[:12], exc)


class BlobCache:
    """At most ``budget_bytes`` of blob files under ``root`` (``root/ab/<id>``); safe across threads.

    Counters: ``hits``, ``misses``, ``corrupt`` (files that failed their check and were dropped).
    """

    def __init__(self, root: Path, budget_bytes: int) -> None:
        self.root = root
        self.budget_bytes = budget_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        self._sizes: OrderedDict[str, int] = OrderedDict()  # least recently used first
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = self.corrupt = 0
        self._load()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._sizes)

    def __contains__(self, blob_id: object) -> bool:
        return blob_id in self._sizes

    def _path(self, blob_id: str) -> Path:
        return self.root / blob_id[:2] / blob_id

    def _load(self) -> None:
        """Index the files a previous process left, oldest access first; drop its unfinished temp files."""
        found: list[tuple[float, str, int]] = []
        for path in self.root.glob("*/*"):
            try:
                if path.name.startswith(".tmp-"):
                    path.unlink(missing_ok=True)
                elif _BLOB_ID.fullmatch(path.name) and path.parent.name == path.name[:2]:
                    st = path.stat()
                    found.append((st.st_mtime, path.name, st.st_size))
            except OSError:
                continue
        for _, blob_id, size in sorted(found):
            self._sizes[blob_id] = size
            self._bytes += size
        for victim in self._evict():  # the budget may have shrunk since
            _remove(self._path(victim))

    def get(self, blob_id: str) -> bytes | None:
        """The cached bytes, verified against the id; None (a miss) when absent or damaged."""
        with self._lock:
            if blob_id not in self._sizes:
                self.misses += 1
                return None
            self._sizes.move_to_end(blob_id)
        path = self._path(blob_id)
        try:
            data = path.read_bytes()
        except OSError:  # evicted by another thread since, or unreadable
            self._forget(blob_id)
            self.misses += 1
            return None
        if hashlib.sha256(data).hexdigest() != blob_id:
            log.warning("blob cache: %s failed its checksum; dropped, fetching it again", blob_id[:12])
            self._forget(blob_id, unlink=True)
            self.corrupt += 1
            self.misses += 1
            return None
        try:
            os.utime(path)  # the access order survives a restart
        except OSError:
            pass
        self.hits += 1
        return data

    def put(self, blob_id: str, data: bytes) -> None:
        """Keep ``data`` (whose id the caller has checked), then evict down to the budget. A blob larger than
        the whole budget is not kept; a write that fails (disk full) is logged and skipped."""
        if len(data) > self.budget_bytes or not _BLOB_ID.fullmatch(blob_id):
            return
        path = self._path(blob_id)
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            # Every rename and unlink happens under the lock, so the index and the files agree.
            with self._lock:
                os.replace(tmp, path)
                tmp = None
                self._bytes += len(data) - self._sizes.pop(blob_id, 0)
                self._sizes[blob_id] = len(data)
                for victim in self._evict():
                    _remove(self._path(victim))
        except OSError as exc:
            log.warning("blob cache: could not keep %s (%s)", blob_id[:12], exc)
        finally:
            if tmp is not None:
                _remove(Path(tmp))

    def discard(self, blob_id: str) -> None:
        if _BLOB_ID.fullmatch(blob_id):
            self._forget(blob_id, unlink=True)

    def _forget(self, blob_id: str, *, unlink: bool = False) -> None:
        with self._lock:
            self._bytes -= self._sizes.pop(blob_id, 0)
            if unlink:
                _remove(self._path(blob_id))

    def _evict(self) -> list[str]:
        """Drop least recently used entries until within budget (the caller holds the lock or is the
        constructor); returns their ids, whose files the caller removes."""
        victims = []
        while self._bytes > self.budget_bytes and self._sizes:
            blob_id, size = self._sizes.popitem(last=False)
            self._bytes -= size
            victims.append(blob_id)
        return victims
