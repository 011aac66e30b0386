"""Content-addressed blob store on the local file system, with atomic, durable writes."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

from kvstore.errors import CorruptBlock

_BLOB_ID = re.compile(r"^[0-9a-f]{64}$")


def blob_id_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class LocalBlobStore:
    """Blobs are named by the sha256 of their bytes: writing the same bytes twice stores one file."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, blob_id: str) -> Path:
        if not _BLOB_ID.fullmatch(blob_id):
            raise CorruptBlock(f"malformed blob id {blob_id!r}")
        return self.root / blob_id[:2] / blob_id[2:4] / blob_id

    def put(self, data: bytes, *, replace: bool = False) -> str:
        """Write ``data`` (temp file, fsync, rename, fsync dir) and return its id.

        An existing blob of the same id is trusted unless ``replace`` is set (rebuilding a damaged one).
        """
        blob_id = blob_id_of(data)
        path = self._path(blob_id)
        if not replace and path.exists() and path.stat().st_size == len(data):
            return blob_id
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return blob_id

    def get(self, blob_id: str) -> bytes:
        path = self._path(blob_id)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise CorruptBlock(f"blob {blob_id[:12]} is missing") from None
        except OSError as exc:  # a directory in its place, a path component that is a file, an I/O error
            raise CorruptBlock(f"blob {blob_id[:12]} is unreadable ({exc.strerror})") from None

    def exists(self, blob_id: str) -> bool:
        return self._path(blob_id).exists()

    def delete(self, blob_id: str) -> None:
        self._path(blob_id).unlink(missing_ok=True)

    def ids(self) -> Iterator[str]:
        """Every stored blob id (for orphan collection)."""
        for path in self.root.glob("*/*/*"):
            if _BLOB_ID.fullmatch(path.name):
                yield path.name
