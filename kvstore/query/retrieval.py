"""Retrieval: the top-k blocks of a bank for a question, by embedding similarity, optionally reranked.

Filters (agent, tags, metadata) apply before the top k; expired blocks are never returned. The index is
derived data, so a hit counts only when the catalog says the block is this bank's.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from kvstore.config import Settings
from kvstore.errors import ValidationFailed
from kvstore.memory.policy import expired_block_ids
from kvstore.model.loader import Embedder
from kvstore.ports import BankLookup
from kvstore.query.rerank import KV_MODES, RETRIEVAL_MODES, rerank_scores
from kvstore.storage.catalog import BankRow, BlockRow, DocumentRow, utcnow
from kvstore.storage.indexes import BankIndexes
from kvstore.types import Hit, SearchFilter

Retrieved = tuple[BlockRow, DocumentRow, float]  # a block, its document and its score


class KVScorer(Protocol):
    """KV-utility of blocks for a question (:class:`kvstore.query.keysummary.KeySummaries`)."""

    def scores(self, s: Session, bank: BankRow, question: str, blocks: list[BlockRow]) -> np.ndarray: ...


def to_hit(block: BlockRow, doc: DocumentRow, score: float) -> Hit:
    return Hit(doc_id=doc.doc_id, block_id=block.id, score=round(score, 6), text=block.text,
               metadata=dict(doc.meta or {}), agent=doc.agent, ordinal=block.ordinal)


def allowed_ids(s: Session, bank: BankRow, flt: SearchFilter) -> np.ndarray:
    """Ids of the bank's live blocks whose document passes the filter, shape ``[n]`` int64."""
    q = select(BlockRow.id, DocumentRow.tags, DocumentRow.meta).join(
        DocumentRow, DocumentRow.id == BlockRow.document_id).where(
        BlockRow.bank_id == bank.id, BlockRow.status == "live")
    if flt.agent is not None:
        q = q.where(DocumentRow.agent == flt.agent)
    keep = []
    want_tags = set(flt.tags)
    for block_id, tags, meta in s.execute(q):
        if want_tags and not want_tags.issubset(set(tags or [])):
            continue
        if any((meta or {}).get(key) != value for key, value in flt.metadata.items()):
            continue
        keep.append(block_id)
    return np.asarray(keep, dtype=np.int64)


class Retriever:
    """Embedding shortlist from the bank's index, then the reranker ``retrieval`` names (if any)."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], banks: BankLookup, embedder: Embedder,
                 indexes: BankIndexes, kv_scorer: KVScorer) -> None:
        self.settings = settings
        self.sessions = sessions
        self.banks = banks
        self.embedder = embedder
        self.indexes = indexes
        self.kv_scorer = kv_scorer

    def search(self, bank: str, query: str, *, k: int = 5, filter: SearchFilter | None = None,
               retrieval: str | None = None) -> list[Hit]:
        """Top-k blocks by embedding similarity (filters applied before top-k), or of the embedding's
        ``rerank_candidates`` reranked by ``retrieval`` (default ``Settings.default_retrieval``)."""
        with self.sessions() as s:
            bank_row = self.banks.row(s, bank)
            return [to_hit(b, d, sc) for b, d, sc in self.retrieve(s, bank_row, query, k, filter, retrieval)]

    def embed(self, query: str) -> np.ndarray | None:
        """The query's embedding ``[dim]``, computed before a caller opens its catalog session (None for a
        query :meth:`retrieve` refuses: it answers for that)."""
        return self.embedder.embed([query])[0] if isinstance(query, str) and query.strip() else None

    def retrieve(self, s: Session, bank: BankRow, query: str, k: int, flt: SearchFilter | None,
                 retrieval: str | None = None, vec: np.ndarray | None = None) -> list[Retrieved]:
        """Top k of ``bank`` for ``query``; ``vec`` is its embedding when the caller computed it already."""
        if not isinstance(query, str) or not query.strip():
            raise ValidationFailed("query must be a non-empty string")
        if not 1 <= k <= self.settings.max_k:
            raise ValidationFailed(f"k must be between 1 and {self.settings.max_k}")
        retrieval = retrieval or self.settings.default_retrieval
        if retrieval not in RETRIEVAL_MODES:
            raise ValidationFailed(f"retrieval must be one of {RETRIEVAL_MODES}")
        if retrieval == "embedding":
            return self.nearest(s, bank, query, k, flt, vec)
        # Two stages: the embedding shortlists, the reranker picks the top k of the shortlist.
        candidates = self.nearest(s, bank, query, max(k, self.settings.rerank_candidates), flt, vec)
        kv = (self.kv_scorer.scores(s, bank, query, [b for b, _, _ in candidates])
              if retrieval in KV_MODES and candidates else None)
        scores = rerank_scores(retrieval, query, [b.text for b, _, _ in candidates],
                               np.asarray([sc for _, _, sc in candidates]), kv)
        order = np.argsort(-scores, kind="stable")[:k]
        return [(candidates[i][0], candidates[i][1], float(scores[i])) for i in order.tolist()]

    def nearest(self, s: Session, bank: BankRow, query: str, k: int, flt: SearchFilter | None,
                vec: np.ndarray | None = None) -> list[Retrieved]:
        """Top-k blocks by embedding similarity, filtered and unexpired."""
        if vec is None:
            vec = self.embedder.embed([query])[0]
        allowed = None if flt is None or flt.is_empty() else allowed_ids(s, bank, flt)
        expired = np.asarray(expired_block_ids(s, bank.id, utcnow()), dtype=np.int64)
        if len(expired) and allowed is not None:
            allowed = np.setdiff1d(allowed, expired)
        # Without a filter, over-fetch by the expired count: the top k + E always holds k unexpired blocks.
        ids, scores = self.indexes.get(bank).search(vec, k + (len(expired) if allowed is None else 0), allowed)
        if len(expired) and allowed is None:
            keep = ~np.isin(ids, expired)
            ids, scores = ids[keep][:k], scores[keep][:k]
        if len(ids) == 0:
            return []
        # The index is derived data (a stale or misplaced snapshot may hold another bank's ids): a hit counts
        # only if the catalog says the block is this bank's.
        rows = {b.id: (b, d) for b, d in s.execute(select(BlockRow, DocumentRow).join(
            DocumentRow, DocumentRow.id == BlockRow.document_id).where(
            BlockRow.bank_id == bank.id, BlockRow.id.in_(ids.tolist()))).tuples()}
        return [(rows[i][0], rows[i][1], float(sc)) for i, sc in zip(ids.tolist(), scores.tolist(), strict=True)
                if i in rows]
