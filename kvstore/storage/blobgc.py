"""Deleting blobs no block references any more, and the decoded copies of banks that dropped them."""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session

from kvstore.storage.blobstore import BlobStore
from kvstore.storage.catalog import BlockRow
from kvstore.storage.replication import blob_gc_lock


class DecodedCopies(Protocol):
    """The hot tier as the collector sees it (:class:`kvstore.memory.hot.HotCache`)."""

    def discard_everywhere(self, key: str, keep: Collection[int] = ()) -> None: ...


class BlobCollector:
    """Blobs are shared by content across blocks and banks, so one is deleted only when no block holds it."""

    def __init__(self, blobs: BlobStore, hot: DecodedCopies) -> None:
        self.blobs = blobs
        self.hot = hot

    def drop_unreferenced(self, s: Session, blob_ids: Iterable[str | None]) -> None:
        """Delete blobs no block references any more (callers hold the blob lock, and have committed: the check
        and the delete run in a transaction of their own under the collection lock, which a writer about to
        reference one of these blobs on another replica waits for)."""
        candidates = [b for b in blob_ids if b]
        if not candidates:
            return
        blob_gc_lock(s, exclusive=True)
        for blob_id in candidates:
            holders = set(s.scalars(select(BlockRow.bank_id).where(BlockRow.blob_id == blob_id).distinct()))
            if not holders:
                self.blobs.delete(blob_id)
            # Only the banks that no longer reference it lose their decoded copy: another bank's copy is its own.
            self.hot.discard_everywhere(blob_id, keep=holders)
        s.commit()
