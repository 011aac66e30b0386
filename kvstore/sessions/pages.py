"""A session's KV as stored: pages of at most the bank's block size, one codec blob each, in a blob store of
the sessions' own (the documents' orphan collection never sees these blobs).

Blobs are content-addressed, so two sessions may share one; a blob goes only when no page references it.
An append writes its blobs before the transaction that acknowledges it: one that died in between leaves
unreferenced blobs, which ``collect_orphans`` removes after a grace period.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from kvstore.codec.format import decode_block, encode_block
from kvstore.storage.blobstore import BlobStore
from kvstore.storage.catalog import BankRow
from kvstore.storage.replication import blob_gc_lock
from kvstore.storage.session_tables import SessionPageRow
from kvstore.types import BlockKV

PageRef = tuple[str, int, int]  # (blob id, tokens, stored bytes) of one written page


def split_pages(kv: BlockKV, page_tokens: int) -> list[BlockKV]:
    """Split ``kv`` [layers, kv_heads, tokens, head_dim] into consecutive pages of at most ``page_tokens``."""
    return [BlockKV(k=kv.k[:, :, i:i + page_tokens].contiguous(), v=kv.v[:, :, i:i + page_tokens].contiguous())
            for i in range(0, kv.tokens, page_tokens)]


def write_segment_pages(blobs: BlobStore, bank: BankRow, new: BlockKV, token_counts: Sequence[int]
                        ) -> tuple[list[list[PageRef]], list[BlockKV]]:
    """Page and store the KV of consecutive segments (``new`` holds them one after another, ``token_counts``
    each one's length): per segment its pages' refs, and every page as decoded back from its blob (the live
    state keeps exactly what a reload from the blobs would give, lossy codecs too)."""
    written: list[list[PageRef]] = []
    decoded: list[BlockKV] = []
    row = 0
    for n in token_counts:
        seg_kv = BlockKV(k=new.k[:, :, row:row + n], v=new.v[:, :, row:row + n])
        row += n
        pages = []
        for page in split_pages(seg_kv, bank.block_tokens):
            data = encode_block(page, bank.model_fingerprint, bank.codec)
            pages.append((blobs.put(data), page.tokens, len(data)))
            decoded.append(decode_block(data, bank.model_fingerprint))
        written.append(pages)
    return written, decoded


def drop_unreferenced(s: Session, blobs: BlobStore, blob_ids: set[str]) -> None:
    """Delete those of ``blob_ids`` no page references any more (under the blob GC lock, so that no append on
    another replica adds a reference in between)."""
    if not blob_ids:
        return
    blob_gc_lock(s, exclusive=True)
    for blob_id in blob_ids:
        if not s.scalar(select(func.count()).select_from(SessionPageRow).where(SessionPageRow.blob_id == blob_id)):
            blobs.delete(blob_id)
    s.commit()


def collect_orphans(s: Session, blobs: BlobStore, grace_s: float) -> int:
    """Delete blobs no page references, older than ``grace_s`` seconds (the grace period spares another
    process's append still in flight). Returns how many went."""
    cutoff = time.time() - grace_s
    removed = 0
    blob_gc_lock(s, exclusive=True)  # appends on other replicas hold it shared from their puts to commit
    old = list(blobs.ids_older_than(cutoff))
    referenced = set(s.scalars(select(SessionPageRow.blob_id).distinct()))
    for blob_id in old:
        if blob_id not in referenced:
            blobs.delete(blob_id)
            removed += 1
    s.commit()
    return removed
