"""The session tables (migrations/versions/0004_sessions.py): sessions, their segments and KV pages, and the
lookups every module of the part shares (a session's bank, the session, its segments, its pages' blobs).

Their own module so that every module of the part reads them without importing the store, and
migrations/env.py registers them with the catalog's metadata.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import JSON, DateTime, ForeignKey, Integer, LargeBinary, String, Text, UniqueConstraint, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from kvstore.errors import IncompatibleModel, NotFound
from kvstore.storage.catalog import BankRow, Base, BigId, utcnow


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


def token_ids_bytes(ids: Sequence[int]) -> bytes:
    """``SessionSegmentRow.token_ids``: the ids as int32 little-endian."""
    return np.asarray(list(ids), dtype="<i4").tobytes()


def session_bank(s: Session, name: str, fingerprint: str) -> BankRow:
    """The bank a session call names: 404 when there is none, 409 when it is bound to another model than the
    loaded one (``fingerprint``): its sessions' KV would not fit it."""
    row = s.scalar(select(BankRow).where(BankRow.name == name)) if isinstance(name, str) else None
    if row is None:
        raise NotFound(f"bank {name!r} not found")
    if row.model_fingerprint != fingerprint:
        raise IncompatibleModel(f"bank {name!r} is bound to model {row.model_name!r}, not the loaded one")
    return row


def find_session(s: Session, bank: BankRow, session_id: str) -> AgentSessionRow:
    """The session row, or 404."""
    row = s.scalar(select(AgentSessionRow).where(AgentSessionRow.bank_id == bank.id,
                                                 AgentSessionRow.session_id == session_id))
    if row is None:
        raise NotFound(f"session {session_id!r} not found in bank {bank.name!r}")
    return row


def segments_of(s: Session, session: AgentSessionRow, live_only: bool = False) -> list[SessionSegmentRow]:
    """The session's segments in order (only the unpruned ones with ``live_only``)."""
    q = select(SessionSegmentRow).where(SessionSegmentRow.session_pk == session.id)
    if live_only:
        q = q.where(SessionSegmentRow.pruned_at.is_(None))
    return list(s.scalars(q.order_by(SessionSegmentRow.ordinal)))


def page_blobs_of(s: Session, session_pks: Sequence[int]) -> set[str]:
    """The blob ids of every page of these sessions (live and pruned segments alike)."""
    if not session_pks:
        return set()
    return set(s.scalars(select(SessionPageRow.blob_id).join(
        SessionSegmentRow, SessionSegmentRow.id == SessionPageRow.segment_pk).where(
        SessionSegmentRow.session_pk.in_(list(session_pks)))))
