"""Where each block of a bank lives (hot, warm or cold), as counted in a bank's stats and listed page by page.

A block is **hot** when its decoded KV is in the bank's hot tier, **warm** when its compressed blob is stored
(``BlockRow.blob_id`` set), **cold** when only its text, token ids and embedding are (``blob_id`` None).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import case, func, or_, select
from sqlalchemy.orm import Session

from kvstore.memory.hot import HotCache
from kvstore.memory.policy import MemoryConfig, as_utc, decayed
from kvstore.storage.catalog import BankRow, BlockRow, DocumentRow


def cold_key(fingerprint: str, token_ids: bytes) -> str:
    """Hot-tier key of a cold block's on-the-fly KV: by content, so duplicates within a bank share it (the
    hot tier is partitioned by bank, so other banks never do)."""
    return "cold-" + hashlib.sha256(fingerprint.encode() + token_ids).hexdigest()


def tier_stats(s: Session, bank_id: int, hot: HotCache, fingerprint: str) -> dict[str, dict[str, int]]:
    """Blocks and bytes per tier. warm bytes: distinct blobs on disk; hot bytes: decoded KV in RAM;
    cold bytes: what the catalog keeps for them (text, token ids, embedding)."""
    cold = or_(BlockRow.blob_id.is_(None), BlockRow.blob_id == "")
    # Token ids only for cold blocks (their hot-tier key hashes them): a warm block's key is its blob id, and
    # reading every block's ids made this the slowest part of a large bank's stats.
    rows = s.execute(select(BlockRow.blob_id, BlockRow.stored_bytes,
                            case((cold, BlockRow.token_ids), else_=None),
                            func.length(BlockRow.text), func.length(BlockRow.embedding)).where(
        BlockRow.bank_id == bank_id, BlockRow.status == "live")).all()
    warm_bytes: dict[str, int] = {}
    hot_keys: set[str] = set()
    hot_blocks = warm_blocks = cold_blocks = cold_bytes = 0
    for blob_id, stored, token_ids, text_len, emb_len in rows:
        key = blob_id or cold_key(fingerprint, token_ids)
        if hot.contains(bank_id, key):  # this bank's copy only: another bank's use of the text never shows
            hot_blocks += 1
            hot_keys.add(key)
        if blob_id:
            warm_blocks += 1
            warm_bytes[blob_id] = max(warm_bytes.get(blob_id, 0), int(stored))
        else:
            cold_blocks += 1
            cold_bytes += len(token_ids) + int(text_len or 0) + int(emb_len or 0)
    return {"hot": {"blocks": hot_blocks, "bytes": sum(hot.size_of(bank_id, k) for k in hot_keys)},
            "warm": {"blocks": warm_blocks, "bytes": sum(warm_bytes.values())},
            "cold": {"blocks": cold_blocks, "bytes": cold_bytes}}


@dataclass
class BlockInfo:
    """A block as listed: where it lives (tier: hot | warm | cold), its codec, sizes and heat decayed to now."""

    block_id: int
    doc_id: str
    ordinal: int
    tokens: int
    tier: str
    status: str  # live | quarantined
    codec: str
    raw_bytes: int
    stored_bytes: int  # the blob's size (0 for a cold block: no blob)
    heat: float
    access_count: int
    last_access_at: datetime | None
    merged_into: int | None


def block_page(s: Session, bank: BankRow, hot: HotCache, config: MemoryConfig, *, cursor: int | None, limit: int,
               document_pk: int | None = None) -> tuple[list[BlockInfo], int | None]:
    """One page of a bank's blocks (or one document's) in id order, after block id ``cursor``, with the next
    cursor (None on the last page). One query: the page's columns and doc ids, never text or embeddings."""
    q = select(BlockRow.id, DocumentRow.doc_id, BlockRow.ordinal, BlockRow.token_count, BlockRow.blob_id,
               BlockRow.token_ids, BlockRow.status, BlockRow.codec, BlockRow.raw_bytes, BlockRow.stored_bytes,
               BlockRow.heat, BlockRow.access_count, BlockRow.last_access_at, BlockRow.merged_into).join(
        DocumentRow, DocumentRow.id == BlockRow.document_id).where(BlockRow.bank_id == bank.id)
    if document_pk is not None:
        q = q.where(BlockRow.document_id == document_pk)
    if cursor is not None:
        q = q.where(BlockRow.id > cursor)
    rows = s.execute(q.order_by(BlockRow.id).limit(limit + 1)).all()
    now = datetime.now(UTC)
    page = []
    for r in rows[:limit]:
        key = r.blob_id or cold_key(bank.model_fingerprint, r.token_ids)
        tier = "hot" if hot.contains(bank.id, key) else ("warm" if r.blob_id else "cold")
        page.append(BlockInfo(block_id=r.id, doc_id=r.doc_id, ordinal=r.ordinal, tokens=r.token_count, tier=tier,
                              status=r.status, codec=r.codec, raw_bytes=int(r.raw_bytes),
                              stored_bytes=int(r.stored_bytes) if r.blob_id else 0,
                              heat=round(decayed(float(r.heat), r.last_access_at, now, config.heat_half_life_s), 4),
                              access_count=int(r.access_count), last_access_at=as_utc(r.last_access_at),
                              merged_into=r.merged_into))
    return page, (rows[limit - 1].id if len(rows) > limit else None)
