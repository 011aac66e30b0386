"""The catalog: SQLAlchemy 2.0 tables, the source of truth. The schema's history lives in migrations/."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    false,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from kvstore.config import Settings
from kvstore.errors import CatalogLocked

if TYPE_CHECKING:
    from alembic.config import Config

log = logging.getLogger(__name__)

# SQLite only auto-increments INTEGER PRIMARY KEY; PostgreSQL gets a real BIGINT identity.
BigId = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class BankRow(Base):
    __tablename__ = "banks"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    model_fingerprint: Mapped[str] = mapped_column(String(64))
    model_name: Mapped[str] = mapped_column(String(200))
    codec: Mapped[str] = mapped_column(String(32))
    block_tokens: Mapped[int] = mapped_column(Integer)
    budget_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    max_blocks: Mapped[int | None] = mapped_column(Integer, nullable=True)
    eviction: Mapped[str] = mapped_column(String(16), default="lru")
    evictions: Mapped[int] = mapped_column(BigInteger, default=0)
    merges: Mapped[int] = mapped_column(BigInteger, default=0)
    reencodes: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # Set by migration 0010 on banks the old near-duplicate merge touched; the next maintenance re-encodes their
    # misattributed blocks and clears it (kvstore/memory/dedup.py).
    merge_repair: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class DocumentRow(Base):
    __tablename__ = "documents"
    __table_args__ = (UniqueConstraint("bank_id", "doc_id", name="uq_documents_bank_doc"),
                      Index("ix_documents_bank_expires", "bank_id", "expires_at"))

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    bank_id: Mapped[int] = mapped_column(ForeignKey("banks.id", ondelete="CASCADE"), index=True)
    doc_id: Mapped[str] = mapped_column(String(128))
    version: Mapped[int] = mapped_column(Integer, default=1)
    text: Mapped[str] = mapped_column(Text)
    content_hash: Mapped[str] = mapped_column(String(64))
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    tags: Mapped[list[Any]] = mapped_column(JSON, default=list)
    agent: Mapped[str | None] = mapped_column(String(128), nullable=True)
    pinned: Mapped[bool] = mapped_column(Boolean, default=False)
    tokens: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    importance: Mapped[float | None] = mapped_column(Float, nullable=True)  # given by the writer


class BlockRow(Base):
    """A block of a document. Tiers: warm (``blob_id`` set) or cold (``blob_id`` None: text and
    embedding only). A block with the same token ids as an older one shares its blob (``merged_into``)."""

    __tablename__ = "blocks"
    # (bank_id, id): a bank's blocks a page at a time in id order (the console's block list).
    __table_args__ = (Index("ix_blocks_bank_status", "bank_id", "status"),
                      Index("ix_blocks_bank_id_id", "bank_id", "id"))

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    bank_id: Mapped[int] = mapped_column(ForeignKey("banks.id", ondelete="CASCADE"))
    document_id: Mapped[int] = mapped_column(ForeignKey("documents.id", ondelete="CASCADE"), index=True)
    ordinal: Mapped[int] = mapped_column(Integer)
    token_count: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    token_ids: Mapped[bytes] = mapped_column(LargeBinary)  # int32 little-endian
    embedding: Mapped[bytes] = mapped_column(LargeBinary)  # float32 little-endian, unit norm
    blob_id: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    codec: Mapped[str] = mapped_column(String(32))
    raw_bytes: Mapped[int] = mapped_column(BigInteger)
    stored_bytes: Mapped[int] = mapped_column(BigInteger)
    agent: Mapped[str | None] = mapped_column(String(128), nullable=True)
    status: Mapped[str] = mapped_column(String(16), default="live")
    access_count: Mapped[int] = mapped_column(BigInteger, default=0)
    importance: Mapped[float] = mapped_column(Float, default=0.0)
    # Decayed access frequency (LRFU's combined recency-frequency): +1 per access, halved every
    # MemoryConfig.heat_half_life_s, as of last_access_at. The hybrid policy ranks by it.
    heat: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    last_access_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    merged_into: Mapped[int | None] = mapped_column(BigId, nullable=True, index=True)
    # Keys of a few attention heads for the KV rerank (kvstore.query.keysummary, checksummed); deferred so
    # that loading rows elsewhere never reads them. None: not built yet (rebuilt on first use).
    kv_summary: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True, deferred=True)


class OpLogRow(Base):
    """Every catalog change that touches the index, in order; FAISS snapshots record the last seq."""

    __tablename__ = "op_log"

    seq: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    bank_id: Mapped[int] = mapped_column(ForeignKey("banks.id", ondelete="CASCADE"), index=True)
    op: Mapped[str] = mapped_column(String(16))
    doc_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    added: Mapped[list[Any]] = mapped_column(JSON, default=list)
    removed: Mapped[list[Any]] = mapped_column(JSON, default=list)
    agent: Mapped[str | None] = mapped_column(String(128), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ApiKeyRow(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    prefix: Mapped[str] = mapped_column(String(24), index=True)
    key_hash: Mapped[str] = mapped_column(String(128))
    name: Mapped[str] = mapped_column(String(128))
    agent: Mapped[str] = mapped_column(String(128))
    role: Mapped[str] = mapped_column(String(16))
    banks: Mapped[list[Any]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class IdempotencyRow(Base):
    __tablename__ = "idempotency_records"

    bank_id: Mapped[int] = mapped_column(ForeignKey("banks.id", ondelete="CASCADE"), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64), primary_key=True)  # the key id that made it; "root": admin key
    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    status_code: Mapped[int] = mapped_column(Integer)
    response: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)


class JobRow(Base):
    """A durable job (kvstore.storage.jobs): its input is stored before the 202, any replica claims it, and a lease
    that stops being renewed hands it to another runner (resume from ``state``) or fails it with a reason."""

    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_status_created", "status", "created_at"),
                      Index("ix_jobs_bank_created", "bank", "created_at"),
                      Index("ix_jobs_owner_status", "owner", "status"))

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    bank: Mapped[str] = mapped_column(String(63))
    status: Mapped[str] = mapped_column(String(16))
    total: Mapped[int] = mapped_column(Integer, default=0)
    done: Mapped[int] = mapped_column(Integer, default=0)
    result: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)
    step: Mapped[str | None] = mapped_column(String(64), nullable=True)
    input: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)  # dropped once finished
    state: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)  # the resume checkpoint
    owner: Mapped[str | None] = mapped_column(String(64), nullable=True)  # key id; "root": the admin key
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    lease_owner: Mapped[str | None] = mapped_column(String(96), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class ContextMapRow(Base):
    """The head of a bank's context map: its current version, token budget and flags."""

    __tablename__ = "context_maps"

    bank_id: Mapped[int] = mapped_column(BigId, ForeignKey("banks.id", ondelete="CASCADE"), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, default=0)
    budget_tokens: Mapped[int] = mapped_column(Integer)
    frozen: Mapped[bool] = mapped_column(Boolean, default=False)
    refreshes: Mapped[int] = mapped_column(Integer, default=0)
    refreshed_through: Mapped[int] = mapped_column(BigInteger, default=0)  # last query record distilled
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ContextMapVersionRow(Base):
    """One version of a context map: the whole map as JSON (it is small), kept so old versions stay readable."""

    __tablename__ = "context_map_versions"

    bank_id: Mapped[int] = mapped_column(BigId, ForeignKey("banks.id", ondelete="CASCADE"), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    state: Mapped[dict[str, Any]] = mapped_column(JSON)
    tokens: Mapped[int] = mapped_column(Integer)
    change: Mapped[str] = mapped_column(String(16))
    evicted: Mapped[list[Any]] = mapped_column(JSON, default=list)
    agent: Mapped[str | None] = mapped_column(String(128), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ContextMapQueryRow(Base):
    """A recent query of a bank (the last few are kept), the material a context-map refresh distills."""

    __tablename__ = "context_map_queries"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    bank_id: Mapped[int] = mapped_column(BigId, ForeignKey("banks.id", ondelete="CASCADE"), index=True)
    question: Mapped[str] = mapped_column(Text)
    answer: Mapped[str] = mapped_column(Text)
    sources: Mapped[list[Any]] = mapped_column(JSON, default=list)
    map_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class QueryLogRow(Base):
    """One answered query of a bank with its timings (the console's recent-queries chart); the last
    ``query_log_keep`` per bank are kept. The question is kept only as a short preview: the console shows
    it to the agent who asked and to admins, never to other agents' keys."""

    __tablename__ = "query_log"
    __table_args__ = (Index("ix_query_log_bank_id_id", "bank_id", "id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    bank_id: Mapped[int] = mapped_column(BigId, ForeignKey("banks.id", ondelete="CASCADE"))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    door: Mapped[str] = mapped_column(String(16))  # rest | openai: which API answered it
    mode: Mapped[str] = mapped_column(String(8))  # kv | text
    k: Mapped[int] = mapped_column(Integer)
    agent: Mapped[str | None] = mapped_column(String(128), nullable=True)  # who asked; None: the root key
    question_preview: Mapped[str] = mapped_column(String(120))
    question_chars: Mapped[int] = mapped_column(Integer)
    retrieve_ms: Mapped[float] = mapped_column(Float)
    load_ms: Mapped[float] = mapped_column(Float)
    prefill_ms: Mapped[float] = mapped_column(Float)
    ttft_ms: Mapped[float] = mapped_column(Float)
    total_ms: Mapped[float] = mapped_column(Float)
    context_tokens: Mapped[int] = mapped_column(Integer)
    question_tokens: Mapped[int] = mapped_column(Integer)
    generated_tokens: Mapped[int] = mapped_column(Integer)


class ReplicaRow(Base):
    """A running kvrag process on this catalog (see replication.py): what it serves, and when it was last alive."""

    __tablename__ = "replicas"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    model_fingerprint: Mapped[str] = mapped_column(String(64))
    model_name: Mapped[str] = mapped_column(String(200))
    blob_url: Mapped[str] = mapped_column(String(1024))  # "" = local files
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def make_engine(url: str) -> Engine:
    """An engine for the catalog URL; SQLite gets WAL, a busy timeout and foreign keys."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True)


# PostgreSQL SQLSTATEs of a migration that lost a race for a lock: lock_timeout expired, or a deadlock broken.
_LOCK_SQLSTATES = frozenset({"55P03", "40P01"})
_FIRST_PAUSE_S = 0.25
_MAX_PAUSE_S = 4.0
# pg_advisory_xact_lock key of startup migrations ("kvrag" + 1): replicas starting together migrate one at a time,
# and the ones after the first find the schema at head and change nothing.
MIGRATION_LOCK_KEY = 0x6B7672616701


def upgrade(url: str, settings: Settings | None = None) -> None:
    """Bring the catalog at ``url`` to the newest schema with Alembic.

    On PostgreSQL an attempt waits at most ``migration_lock_timeout_s`` for a lock and one that times out is
    retried after a growing pause until ``migration_timeout_s`` has passed, then :class:`CatalogLocked`.
    SQLite runs once under its own busy timeout.
    """
    from alembic import command
    from alembic.config import Config

    settings = settings or Settings()
    migrations = Path(__file__).resolve().parents[2] / "migrations"
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if make_url(url).get_backend_name() != "postgresql":
        command.upgrade(cfg, "head")
        return
    _upgrade_postgres(cfg, url, settings.migration_lock_timeout_s, settings.migration_timeout_s)


def _upgrade_postgres(cfg: Config, url: str, lock_timeout_s: float, budget_s: float) -> None:
    """Upgrade with a bounded wait per lock, retrying attempts that time out until ``budget_s`` is spent.

    A server restarted right after a SIGKILL can find the dead server's backend still holding a lock the
    migration needs until PostgreSQL notices it gone; an unbounded wait on it hung startup.
    """
    from alembic import command

    engine = make_engine(url)
    deadline = time.monotonic() + budget_s
    pause = _FIRST_PAUSE_S
    attempt = 0
    try:
        while True:
            attempt += 1
            # Never wait on one lock past the budget, so the whole start stays bounded by it.
            wait_ms = max(1, int(min(lock_timeout_s, deadline - time.monotonic()) * 1000))
            try:
                with engine.begin() as connection:
                    # LOCAL: the setting ends with this transaction, so no pooled connection keeps it.
                    connection.exec_driver_sql(f"SET LOCAL lock_timeout = {wait_ms}")
                    # Bounded by the lock_timeout above like any lock; released when this transaction ends.
                    connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK_KEY})")
                    cfg.attributes["connection"] = connection
                    command.upgrade(cfg, "head")
                return
            except DBAPIError as exc:
                if getattr(exc.orig, "sqlstate", None) not in _LOCK_SQLSTATES:
                    raise
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CatalogLocked(f"catalog migration could not take its locks in {budget_s:g} s "
                                        f"({attempt} attempts): another connection holds them") from exc
                sleep_s = min(pause, left)
                log.warning("catalog migration lock wait timed out; retrying attempt=%d lock_timeout_ms=%d "
                            "retry_in_s=%.2f budget_left_s=%.1f", attempt, wait_ms, sleep_s, left,
                            extra={"event": "migration_lock_timeout", "attempt": attempt,
                                   "lock_timeout_ms": wait_ms, "retry_in_s": sleep_s, "budget_left_s": left})
                time.sleep(sleep_s)
                pause = min(pause * 2, _MAX_PAUSE_S)
    finally:
        cfg.attributes.pop("connection", None)
        engine.dispose()


def open_catalog(url: str, migrate: bool = True, settings: Settings | None = None) -> sessionmaker:
    """Migrate (unless told not to) and return a session factory."""
    if migrate:
        upgrade(url, settings)
    return sessionmaker(make_engine(url), expire_on_commit=False)
