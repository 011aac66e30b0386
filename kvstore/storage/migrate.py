"""Move a data dir's local blobs into an object store (``kvrag blobs migrate --to s3://BUCKET/PREFIX``).

Each local blob is read and checked against its name (SHA-256) before it is uploaded, and the upload carries the
checksum the store verifies; a blob the store already holds is skipped, so a run that stopped half way is resumed
by running it again (idempotent). Damaged local blobs are reported and left where they are (the engine rebuilds
such a block from its stored text). The data dir's lock is held throughout: no server may write it meanwhile.
Local files are deleted only on request, and only once the store confirms the object.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kvstore.errors import CorruptBlock
from kvstore.storage import lock as data_dir_lock
from kvstore.storage.blobstore import BlobStore, LocalFilesBlobStore, open_blob_store
from kvstore.storage.local import blob_id_of

NAMESPACES = ("blobs", "session-blobs")


@dataclass
class MigrationReport:
    target: str
    copied: int = 0
    already_there: int = 0
    damaged: list[str] = field(default_factory=list)
    deleted_local: int = 0
    bytes_copied: int = 0


def migrate_blobs(data_dir: Path, url: str, *, delete_local: bool = False, allow_http: bool = False,
                  progress: Callable[[int], None] | None = None) -> MigrationReport:
    """Copy every blob under ``data_dir`` (documents and agent sessions) into the object store at ``url``."""
    held = data_dir_lock.acquire(data_dir)
    try:
        report = MigrationReport(target=url)
        for name in NAMESPACES:
            local_dir = data_dir / name
            if not local_dir.is_dir():
                continue
            local = LocalFilesBlobStore(local_dir)
            target = open_blob_store(url, local_dir, cache_bytes=0, allow_http=allow_http)
            for blob_id in sorted(local.ids()):
                _move_one(local, target, blob_id, report, delete_local)
                if progress is not None:
                    progress(1)
        return report
    finally:
        held.release()


def _move_one(local: LocalFilesBlobStore, target: BlobStore, blob_id: str, report: MigrationReport,
              delete_local: bool) -> None:
    try:
        data = local.get(blob_id)
    except CorruptBlock:
        report.damaged.append(blob_id)
        return
    if blob_id_of(data) != blob_id:
        report.damaged.append(blob_id)
        return
    if target.exists(blob_id):
        report.already_there += 1
    else:
        target.put(data)
        if not target.exists(blob_id):  # the store acknowledged the put: this only guards a store that lies
            raise CorruptBlock(f"blob {blob_id[:12]} is not in the object store after its upload")
        report.copied += 1
        report.bytes_copied += len(data)
    if delete_local:
        local.delete(blob_id)
        report.deleted_local += 1


def count_local(data_dir: Path) -> int:
    """How many local blobs a migration of ``data_dir`` will look at."""
    return sum(1 for name in NAMESPACES if (data_dir / name).is_dir()
               for _ in LocalFilesBlobStore(data_dir / name).ids())


__all__ = ["MigrationReport", "count_local", "migrate_blobs"]
