"""The write path: put and delete documents.

Writes follow one order so a crash at any point loses nothing acknowledged and leaves no half state: encode
and write blobs (content-addressed, atomic) -> one catalog transaction (document version, blocks, op-log
entry) -> FAISS (derived; replayed from the op log after a crash).
"""

from __future__ import annotations

import hashlib
import json
import threading
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from kvstore.banks.documents import block_count, doc_info, find_document, validate_doc_id
from kvstore.banks.service import BudgetEnforcer, check_model
from kvstore.config import Settings
from kvstore.errors import PayloadTooLarge, ValidationFailed, VersionMismatch
from kvstore.ingest.encoder import BlockEncoder
from kvstore.memory.hot import HotCache
from kvstore.memory.policy import as_utc
from kvstore.memory.warmup import warm_new_blocks
from kvstore.model.loader import LoadedModel
from kvstore.ports import BankLookup, BlobDropper
from kvstore.storage.catalog import BlockRow, DocumentRow, OpLogRow, utcnow
from kvstore.storage.indexes import BankIndexes
from kvstore.storage.replication import blob_gc_lock, claim_version
from kvstore.storage.token_ids import ids_to_bytes
from kvstore.types import PutResult


class IngestHook(Protocol):
    """Told of every stored document (:meth:`kvstore.contextmap.service.ContextMaps.on_ingest`)."""

    def on_ingest(self, bank: str, doc_id: str, text: str, agent: str | None) -> None: ...


def expiry(expires_at: datetime | None, ttl_s: float | None) -> datetime | None:
    """The UTC expiry time from an absolute time (naive means UTC) or a time to live in seconds."""
    if ttl_s is not None:
        if isinstance(ttl_s, bool) or not isinstance(ttl_s, int | float) or not 0 < ttl_s < 1e10:
            raise ValidationFailed("ttl_s must be a positive number of seconds")
        expires_at = utcnow() + timedelta(seconds=ttl_s)
    if expires_at is not None and not isinstance(expires_at, datetime):
        raise ValidationFailed("expires_at must be a datetime")
    aware = as_utc(expires_at)
    return aware.astimezone(UTC) if aware is not None else None


def claim(s: Session, doc: DocumentRow, doc_id: str, if_match: int | None) -> None:
    """Take the document's next version in the database (a conditional UPDATE, kvstore.storage.replication): a
    writer that lost the race to another process answers as a failed If-Match does, and changes nothing."""
    if not claim_version(s, doc, doc.version):
        s.rollback()
        if if_match is not None:
            raise VersionMismatch(f"document version is no longer {if_match}: written concurrently")
        raise VersionMismatch(f"document {doc_id!r} was written concurrently; retry")


def check_if_match(doc: DocumentRow | None, if_match: int | None) -> None:
    if if_match is None:
        return
    current = doc.version if doc is not None else 0
    if current != if_match:
        raise VersionMismatch(f"document version is {current}, not {if_match}")


class DocumentWriter:
    """Puts and deletes documents of any bank; holds the blob lock around each catalog write."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], banks: BankLookup, llm: LoadedModel,
                 encoder: BlockEncoder, blob_lock: threading.Lock, indexes: BankIndexes, gc: BlobDropper,
                 memory: BudgetEnforcer, on_ingest: IngestHook, hot: HotCache) -> None:
        self.settings = settings
        self.sessions = sessions
        self.banks = banks
        self.llm = llm
        self.encoder = encoder
        self.blob_lock = blob_lock
        self.indexes = indexes
        self.gc = gc
        self.memory = memory
        self.on_ingest = on_ingest
        self.hot = hot

    def validate(self, text: str, metadata: Any, tags: Any) -> None:
        limits = self.settings
        if not isinstance(text, str) or not text.strip():
            raise ValidationFailed("document text must be a non-empty string")
        if len(text) > limits.max_document_chars:
            raise PayloadTooLarge(f"document text exceeds {limits.max_document_chars} characters")
        if metadata is not None and not isinstance(metadata, dict):
            raise ValidationFailed("metadata must be an object")
        if metadata and len(json.dumps(metadata, ensure_ascii=False).encode()) > limits.max_metadata_bytes:
            raise ValidationFailed(f"metadata exceeds {limits.max_metadata_bytes} bytes")
        if tags is not None and (not isinstance(tags, list) or not all(isinstance(t, str) for t in tags)):
            raise ValidationFailed("tags must be a list of strings")

    def put(self, bank: str, doc_id: str, text: str, *, metadata: dict[str, Any] | None = None,
            tags: list[str] | None = None, pinned: bool = False, agent: str | None = None,
            if_match: int | None = None, importance: float | None = None,
            expires_at: datetime | None = None, ttl_s: float | None = None) -> PutResult:
        """Store a document. Same text again is a no-op; new text is a new version (old blocks retired
        in the same transaction). ``if_match`` is the version the writer last saw (0: must not exist).
        ``importance`` (>= 0) raises the document's blocks in eviction order; ``expires_at`` or ``ttl_s``
        stops serving it then (maintenance removes it). The bank's budget holds when this returns."""
        validate_doc_id(doc_id)
        self.validate(text, metadata, tags)
        expires_at = expiry(expires_at, ttl_s)
        if importance is not None and (isinstance(importance, bool) or not isinstance(importance, int | float)
                                       or not 0 <= importance < float("inf")):
            raise ValidationFailed("importance must be a non-negative number")
        content_hash = hashlib.sha256(text.encode()).hexdigest()
        with self.sessions() as s:
            bank_row = self.banks.row(s, bank)
            check_model(bank_row, self.llm)
            doc = find_document(s, bank_row, doc_id, required=False)
            check_if_match(doc, if_match)
            meta_changed = doc is not None and (doc.meta != (metadata or {}) or doc.tags != (tags or [])
                                                or doc.pinned != pinned or doc.importance != importance
                                                or as_utc(doc.expires_at) != expires_at)
            if doc is not None and doc.content_hash == content_hash:
                if meta_changed:
                    claim(s, doc, doc_id, if_match)
                    doc.meta, doc.tags, doc.pinned = metadata or {}, tags or [], pinned
                    doc.importance, doc.expires_at = importance, expires_at
                    doc.updated_at = utcnow()
                    if agent is not None:
                        doc.agent = agent
                    s.commit()
                return PutResult(doc_info(doc, block_count(s, doc.id)), created=False, changed=meta_changed)
        encoded = self.encoder.encode(bank_row, text)
        with self.sessions() as s, self.blob_lock:
            # The blobs were written outside the lock: since then a delete or orphan collection (here or on another
            # replica) may have removed a blob of the same content (blobs are shared by content). Writing again
            # under the collection lock, held until this transaction commits, keeps them until it references them.
            blob_gc_lock(s, exclusive=False)
            for block in encoded:
                self.encoder.blobs.put(block.data)
            bank_row = self.banks.row(s, bank)
            doc = find_document(s, bank_row, doc_id, required=False)
            check_if_match(doc, if_match)
            created = doc is None
            removed: list[int] = []
            old_blobs: set[str] = set()
            now = utcnow()
            if doc is None:
                doc = DocumentRow(bank_id=bank_row.id, doc_id=doc_id, version=1, created_at=now)
                s.add(doc)
            else:
                claim(s, doc, doc_id, if_match)  # before its blocks go: the loser must change nothing
                old = s.execute(select(BlockRow.id, BlockRow.blob_id).where(BlockRow.document_id == doc.id)).all()
                removed = [r.id for r in old]
                old_blobs = {r.blob_id for r in old if r.blob_id}
                s.execute(delete(BlockRow).where(BlockRow.document_id == doc.id))
            doc.text, doc.content_hash, doc.meta, doc.tags = text, content_hash, metadata or {}, tags or []
            doc.pinned, doc.agent, doc.updated_at = pinned, agent, now
            doc.importance, doc.expires_at = importance, expires_at
            doc.tokens = sum(len(b.token_ids) for b in encoded)
            s.flush()
            fp16_bytes = self.encoder.runner.bytes_per_token_fp16
            rows = [BlockRow(bank_id=bank_row.id, document_id=doc.id, ordinal=i, token_count=len(b.token_ids),
                             text=b.text, token_ids=ids_to_bytes(b.token_ids),
                             embedding=b.embedding.astype("<f4").tobytes(), blob_id=b.blob_id, kv_summary=b.summary,
                             codec=bank_row.codec, raw_bytes=len(b.token_ids) * fp16_bytes, stored_bytes=len(b.data),
                             agent=agent, status="live", access_count=0, importance=0.0, created_at=now)
                    for i, b in enumerate(encoded)]
            s.add_all(rows)
            s.flush()
            op = OpLogRow(bank_id=bank_row.id, op="put", doc_id=doc_id, version=doc.version,
                          added=[r.id for r in rows], removed=removed, agent=agent)
            s.add(op)
            try:
                s.commit()
            except IntegrityError:
                # A concurrent writer created the same document first.
                s.rollback()
                raise VersionMismatch(f"document {doc_id!r} was written concurrently; retry") from None
            self.indexes.apply(s, bank_row, op, rows)
            self.gc.drop_unreferenced(s, old_blobs - {r.blob_id for r in rows})
            self.memory.enforce_budget(s, bank_row)
            self.on_ingest.on_ingest(bank, doc_id, text, agent)
            result = PutResult(doc_info(doc, len(rows)), created=created, changed=True)
            fingerprint, bank_id = bank_row.model_fingerprint, bank_row.id
        if self.settings.hot_tier_on_ingest:  # outside the blob lock: decoding must not hold up other writers
            warm_new_blocks(self.hot, bank_id, [(b.blob_id, b.data) for b in encoded], fingerprint,
                            self.llm.device)
        return result

    def delete(self, bank: str, doc_id: str, *, if_match: int | None = None, agent: str | None = None) -> None:
        with self.sessions() as s, self.blob_lock:
            bank_row = self.banks.row(s, bank)
            doc = find_document(s, bank_row, doc_id)
            assert doc is not None
            check_if_match(doc, if_match)
            version = doc.version
            claim(s, doc, doc_id, if_match)
            old = s.execute(select(BlockRow.id, BlockRow.blob_id).where(BlockRow.document_id == doc.id)).all()
            s.execute(delete(BlockRow).where(BlockRow.document_id == doc.id))
            s.delete(doc)
            op = OpLogRow(bank_id=bank_row.id, op="delete", doc_id=doc_id, version=version, added=[],
                          removed=[r.id for r in old], agent=agent)
            s.add(op)
            s.commit()
            self.indexes.apply(s, bank_row, op, [])
            self.gc.drop_unreferenced(s, {r.blob_id for r in old if r.blob_id})
