"""The facade the server and CLI use: banks, documents, search, query, stats.

Writes follow one order so a crash at any point loses nothing acknowledged and leaves no half
state: encode and write blobs (content-addressed, atomic) -> one catalog transaction (document
version, blocks, op-log entry) -> FAISS (derived; replayed from the op log after a crash).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import numpy as np
from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from kvstore.codec.format import check_choosable, decode_block, default_codec, encode_block, get_preset
from kvstore.config import Settings
from kvstore.contextmap.service import ContextMaps
from kvstore.errors import (
    BadRequest,
    Conflict,
    CorruptBlock,
    IncompatibleModel,
    KVRagError,
    NotFound,
    PayloadTooLarge,
    ValidationFailed,
    VersionMismatch,
)
from kvstore.ingest.chunking import chunk_text
from kvstore.memory.budget import KVBudget
from kvstore.memory.hot import HotCache, bank_of_resident_key
from kvstore.memory.tiers import (
    BlockInfo,
    MemoryManager,
    as_utc,
    block_page,
    expired_block_ids,
    record_access,
    tier_stats,
)
from kvstore.memory.warmup import warm_new_blocks
from kvstore.model.attention_bias import measured_block_bias
from kvstore.model.batching import BatchRequest, QuestionBatcher
from kvstore.model.compaction import CompactionSpec, compact, prefill_attention
from kvstore.model.limits import limits_of
from kvstore.model.loader import Embedder, LoadedModel, load_llm
from kvstore.model.recompute import blend, blend_and_ask, default_ratio
from kvstore.model.runner import BlockKV, Runner, set_threads
from kvstore.query.keysummary import KeySummaries
from kvstore.query.rerank import KV_MODES, RETRIEVAL_MODES, rerank_scores
from kvstore.sessions.service import sessions_of
from kvstore.storage import lock as data_dir_lock
from kvstore.storage.bank_settings import check_bank_limits
from kvstore.storage.blobstore import BlobStore, open_blob_store
from kvstore.storage.catalog import BankRow, BlockRow, DocumentRow, OpLogRow, open_catalog, utcnow
from kvstore.storage.index import BankIndex
from kvstore.storage.querylog import LoggedQuery, QueryLogEntry
from kvstore.storage.querylog import recent as recent_log
from kvstore.storage.querylog import record as record_log
from kvstore.storage.replication import Replication, blob_gc_lock, claim_version, open_replication
from kvstore.types import (  # noqa: F401  (re-exported: kvstore.bank.Hit and friends stay importable)
    BankInfo,
    BankStats,
    DocumentInfo,
    Hit,
    PutResult,
    QueryResult,
    SearchFilter,
    Timings,
    Usage,
)

log = logging.getLogger(__name__)

BANK_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
DOC_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
EVICTION_POLICIES = ("lru", "importance", "hybrid")
Mode = Literal["kv", "text"]
_SNAPSHOT_EVERY_OPS = 256


# -- helpers --------------------------------------------------------------------------------------


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


def _ids_bytes(ids: list[int]) -> bytes:
    return np.asarray(ids, dtype="<i4").tobytes()


def _bytes_ids(data: bytes) -> list[int]:
    return np.frombuffer(data, dtype="<i4").astype(int).tolist()


def validate_bank_name(name: str) -> None:
    if not isinstance(name, str) or not BANK_NAME.match(name):
        raise ValidationFailed("bank name must match [a-z0-9][a-z0-9_-]{0,62}")


def validate_doc_id(doc_id: str) -> None:
    if not isinstance(doc_id, str) or not DOC_ID.match(doc_id):
        raise ValidationFailed("document id must match [A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


def _bank_info(row: BankRow) -> BankInfo:
    return BankInfo(name=row.name, codec=row.codec, model=row.model_name, model_fingerprint=row.model_fingerprint,
                    block_tokens=row.block_tokens, budget_bytes=row.budget_bytes, max_blocks=row.max_blocks,
                    eviction=row.eviction, created_at=row.created_at)


def _doc_info(row: DocumentRow, blocks: int, with_text: bool = False) -> DocumentInfo:
    return DocumentInfo(doc_id=row.doc_id, version=row.version, metadata=dict(row.meta or {}),
                        tags=list(row.tags or []), agent=row.agent, pinned=row.pinned, blocks=blocks,
                        tokens=row.tokens, content_hash=row.content_hash, created_at=row.created_at,
                        updated_at=row.updated_at, text=row.text if with_text else None)


# -- the store ------------------------------------------------------------------------------------


class BankStore:
    """All banks of one kvrag process: catalog, blobs, FAISS indexes, hot tier and the model."""

    def __init__(self, settings: Settings | None = None, *, llm: LoadedModel | None = None,
                 embedder: Embedder | None = None, migrate: bool = True) -> None:
        self.settings = settings or Settings()
        # One process per data dir (kvstore.storage.lock): refused before anything is opened or migrated.
        self._dir_lock = data_dir_lock.acquire(self.settings.data_dir)
        self._catalog_lock: data_dir_lock.DataDirLock | None = None
        try:
            self._catalog_lock = data_dir_lock.acquire_sqlite_catalog(self.settings.resolved_database_url())
            self._open(llm, embedder, migrate)
        except BaseException:  # a refused or failed start leaves the data dir (and catalog) free
            if self._catalog_lock is not None:
                self._catalog_lock.release()
            self._dir_lock.release()
            raise

    def _open(self, llm: LoadedModel | None, embedder: Embedder | None, migrate: bool) -> None:
        set_threads(self.settings.torch_threads)
        self.sessions: sessionmaker[Session] = open_catalog(self.settings.resolved_database_url(), migrate=migrate,
                                                              settings=self.settings)
        self.blobs: BlobStore = open_blob_store(self.settings.blob_url, self.settings.data_dir / "blobs",
                                                cache_bytes=self.settings.blob_cache_bytes,
                                                allow_http=self.settings.blob_allow_http)
        # Every KV kept in memory (hot tier, context-map KV, session states) shares one budget, per bank.
        self.kv_memory = KVBudget(self.settings.kv_memory_bytes, bank_bytes=self.settings.kv_memory_bank_bytes)
        self.hot = HotCache(self.settings.hot_tier_bytes, kv=self.kv_memory)
        self.memory = MemoryManager(self)
        self.context_map = ContextMaps(self)
        self.embedder = embedder or Embedder(self.settings)
        self.llm = llm or load_llm(self.settings)
        bias = self.settings.block_bias
        self.runner = Runner(self.llm, self.settings.system_prompt, self.settings.device_cache_bytes,
                             measured_block_bias(self.llm.name) if bias is None else bias)
        self.model_lock = threading.Lock()
        self.batcher = QuestionBatcher(self.runner, self.model_lock, self.settings.batch_max_size)
        self.summaries = KeySummaries(self)
        if self.llm.device.type == "cuda":
            self.hot.pin_dtype = self.llm.dtype
        self.blob_lock = threading.Lock()
        self._indexes: dict[int, BankIndex] = {}
        self._index_lock = threading.Lock()
        self._ops_since_snapshot: dict[int, int] = {}
        self._integrity: dict[str, dict[str, Any]] = {}  # per bank: damage found and repaired since start
        self._integrity_lock = threading.Lock()
        # On PostgreSQL: join the replicas (refused on another model or blob store) before loading the indexes, so
        # the follower's watermark never passes an op the loaded indexes lack.
        self.replication: Replication | None = open_replication(self.sessions, self.settings, self.llm,
                                                                self.apply_ops)
        self.load_indexes()
        if self.replication is not None:
            self.replication.start()

    # -- lifecycle --------------------------------------------------------------------------------

    def close(self) -> None:
        """Snapshot every index so the next start replays nothing; leave the replicas; free the data dir."""
        if self.replication is not None:
            self.replication.stop()
        with self.sessions() as s:
            for bank in s.scalars(select(BankRow)):
                if bank.id in self._indexes:
                    self._snapshot(s, bank)
        if self.replication is not None:
            self.replication.registry.unregister()
        self.sessions.kw["bind"].dispose()
        if self._catalog_lock is not None:
            self._catalog_lock.release()
        self._dir_lock.release()

    def _index_path(self, bank: BankRow):
        return self.settings.data_dir / "indexes" / f"bank-{bank.id}.faiss"

    def load_indexes(self) -> None:
        """Load every bank's index. A bank whose index cannot be loaded is reported and retried on first use,
        so one damaged bank never keeps the others from serving."""
        with self.sessions() as s:
            for bank in s.scalars(select(BankRow)).all():
                try:
                    self._indexes[bank.id] = self._load_index(s, bank)
                except Exception as exc:  # noqa: BLE001 - isolate the damage to this bank
                    s.rollback()
                    log.exception("bank %s: index could not be loaded; retrying on first use", bank.name)
                    self.note(bank.name, "index", f"failed to load: {type(exc).__name__}")

    def note(self, bank: str, what: str, value: Any = 1) -> None:
        """Record damage found in ``bank``: a message, or a count when ``value`` is a number."""
        with self._integrity_lock:
            entry = self._integrity.setdefault(bank, {})
            entry[what] = entry.get(what, 0) + value if isinstance(value, int) else value

    def integrity_report(self) -> dict[str, dict[str, Any]]:
        """Damage found and repaired since this process started, per bank (only banks with any):
        ``index`` (how a missing or damaged snapshot was handled), ``corrupt_blocks`` (failed their
        checksum or were missing), ``rebuilt_blocks`` (rewritten from the stored text)."""
        with self._integrity_lock:
            return {bank: dict(entry) for bank, entry in self._integrity.items()}

    def _load_index(self, s: Session, bank: BankRow) -> BankIndex:
        """Snapshot + op-log tail, or a full rebuild from the catalog."""
        path = self._index_path(bank)
        index = BankIndex.load(path, self.embedder.dim)
        if index is not None:
            tail = s.scalars(select(OpLogRow).where(OpLogRow.bank_id == bank.id, OpLogRow.seq > index.seq)
                             .order_by(OpLogRow.seq)).all()
            for op in tail:
                index.remove(np.asarray(op.removed or [], dtype=np.int64))
                self._add_rows(index, s, [int(i) for i in op.added or []])
                index.seq = op.seq
            if tail:
                log.info("bank %s: replayed %d op-log entries onto the index snapshot", bank.name, len(tail))
            return index
        index = BankIndex(self.embedder.dim)
        ids = s.scalars(select(BlockRow.id).where(BlockRow.bank_id == bank.id, BlockRow.status == "live")).all()
        self._add_rows(index, s, list(ids))
        index.seq = s.scalar(select(func.max(OpLogRow.seq)).where(OpLogRow.bank_id == bank.id)) or 0
        if path.exists():
            log.warning("bank %s: index snapshot damaged; rebuilt from the catalog (%d blocks)", bank.name,
                        index.ntotal)
            self.note(bank.name, "index", "snapshot damaged; rebuilt from the catalog")
        elif index.seq and self.replication is not None:
            # A replica: normal for a bank another replica created, or one this replica has not snapshotted yet.
            log.info("bank %s: index built from the catalog (%d blocks)", bank.name, index.ntotal)
        elif index.seq:
            # Normal after a crash before the first snapshot; worth reporting if snapshots were deleted.
            log.warning("bank %s: no index snapshot; rebuilt from the catalog (%d blocks)", bank.name, index.ntotal)
            self.note(bank.name, "index", "snapshot missing; rebuilt from the catalog")
        return index

    def _add_rows(self, index: BankIndex, s: Session, block_ids: list[int]) -> None:
        if not block_ids:
            return
        rows = s.execute(select(BlockRow.id, BlockRow.embedding).where(
            BlockRow.id.in_(block_ids), BlockRow.status == "live")).all()
        if rows:
            vecs = np.stack([np.frombuffer(r.embedding, dtype="<f4") for r in rows])
            index.add(np.asarray([r.id for r in rows], dtype=np.int64), vecs)

    def _snapshot(self, s: Session, bank: BankRow) -> None:
        index = self._indexes[bank.id]
        with index.lock:
            if self.replication is not None:
                # Other replicas' ops above the follower's watermark may not be applied yet: claim no more.
                seq = self.replication.follower.through
            else:
                seq = max(s.scalar(select(func.max(OpLogRow.seq)).where(OpLogRow.bank_id == bank.id)) or 0,
                          index.seq)
            index.save(self._index_path(bank), seq)
        self._ops_since_snapshot[bank.id] = 0

    def apply_ops(self, s: Session, ops: Sequence[OpLogRow]) -> None:
        """Apply op-log entries (another replica's writes) to the loaded indexes; idempotent, and only blocks still
        live in the catalog are added. A bank not loaded here is skipped: it loads from the catalog when used."""
        for op in ops:
            # Under the index lock: a bank loading right now (its catalog read maybe older than this op) is
            # waited for and then updated, never skipped.
            with self._index_lock:
                index = self._indexes.get(op.bank_id)
            if index is None:
                continue
            with index.lock:
                index.remove(np.asarray(op.removed or [], dtype=np.int64))
                self._add_rows(index, s, [int(i) for i in op.added or []])

    def bank_index(self, bank: BankRow) -> BankIndex:
        with self._index_lock:
            if bank.id not in self._indexes:
                with self.sessions() as s:
                    self._indexes[bank.id] = self._load_index(s, bank)
            return self._indexes[bank.id]

    # -- banks ------------------------------------------------------------------------------------

    def bank_row(self, s: Session, name: str) -> BankRow:
        if not isinstance(name, str) or not BANK_NAME.match(name):
            raise NotFound(f"bank {name!r} not found")
        row = s.scalar(select(BankRow).where(BankRow.name == name))
        if row is None:
            raise NotFound(f"bank {name!r} not found")
        return row

    def create_bank(self, name: str, *, codec: str | None = None, budget_bytes: int | None = None,
                    max_blocks: int | None = None, eviction: str = "lru",
                    block_tokens: int | None = None, context_map_budget_tokens: int | None = None) -> BankInfo:
        """Create an empty bank bound to the loaded model's fingerprint."""
        validate_bank_name(name)
        if context_map_budget_tokens is not None:
            self.context_map.check_budget(context_map_budget_tokens)
        check_choosable(codec or self.settings.default_codec)
        codec = self._resolve_codec(codec or self.settings.default_codec)
        get_preset(codec)
        if eviction not in EVICTION_POLICIES:
            raise ValidationFailed(f"eviction must be one of {EVICTION_POLICIES}")
        check_bank_limits(budget_bytes=budget_bytes, max_blocks=max_blocks)
        with self.sessions() as s:
            row = BankRow(name=name, model_fingerprint=self.llm.fingerprint, model_name=self.llm.name, codec=codec,
                          block_tokens=block_tokens or self.settings.block_tokens, budget_bytes=budget_bytes,
                          max_blocks=max_blocks, eviction=eviction, evictions=0, merges=0)
            s.add(row)
            try:
                s.commit()
            except IntegrityError:
                raise Conflict(f"bank {name!r} already exists") from None
            with self._index_lock:
                self._indexes[row.id] = BankIndex(self.embedder.dim)
        if context_map_budget_tokens is not None:
            self.context_map.configure(name, budget_tokens=context_map_budget_tokens)
        return _bank_info(row)

    def list_banks(self, names: set[str] | None = None) -> list[BankInfo]:
        """Every bank, or only those in ``names`` (a key's scope)."""
        with self.sessions() as s:
            rows = s.scalars(select(BankRow).order_by(BankRow.name)).all()
            return [_bank_info(r) for r in rows if names is None or r.name in names]

    def get_bank(self, name: str) -> BankInfo:
        with self.sessions() as s:
            return _bank_info(self.bank_row(s, name))

    def _resolve_codec(self, codec: str) -> str:
        """``auto`` as this store's model gets it (:func:`kvstore.codec.format.default_codec`); other names as given."""
        return default_codec(codec, self.runner.num_layers, self.runner.kv_heads, self.runner.head_dim)

    def update_bank(self, name: str, *, codec: str | None = None, budget_bytes: int | None = None,
                    max_blocks: int | None = None, eviction: str | None = None,
                    context_map_budget_tokens: int | None = None) -> BankInfo:
        """Change a bank's defaults; existing blocks keep the codec they were written with."""
        if context_map_budget_tokens is not None:
            self.context_map.check_budget(context_map_budget_tokens)
        check_bank_limits(budget_bytes=budget_bytes, max_blocks=max_blocks)
        with self.sessions() as s:
            row = self.bank_row(s, name)
            if codec is not None:
                check_choosable(codec)
                codec = self._resolve_codec(codec)
                get_preset(codec)
                row.codec = codec
            if budget_bytes is not None:
                row.budget_bytes = budget_bytes
            if max_blocks is not None:
                row.max_blocks = max_blocks
            if eviction is not None:
                if eviction not in EVICTION_POLICIES:
                    raise ValidationFailed(f"eviction must be one of {EVICTION_POLICIES}")
                row.eviction = eviction
            s.commit()
            with self.blob_lock:
                self.memory.enforce_budget(s, row)
        if context_map_budget_tokens is not None:
            self.context_map.configure(name, budget_tokens=context_map_budget_tokens)
        return _bank_info(row)

    def delete_bank(self, name: str) -> None:
        """Delete a bank with its documents, blocks, index, agent sessions and unreferenced blobs."""
        with self.sessions() as s, self.blob_lock:
            row = self.bank_row(s, name)
            blob_ids = set(s.scalars(select(BlockRow.blob_id).where(BlockRow.bank_id == row.id)).all())
            with sessions_of(self).deleting_bank(s, row.id):
                s.execute(delete(BlockRow).where(BlockRow.bank_id == row.id))
                s.execute(delete(DocumentRow).where(DocumentRow.bank_id == row.id))
                s.execute(delete(OpLogRow).where(OpLogRow.bank_id == row.id))
                s.delete(row)
                s.commit()
            self.kv_memory.drop_bank(row.id)  # its hot blocks, map KV and session states
            self.runner.resident.discard_where(bank_of_resident_key(row.id))  # and its GPU-resident copies
            self.drop_unreferenced(s, blob_ids)
            with self._index_lock:
                self._indexes.pop(row.id, None)
            path = self._index_path(row)
            path.unlink(missing_ok=True)
            path.with_suffix(".json").unlink(missing_ok=True)

    def stats(self, name: str) -> BankStats:
        with self.sessions() as s:
            bank = self.bank_row(s, name)
            docs = s.scalar(select(func.count()).select_from(DocumentRow).where(DocumentRow.bank_id == bank.id)) or 0
            live = (BlockRow.bank_id == bank.id, BlockRow.status == "live")
            n_blocks, tokens, raw = s.execute(select(func.count(), func.coalesce(func.sum(BlockRow.token_count), 0),
                                                     func.coalesce(func.sum(BlockRow.raw_bytes), 0)).where(*live)).one()
            # A blob shared by several blocks is stored once, so count each distinct blob once.
            distinct = select(BlockRow.blob_id, func.max(BlockRow.stored_bytes).label("b")).where(
                *live, BlockRow.blob_id.is_not(None)).group_by(BlockRow.blob_id).subquery()
            stored = int(s.scalar(select(func.coalesce(func.sum(distinct.c.b), 0))) or 0)
            raw = int(raw)
            quarantined = s.scalar(select(func.count()).select_from(BlockRow).where(
                BlockRow.bank_id == bank.id, BlockRow.status == "quarantined")) or 0
            return BankStats(name=bank.name, documents=int(docs), blocks=int(n_blocks), tokens=int(tokens),
                             raw_bytes=int(raw), stored_bytes=int(stored),
                             compression_ratio=round(raw / stored, 4) if stored else 0.0,
                             budget_bytes=bank.budget_bytes, max_blocks=bank.max_blocks, eviction=bank.eviction,
                             evictions=bank.evictions, merges=bank.merges, quarantined_blocks=int(quarantined),
                             index_entries=self.bank_index(bank).ntotal, reencodes=int(bank.reencodes or 0),
                             tiers=tier_stats(s, bank.id, self.hot, bank.model_fingerprint),
                             memory=self.kv_memory.usage(bank.id))

    # -- documents --------------------------------------------------------------------------------

    def _validate_document(self, text: str, metadata: Any, tags: Any) -> None:
        if not isinstance(text, str) or not text.strip():
            raise ValidationFailed("document text must be a non-empty string")
        if len(text) > self.settings.max_document_chars:
            raise PayloadTooLarge(f"document text exceeds {self.settings.max_document_chars} characters")
        if metadata is not None and not isinstance(metadata, dict):
            raise ValidationFailed("metadata must be an object")
        if metadata and len(json.dumps(metadata, ensure_ascii=False).encode()) > self.settings.max_metadata_bytes:
            raise ValidationFailed(f"metadata exceeds {self.settings.max_metadata_bytes} bytes")
        if tags is not None and (not isinstance(tags, list) or not all(isinstance(t, str) for t in tags)):
            raise ValidationFailed("tags must be a list of strings")

    def _encode_blocks(self, bank: BankRow, text: str) -> list[tuple[str, list[int], np.ndarray, str, bytes, bytes]]:
        """(text, token ids, embedding, blob id, key summary, blob bytes) per block; blobs are written here."""
        runner = self.runner
        chunks = chunk_text(text, bank.block_tokens, lambda t: len(runner.tokenize(t)))
        if not chunks:
            raise ValidationFailed("document has no text to store")
        token_ids = [runner.tokenize(c) for c in chunks]
        vectors = self.embedder.embed(chunks)
        with self.model_lock:
            kvs = runner.encode(token_ids, self.settings.encode_batch_size)
        out = []
        for chunk, ids, vec, kv in zip(chunks, token_ids, vectors, kvs, strict=True):
            data = encode_block(kv, bank.model_fingerprint, bank.codec)
            out.append((chunk, ids, vec, self.blobs.put(data), self.summaries.build(kv, bank.model_fingerprint), data))
        return out

    def put_document(self, bank: str, doc_id: str, text: str, *, metadata: dict[str, Any] | None = None,
                     tags: list[str] | None = None, pinned: bool = False, agent: str | None = None,
                     if_match: int | None = None, importance: float | None = None,
                     expires_at: datetime | None = None, ttl_s: float | None = None) -> PutResult:
        """Store a document. Same text again is a no-op; new text is a new version (old blocks retired
        in the same transaction). ``if_match`` is the version the writer last saw (0: must not exist).
        ``importance`` (>= 0) raises the document's blocks in eviction order; ``expires_at`` or ``ttl_s``
        stops serving it then (maintenance removes it). The bank's budget holds when this returns."""
        validate_doc_id(doc_id)
        self._validate_document(text, metadata, tags)
        expires_at = self._expiry(expires_at, ttl_s)
        if importance is not None and (isinstance(importance, bool) or not isinstance(importance, int | float)
                                       or not 0 <= importance < float("inf")):
            raise ValidationFailed("importance must be a non-negative number")
        content_hash = hashlib.sha256(text.encode()).hexdigest()
        with self.sessions() as s:
            bank_row = self.bank_row(s, bank)
            self._check_model(bank_row)
            doc = self._doc(s, bank_row, doc_id, required=False)
            self._check_if_match(doc, if_match)
            meta_changed = doc is not None and (doc.meta != (metadata or {}) or doc.tags != (tags or [])
                                                or doc.pinned != pinned or doc.importance != importance
                                                or as_utc(doc.expires_at) != expires_at)
            if doc is not None and doc.content_hash == content_hash:
                if meta_changed:
                    self._claim(s, doc, doc_id, if_match)
                    doc.meta, doc.tags, doc.pinned = metadata or {}, tags or [], pinned
                    doc.importance, doc.expires_at = importance, expires_at
                    doc.updated_at = utcnow()
                    if agent is not None:
                        doc.agent = agent
                    s.commit()
                n = self._block_count(s, doc.id)
                return PutResult(_doc_info(doc, n), created=False, changed=meta_changed)
        encoded = self._encode_blocks(bank_row, text)
        with self.sessions() as s, self.blob_lock:
            # The blobs were written outside the lock: since then a delete or orphan collection (here or on another
            # replica) may have removed a blob of the same content (blobs are shared by content). Writing again
            # under the collection lock, held until this transaction commits, keeps them until it references them.
            blob_gc_lock(s, exclusive=False)
            for *_, data in encoded:
                self.blobs.put(data)
            bank_row = self.bank_row(s, bank)
            doc = self._doc(s, bank_row, doc_id, required=False)
            self._check_if_match(doc, if_match)
            created = doc is None
            removed: list[int] = []
            old_blobs: set[str] = set()
            now = utcnow()
            if doc is None:
                doc = DocumentRow(bank_id=bank_row.id, doc_id=doc_id, version=1, created_at=now)
                s.add(doc)
            else:
                self._claim(s, doc, doc_id, if_match)  # before its blocks go: the loser must change nothing
                old = s.execute(select(BlockRow.id, BlockRow.blob_id).where(BlockRow.document_id == doc.id)).all()
                removed = [r.id for r in old]
                old_blobs = {r.blob_id for r in old if r.blob_id}
                s.execute(delete(BlockRow).where(BlockRow.document_id == doc.id))
            doc.text, doc.content_hash, doc.meta, doc.tags = text, content_hash, metadata or {}, tags or []
            doc.pinned, doc.agent, doc.updated_at = pinned, agent, now
            doc.importance, doc.expires_at = importance, expires_at
            doc.tokens = sum(len(ids) for _, ids, *_ in encoded)
            s.flush()
            rows = [BlockRow(bank_id=bank_row.id, document_id=doc.id, ordinal=i, token_count=len(ids),
                             text=chunk, token_ids=_ids_bytes(ids), embedding=vec.astype("<f4").tobytes(),
                             blob_id=blob_id, kv_summary=summary, codec=bank_row.codec,
                             raw_bytes=len(ids) * self.runner.bytes_per_token_fp16, stored_bytes=len(data),
                             agent=agent, status="live", access_count=0, importance=0.0, created_at=now)
                    for i, (chunk, ids, vec, blob_id, summary, data) in enumerate(encoded)]
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
            self._apply_to_index(s, bank_row, op, rows)
            self.drop_unreferenced(s, old_blobs - {r.blob_id for r in rows})
            self.memory.enforce_budget(s, bank_row)
            self.context_map.on_ingest(bank, doc_id, text, agent)
            result = PutResult(_doc_info(doc, len(rows)), created=created, changed=True)
            fingerprint, bank_id = bank_row.model_fingerprint, bank_row.id
        if self.settings.hot_tier_on_ingest:  # outside the blob lock: decoding must not hold up other writers
            warm_new_blocks(self.hot, bank_id, [(blob_id, data) for *_, blob_id, _, data in encoded], fingerprint,
                            self.llm.device)
        return result

    @staticmethod
    def _expiry(expires_at: datetime | None, ttl_s: float | None) -> datetime | None:
        """The UTC expiry time from an absolute time (naive means UTC) or a time to live in seconds."""
        if ttl_s is not None:
            if isinstance(ttl_s, bool) or not isinstance(ttl_s, int | float) or not 0 < ttl_s < 1e10:
                raise ValidationFailed("ttl_s must be a positive number of seconds")
            expires_at = utcnow() + timedelta(seconds=ttl_s)
        if expires_at is not None and not isinstance(expires_at, datetime):
            raise ValidationFailed("expires_at must be a datetime")
        aware = as_utc(expires_at)
        return aware.astimezone(UTC) if aware is not None else None

    def _check_model(self, bank: BankRow) -> None:
        if bank.model_fingerprint != self.llm.fingerprint:
            raise IncompatibleModel(f"bank {bank.name!r} is bound to model {bank.model_name!r}, not the loaded "
                                    f"{self.llm.name!r}")

    @staticmethod
    def _claim(s: Session, doc: DocumentRow, doc_id: str, if_match: int | None) -> None:
        """Take the document's next version in the database (a conditional UPDATE, kvstore.storage.replication): a
        writer that lost the race to another process answers as a failed If-Match does, and changes nothing."""
        seen = doc.version
        if not claim_version(s, doc, seen):
            s.rollback()
            if if_match is not None:
                raise VersionMismatch(f"document version is no longer {if_match}: written concurrently")
            raise VersionMismatch(f"document {doc_id!r} was written concurrently; retry")

    @staticmethod
    def _check_if_match(doc: DocumentRow | None, if_match: int | None) -> None:
        if if_match is None:
            return
        current = doc.version if doc is not None else 0
        if current != if_match:
            raise VersionMismatch(f"document version is {current}, not {if_match}")

    def _apply_to_index(self, s: Session, bank: BankRow, op: OpLogRow, rows: list[BlockRow]) -> None:
        index = self.bank_index(bank)
        with index.lock:
            index.remove(np.asarray(op.removed or [], dtype=np.int64))
            if rows:
                index.add(np.asarray([r.id for r in rows], dtype=np.int64),
                          np.stack([np.frombuffer(r.embedding, dtype="<f4") for r in rows]))
            index.seq = max(index.seq, op.seq)
        if self.replication is not None:
            self.replication.follower.applied(op.seq)
        count = self._ops_since_snapshot.get(bank.id, 0) + 1
        self._ops_since_snapshot[bank.id] = count
        if count >= _SNAPSHOT_EVERY_OPS:
            self._snapshot(s, bank)

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

    def _doc(self, s: Session, bank: BankRow, doc_id: str, required: bool = True) -> DocumentRow | None:
        row = s.scalar(select(DocumentRow).where(DocumentRow.bank_id == bank.id, DocumentRow.doc_id == doc_id))
        if row is None and required:
            raise NotFound(f"document {doc_id!r} not found in bank {bank.name!r}")
        return row

    @staticmethod
    def _block_count(s: Session, document_id: int) -> int:
        return int(s.scalar(select(func.count()).select_from(BlockRow).where(BlockRow.document_id == document_id))
                   or 0)

    def get_document(self, bank: str, doc_id: str) -> DocumentInfo:
        with self.sessions() as s:
            row = self._doc(s, self.bank_row(s, bank), doc_id)
            assert row is not None
            return _doc_info(row, self._block_count(s, row.id), with_text=True)

    def list_documents(self, bank: str, *, cursor: str | None = None, limit: int = 100
                       ) -> tuple[list[DocumentInfo], str | None]:
        """Documents ordered by id; ``cursor`` is the last doc id of the previous page."""
        if limit < 1 or limit > 1000:
            raise ValidationFailed("limit must be between 1 and 1000")
        with self.sessions() as s:
            bank_row = self.bank_row(s, bank)
            q = select(DocumentRow).where(DocumentRow.bank_id == bank_row.id)
            if cursor:
                q = q.where(DocumentRow.doc_id > cursor)
            rows = s.scalars(q.order_by(DocumentRow.doc_id).limit(limit + 1)).all()
            counts = dict(s.execute(select(BlockRow.document_id, func.count()).where(
                BlockRow.document_id.in_([r.id for r in rows])).group_by(BlockRow.document_id)).tuples().all())
            page = [_doc_info(r, int(counts.get(r.id, 0))) for r in rows[:limit]]
            return page, (rows[limit - 1].doc_id if len(rows) > limit else None)

    def list_blocks(self, bank: str, *, cursor: int | None = None, limit: int = 100, doc_id: str | None = None
                    ) -> tuple[list[BlockInfo], int | None]:
        """A bank's blocks (or one document's) in id order with tier, codec, stored bytes and heat;
        ``cursor`` is the last block id of the previous page."""
        if limit < 1 or limit > 1000:
            raise ValidationFailed("limit must be between 1 and 1000")
        with self.sessions() as s:
            bank_row = self.bank_row(s, bank)
            doc = self._doc(s, bank_row, doc_id) if doc_id is not None else None
            return block_page(s, bank_row, self.hot, self.memory.config, cursor=cursor, limit=limit,
                              document_pk=doc.id if doc is not None else None)

    def delete_document(self, bank: str, doc_id: str, *, if_match: int | None = None,
                        agent: str | None = None) -> None:
        with self.sessions() as s, self.blob_lock:
            bank_row = self.bank_row(s, bank)
            doc = self._doc(s, bank_row, doc_id)
            assert doc is not None
            self._check_if_match(doc, if_match)
            version = doc.version
            self._claim(s, doc, doc_id, if_match)
            old = s.execute(select(BlockRow.id, BlockRow.blob_id).where(BlockRow.document_id == doc.id)).all()
            s.execute(delete(BlockRow).where(BlockRow.document_id == doc.id))
            s.delete(doc)
            op = OpLogRow(bank_id=bank_row.id, op="delete", doc_id=doc_id, version=version, added=[],
                          removed=[r.id for r in old], agent=agent)
            s.add(op)
            s.commit()
            self._apply_to_index(s, bank_row, op, [])
            self.drop_unreferenced(s, {r.blob_id for r in old if r.blob_id})

    # -- retrieval --------------------------------------------------------------------------------

    def _allowed_ids(self, s: Session, bank: BankRow, flt: SearchFilter) -> np.ndarray:
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

    def _retrieve(self, s: Session, bank: BankRow, query: str, k: int, flt: SearchFilter | None,
                  retrieval: str | None = None) -> list[tuple[BlockRow, DocumentRow, float]]:
        if not isinstance(query, str) or not query.strip():
            raise ValidationFailed("query must be a non-empty string")
        if not 1 <= k <= self.settings.max_k:
            raise ValidationFailed(f"k must be between 1 and {self.settings.max_k}")
        retrieval = retrieval or self.settings.default_retrieval
        if retrieval not in RETRIEVAL_MODES:
            raise ValidationFailed(f"retrieval must be one of {RETRIEVAL_MODES}")
        if retrieval == "embedding":
            return self._nearest(s, bank, query, k, flt)
        # Two stages: the embedding shortlists, the reranker picks the top k of the shortlist.
        candidates = self._nearest(s, bank, query, max(k, self.settings.rerank_candidates), flt)
        kv = (self.summaries.scores(s, bank, query, [b for b, _, _ in candidates])
              if retrieval in KV_MODES and candidates else None)
        scores = rerank_scores(retrieval, query, [b.text for b, _, _ in candidates],
                               np.asarray([sc for _, _, sc in candidates]), kv)
        order = np.argsort(-scores, kind="stable")[:k]
        return [(candidates[i][0], candidates[i][1], float(scores[i])) for i in order.tolist()]

    def _nearest(self, s: Session, bank: BankRow, query: str, k: int, flt: SearchFilter | None
                 ) -> list[tuple[BlockRow, DocumentRow, float]]:
        """Top-k blocks by embedding similarity, filtered and unexpired."""
        vec = self.embedder.embed([query])[0]
        allowed = None if flt is None or flt.is_empty() else self._allowed_ids(s, bank, flt)
        expired = np.asarray(expired_block_ids(s, bank.id, utcnow()), dtype=np.int64)
        if len(expired) and allowed is not None:
            allowed = np.setdiff1d(allowed, expired)
        # Without a filter, over-fetch by the expired count: the top k + E always holds k unexpired blocks.
        ids, scores = self.bank_index(bank).search(vec, k + (len(expired) if allowed is None else 0), allowed)
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

    @staticmethod
    def _hit(block: BlockRow, doc: DocumentRow, score: float) -> Hit:
        return Hit(doc_id=doc.doc_id, block_id=block.id, score=round(score, 6), text=block.text,
                   metadata=dict(doc.meta or {}), agent=doc.agent, ordinal=block.ordinal)

    def search(self, bank: str, query: str, *, k: int = 5, filter: SearchFilter | None = None,
               retrieval: str | None = None) -> list[Hit]:
        """Top-k blocks by embedding similarity (filters applied before top-k), or of the embedding's
        ``rerank_candidates`` reranked by ``retrieval`` (default ``Settings.default_retrieval``)."""
        with self.sessions() as s:
            bank_row = self.bank_row(s, bank)
            return [self._hit(b, d, sc) for b, d, sc in self._retrieve(s, bank_row, query, k, filter, retrieval)]

    # -- loading blocks ---------------------------------------------------------------------------

    def load_block(self, s: Session, bank: BankRow, block: BlockRow) -> BlockKV:
        """Decoded KV of a block: hot tier, else blob + decode; a cold block (no blob) is prefilled from its
        tokens; a corrupt blob is rebuilt from text."""
        if block.blob_id is None:
            return self.memory.load_cold(bank, block)
        if block.blob_id:
            cached = self.hot.get(bank.id, block.blob_id)
            if cached is not None:
                self.memory.counters.hot_hits += 1
                return cached
            try:
                # Decoded where the model runs: on CUDA the compact sections cross the bus, not the dense KV.
                kv = decode_block(self.blobs.get(block.blob_id), bank.model_fingerprint, device=self.llm.device)
                kv = self.hot.put(bank.id, block.blob_id, kv)
                self.memory.counters.warm_loads += 1
                return kv
            except IncompatibleModel:
                raise
            except CorruptBlock as exc:
                self._quarantine(s, bank, block, exc.detail)
        kv = self._rebuild_block(s, bank, block)
        self.note(bank.name, "rebuilt_blocks")
        return kv

    def _quarantine(self, s: Session, bank: BankRow, block: BlockRow, reason: str) -> None:
        """Take a damaged block out of service (never served, counted in stats) until it is rebuilt."""
        log.error("bank %s block %d: %s; quarantined, rebuilding from the stored text", bank.name, block.id, reason)
        s.execute(update(BlockRow).where(BlockRow.id == block.id).values(status="quarantined"))
        s.commit()
        if block.blob_id:
            self.hot.discard(bank.id, block.blob_id)
        self.note(bank.name, "corrupt_blocks")

    def _rebuild_block(self, s: Session, bank: BankRow, block: BlockRow) -> BlockKV:
        ids = _bytes_ids(block.token_ids)
        with self.model_lock:
            kv = self.runner.encode([ids])[0]
        data = encode_block(kv, bank.model_fingerprint, bank.codec)
        try:
            with self.blob_lock:
                blob_gc_lock(s, exclusive=False)  # referenced when this commits: never collected in between
                old = block.blob_id
                blob_id = self.blobs.put(data, replace=True)
                s.execute(update(BlockRow).where(BlockRow.id == block.id).values(
                    blob_id=blob_id, stored_bytes=len(data), codec=bank.codec, status="live",
                    kv_summary=self.summaries.build(kv, bank.model_fingerprint)))
                s.commit()
                if old and old != blob_id:
                    self.drop_unreferenced(s, {old})
        except Exception as exc:  # noqa: BLE001 - a failed rebuild must not hide the answer we have
            s.rollback()
            raise CorruptBlock(f"block {block.id} could not be rebuilt: {exc}") from exc
        return self.hot.put(bank.id, blob_id, decode_block(data, bank.model_fingerprint))

    # -- query ------------------------------------------------------------------------------------

    def query(self, bank: str, question: str, *, k: int = 5, mode: Mode = "kv", max_new_tokens: int = 64,
              filter: SearchFilter | None = None, on_token: Callable[[str], None] | None = None,
              started_at: float | None = None, recompute: float | None = None,
              compaction: dict[str, Any] | None = None, context_map: bool = False,
              retrieval: str | None = None) -> QueryResult:
        """Retrieve top-k blocks and answer. kv: stored KV + question prefill; text: prefill their text.
        ``context_map`` puts the bank's rendered context map before the blocks (its KV cached per version).

        kv mode only: ``recompute`` is the share of context tokens whose KV is recomputed with attention over
        the whole context (None: the device's measured default); ``compaction`` (``{"tau": float}`` and/or
        ``{"budget_tokens": int}``) keeps only the context tokens the question attends to.
        """
        t0 = started_at if started_at is not None else time.perf_counter()
        if mode not in ("kv", "text"):
            raise ValidationFailed("mode must be 'kv' or 'text'")
        ratio = default_ratio(self.llm.device) if recompute is None else recompute
        if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0.0 <= ratio <= 1.0:
            raise ValidationFailed("recompute must be a number between 0 and 1")
        try:
            spec = CompactionSpec.parse(compaction) if compaction is not None else None
        except ValueError as exc:
            raise ValidationFailed(str(exc)) from None
        if not 0 <= max_new_tokens <= self.settings.max_new_tokens:
            raise ValidationFailed(f"max_new_tokens must be between 0 and {self.settings.max_new_tokens}")
        limits = limits_of(self)
        limits.check_question(question)  # before any model work: a huge question is a 413, not a stall
        with self.sessions() as s:
            bank_row = self.bank_row(s, bank)
            self._check_model(bank_row)
            retrieved = self._retrieve(s, bank_row, question, k, filter, retrieval)
            t_retrieved = time.perf_counter()
            q_ids = self.runner.question_ids(question)
            shown = self.context_map.prefill(s, bank_row) if context_map else None
            lead = [shown.kv] if shown is not None and shown.kv is not None else []
            lead_ids = shown.token_ids if lead and shown is not None else []
            # Within the model's positions: the lowest-ranked blocks that would not fit are left out.
            fixed = len(self.runner.prefix_ids) + len(lead_ids) + len(q_ids) + max_new_tokens
            retrieved = retrieved[:limits.blocks_that_fit([b.token_count for b, _, _ in retrieved], fixed)]
            shares: list[float] | None = None
            if mode == "kv":
                blocks = [self.load_block(s, bank_row, b) for b, _, _ in retrieved]
                t_loaded = time.perf_counter()
                context_ids = lead_ids + [tok for b, _, _ in retrieved for tok in _bytes_ids(b.token_ids)]
                # Only the plain path batches: recompute and compaction change each context on its own first,
                # and with no token generated the importance needs a question pass of its own.
                if (self.batcher.enabled and spec is None and max_new_tokens > 0
                        and (ratio == 0 or len(lead) + len(blocks) <= 1)):
                    # The catalog connection goes back to the pool while the question waits for its batch: a
                    # batch's worth of waiting queries must not hold every connection the next one needs.
                    s.commit()
                    answer = self.batcher.answer(BatchRequest(lead + blocks, q_ids, max_new_tokens, on_token,
                                                              record=self.memory.config.track_importance))
                    gen, context_tokens, recomputed = answer.generation, answer.context_tokens, 0
                    kept = context_tokens
                    shares = self.memory.block_shares(answer.votes(), lead + blocks)
                else:
                    with self.model_lock:
                        ctx = self.runner.assemble(lead + blocks)
                        context_tokens = ctx.context_tokens
                        # A lone block after the prefix already holds what a text prefill gives (it was encoded
                        # there): recomputing it would only add time. Of several, the first one is still exact.
                        blended = ratio > 0 and len(lead) + len(blocks) > 1
                        exact = (lead + blocks)[0].tokens
                        if blended and spec is None and max_new_tokens > 0:
                            # The question rides along the recompute's passes instead of a prefill of its own;
                            # the attention that chose the tokens is the importance the policies record.
                            asked = blend_and_ask(self.runner, ctx, context_ids, q_ids, ratio, exact_tokens=exact)
                            recomputed, recorded = asked.recomputed, lambda: asked.attention
                            gen = self.runner.decode(ctx, asked.logits, ctx.next_position + len(q_ids),
                                                     max_new_tokens, on_token, started=t_loaded)
                        else:
                            recomputed = (blend(self.runner, ctx, context_ids, ratio, question_ids=q_ids,
                                                exact_tokens=exact) if blended else 0)
                            if spec is not None:
                                ctx = compact(self.runner, ctx, q_ids, spec)
                            # The answer's prefill records the attention the importance policies need, so no
                            # second question pass runs after the answer.
                            recorder = (prefill_attention(self.runner, ctx) if self.memory.config.track_importance
                                        else nullcontext(lambda: None))
                            with recorder as recorded:
                                gen = self.runner.generate(ctx, q_ids, max_new_tokens, on_token)
                    kept = ctx.context_tokens
                    shares = self.memory.attention_shares(ctx, q_ids, lead + blocks, recorded)
            else:
                block_ids = [tok for b, _, _ in retrieved for tok in _bytes_ids(b.token_ids)]
                t_loaded = time.perf_counter()
                with self.model_lock:
                    # The map sits right after the prefix, where its cached KV is exact: a serving engine
                    # would cache it with the prefix, so the text baseline reuses it too.
                    ctx = self.runner.assemble(lead) if lead else self.runner.text_context()
                    gen = self.runner.generate(ctx, block_ids + q_ids, max_new_tokens, on_token)
                context_tokens = kept = len(lead_ids) + len(block_ids)
                recomputed = 0
            self._record_access(s, [b.id for b, _, _ in retrieved], shares[len(lead):] if shares else shares)
            self.context_map.record_query(s, bank_row, question, gen.text, [d.doc_id for _, d, _ in retrieved],
                                          shown.version if shown is not None else None)
            if mode == "kv":
                self.memory.rewarm_and_enforce(s, bank_row, [b for b, _, _ in retrieved], blocks)
        t_end = time.perf_counter()
        timings = Timings(retrieve_ms=_ms(t_retrieved - t0), load_ms=_ms(t_loaded - t_retrieved),
                          prefill_ms=_ms(gen.ttft_s - t_loaded), ttft_ms=_ms(gen.ttft_s - t0),
                          total_ms=_ms(t_end - t0))
        usage = Usage(context_tokens=context_tokens, question_tokens=len(q_ids),
                      generated_tokens=len(gen.token_ids), recomputed_tokens=recomputed, kept_tokens=kept,
                      map_prefill_tokens=shown.prefilled if shown is not None else 0)
        return QueryResult(answer=gen.text, mode=mode, sources=[self._hit(b, d, sc) for b, d, sc in retrieved],
                           timings=timings, usage=usage)

    def _record_access(self, s: Session, block_ids: list[int], shares: list[float] | None = None) -> None:
        """Access count, time and heat of the blocks a query used, and their decayed attention importance."""
        if not block_ids:
            return
        record_access(s, block_ids, shares, utcnow(), self.memory.config)
        s.commit()

    # -- query log ------------------------------------------------------------------------------

    def log_query(self, bank: str, question: str, result: QueryResult, *, k: int, agent: str | None,
                  door: str = "rest") -> None:
        """Record an answered query's timings in the bank's query log (the newest ``query_log_keep`` stay)."""
        t, u = result.timings, result.usage
        entry = LoggedQuery(door=door, mode=result.mode, k=k, agent=agent, question=question,
                            retrieve_ms=t.retrieve_ms, load_ms=t.load_ms, prefill_ms=t.prefill_ms, ttft_ms=t.ttft_ms,
                            total_ms=t.total_ms, context_tokens=u.context_tokens, question_tokens=u.question_tokens,
                            generated_tokens=u.generated_tokens)
        with self.sessions() as s:
            record_log(s, self.bank_row(s, bank).id, entry, self.settings.query_log_keep)

    def recent_queries(self, bank: str, *, limit: int = 200) -> list[QueryLogEntry]:
        """The bank's newest logged queries (at most ``limit``), oldest first."""
        if limit < 1 or limit > 1000:
            raise ValidationFailed("limit must be between 1 and 1000")
        with self.sessions() as s:
            return recent_log(s, self.bank_row(s, bank).id, limit)

    # -- integrity --------------------------------------------------------------------------------

    def verify(self, bank: str) -> dict[str, int]:
        """Check every block's blob; quarantine and rebuild the damaged ones from the stored text."""
        checked = rebuilt = 0
        with self.sessions() as s:
            bank_row = self.bank_row(s, bank)
            # Cold blocks have no blob by design: nothing to check, they are prefilled from text when used.
            for block in s.scalars(select(BlockRow).where(BlockRow.bank_id == bank_row.id,
                                                          BlockRow.blob_id.is_not(None))).all():
                checked += 1
                try:
                    if not block.blob_id:
                        raise CorruptBlock("block has no blob")
                    decode_block(self.blobs.get(block.blob_id), bank_row.model_fingerprint)
                except CorruptBlock as exc:
                    self._quarantine(s, bank_row, block, exc.detail)
                    self._rebuild_block(s, bank_row, block)
                    self.note(bank_row.name, "rebuilt_blocks")
                    rebuilt += 1
        return {"checked": checked, "rebuilt": rebuilt}

    # -- memory management ------------------------------------------------------------------------

    def maintain(self, bank: str, *, evict: bool = True, merge: bool = True, gc: bool = True, expire: bool = True,
                 reencode: bool = True) -> dict[str, Any]:
        """Maintenance of one bank (see :class:`kvstore.memory.tiers.MemoryManager`): remove expired documents,
        re-encode after a model change and re-warm cold blocks the budget has room for, repair old merges, dedup
        near-duplicates, evict to the budget, delete orphan blobs. Returns a report."""
        return self.memory.maintain(bank, evict=evict, merge=merge, gc=gc, expire=expire, reencode=reencode)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A catalog session for callers that need one (benchmarks, maintenance)."""
        with self.sessions() as s:
            yield s


__all__ = [
    "BankInfo", "BankStats", "BankStore", "BlockInfo", "DocumentInfo", "Hit", "KVRagError", "PutResult",
    "QueryLogEntry", "QueryResult", "SearchFilter", "Timings", "Usage", "BadRequest",
]
