"""The blob-store contract the engine stores KV blocks through, and the factory that picks one from the settings.

Two implementations satisfy it: files under the data dir (:class:`LocalFilesBlobStore`, the embedded default)
and an S3-compatible object store (:class:`kvstore.storage.s3.S3BlobStore`, ``KVRAG_BLOB_URL=s3://BUCKET/PREFIX``).
Blobs are content-addressed: the id is the SHA-256 of the bytes, so writing the same bytes twice stores one
blob, and any copy (a cache file, an object) can be checked against its name.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Protocol, runtime_checkable

from kvstore.errors import CorruptBlock
from kvstore.storage.local import LocalBlobStore

_BLOB_ID = re.compile(r"[0-9a-f]{64}")


@runtime_checkable
class BlobStore(Protocol):
    """Content-addressed blob storage. Every method but :meth:`ids`/:meth:`ids_older_than` validates the id
    (64 lowercase hex digits) and raises ``CorruptBlock`` for a malformed one.

    Errors: ``CorruptBlock`` when a blob is missing or unreadable (the engine rebuilds it from text);
    ``Unavailable`` (``StorageUnavailable``) when the storage itself cannot be reached: the server answers 503.
    """

    def put(self, data: bytes, *, replace: bool = False) -> str:
        """Store ``data`` durably and return its id (``blob_id_of(data)``); returns only once the bytes are
        stored. A put of bytes already stored makes the blob count as new for :meth:`ids_older_than` (an ingest
        reusing an old unreferenced blob is protected by the orphan grace period). ``replace`` rewrites a blob
        that is present (rebuilding a damaged one)."""
        ...

    def get(self, blob_id: str) -> bytes:
        """The blob's bytes, exactly as put; ``CorruptBlock`` when missing or unreadable."""
        ...

    def exists(self, blob_id: str) -> bool: ...

    def delete(self, blob_id: str) -> None:
        """Remove the blob; deleting a missing blob is not an error."""
        ...

    def ids(self) -> Iterator[str]:
        """Every stored blob id, in no particular order."""
        ...

    def ids_older_than(self, cutoff: float) -> Iterator[str]:
        """Ids of the blobs last written before ``cutoff`` (seconds since the epoch), for orphan collection.

        Conservative: a blob whose write time is uncertain (object stores keep whole seconds) counts as newer.
        One listing, not one request per blob."""
        ...


class LocalFilesBlobStore(LocalBlobStore):
    """Files under the data dir (:class:`LocalBlobStore`) with the rest of the contract: a write time
    for orphan collection (the file's mtime), refreshed when a put finds the blob already there."""

    def _path(self, blob_id: str) -> Path:
        if not _BLOB_ID.fullmatch(blob_id):  # the base class's ``^...$`` lets a trailing newline through
            raise CorruptBlock(f"malformed blob id {blob_id!r}")
        return super()._path(blob_id)

    def put(self, data: bytes, *, replace: bool = False) -> str:
        blob_id = super().put(data, replace=replace)
        try:  # the base class skips the write of a blob already present; its age restarts all the same
            os.utime(self._path(blob_id))
        except FileNotFoundError:  # deleted in between by another thread: the next put writes it again
            pass
        return blob_id

    def ids_older_than(self, cutoff: float) -> Iterator[str]:
        for blob_id in self.ids():
            try:
                if self._path(blob_id).stat().st_mtime < cutoff:
                    yield blob_id
            except FileNotFoundError:
                continue


def cache_dir_for(local_dir: Path) -> Path:
    """Where the object store's read cache of ``local_dir``'s blobs lives: beside it, never inside it (a local
    blob folder left from before a move to the object store is never evicted as if it were cache)."""
    return local_dir.parent / "blob-cache" / local_dir.name


def open_blob_store(url: str | None, local_dir: Path, *, cache_bytes: int = 4 << 30, allow_http: bool = False,
                    env: Mapping[str, str] | None = None) -> BlobStore:
    """The blob store for ``url`` (``KVRAG_BLOB_URL``): None or empty = files in ``local_dir``;
    ``s3://BUCKET/PREFIX`` = the objects under ``PREFIX/<local_dir name>/`` (so ``blobs`` and ``session-blobs``
    stay apart as on disk), read through a cache of ``cache_bytes`` in :func:`cache_dir_for`.

    An object store is checked here: a missing bucket, refused credentials or an unreachable endpoint raise
    ``StorageUnavailable`` with one line saying which; a malformed URL or a plain-HTTP endpoint off loopback
    (unless ``allow_http``) raise ``ValidationFailed``. ``env`` defaults to the process environment.
    """
    if not url:
        return LocalFilesBlobStore(local_dir)
    from kvstore.storage.s3 import S3BlobStore  # the object-store client loads only when one is configured

    return S3BlobStore.from_url(url, namespace=local_dir.name, cache_dir=cache_dir_for(local_dir),
                                cache_bytes=cache_bytes, allow_http=allow_http,
                                env=os.environ if env is None else env)


__all__ = ["BlobStore", "LocalFilesBlobStore", "cache_dir_for", "open_blob_store"]
