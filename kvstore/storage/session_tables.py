"""The session tables (migrations/versions/0004_sessions.py): sessions, their segments and KV pages.

Declared here, with the rest of the catalog, so the catalog's metadata (kvstore.storage.schema) is complete
without importing the sessions part; the lookups that read them live in kvstore.sessions.rows.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, DateTime, ForeignKey, Integer, LargeBinary, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from kvstore.storage.catalog import Base, BigId, utcnow


class AgentSessionRow(Base):
    """One session. ``positions`` is how many positions its segments used so far (pruned ones included)."""

    __tablename__ = "agent_sessions"
    __table_args__ = (UniqueConstraint("bank_id", "session_id", name="uq_agent_sessions_bank_session"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    bank_id: Mapped[int] = mapped_column(ForeignKey("banks.id", ondelete="CASCADE"), index=True)
    session_id: Mapped[str] = mapped_column(String(128))
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    agent: Mapped[str | None] = mapped_column(String(128), nullable=True)
    positions: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class SessionSegmentRow(Base):
    """A segment: its text and tokens (kept after a prune, for audit), where it sits, its attention record."""

    __tablename__ = "session_segments"
    __table_args__ = (UniqueConstraint("session_pk", "ordinal", name="uq_session_segments_ordinal"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    session_pk: Mapped[int] = mapped_column(ForeignKey("agent_sessions.id", ondelete="CASCADE"), index=True)
    ordinal: Mapped[int] = mapped_column(Integer)
    role: Mapped[str] = mapped_column(String(16))
    agent: Mapped[str | None] = mapped_column(String(128), nullable=True)
    text: Mapped[str] = mapped_column(Text)
    token_ids: Mapped[bytes] = mapped_column(LargeBinary)  # int32 little-endian
    start: Mapped[int] = mapped_column(Integer)  # first position, counted after the shared prefix
    token_count: Mapped[int] = mapped_column(Integer)
    attention: Mapped[list[Any]] = mapped_column(JSON, default=list)  # per brief: share of the attention / even share
    pruned_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    prune_reason: Mapped[str | None] = mapped_column(String(32), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class SessionPageRow(Base):
    """A page of a live segment's KV (at most the bank's block size in tokens), one codec blob."""

    __tablename__ = "session_pages"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    segment_pk: Mapped[int] = mapped_column(ForeignKey("session_segments.id", ondelete="CASCADE"), index=True)
    ordinal: Mapped[int] = mapped_column(Integer)
    token_count: Mapped[int] = mapped_column(Integer)
    blob_id: Mapped[str] = mapped_column(String(64), index=True)
    stored_bytes: Mapped[int] = mapped_column(Integer)


# -- reading the rows ------------------------------------------------------------------------------
