"""The lookups every module of the sessions part shares over the session tables
(kvstore.storage.session_tables): a session's bank, the session, its segments, its pages' blobs.

Their own module so that every module of the part reads them without importing the store.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from kvstore.errors import IncompatibleModel, NotFound
from kvstore.storage.catalog import BankRow
from kvstore.storage.session_tables import AgentSessionRow, SessionPageRow, SessionSegmentRow


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
