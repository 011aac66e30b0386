"""Bounds on what one session prune may drop, and pruned segments kept restorable for a while.

Document text reaches the prune judge's prompt, so stored text can steer it (docs/RELIABILITY.md, hole 6):
a judge reply of ``{"needed": []}`` used to prune the whole session with no way back. Now:

- **Empty lists are refused.** A judge that names no segment prunes nothing; the result says why.
- **A bounded share.** One prune drops at most ``session_prune_max_fraction`` of the live segments (at
  least one): the oldest of those the judge left out, or the least attended (attention policy). The
  others are kept and reported as ``held_back``.
- **Restorable.** A pruned segment's KV pages stay stored for ``session_prune_retention_s``; ``restore``
  makes it live again exactly as it was (same KV, same positions: positions never move). After the
  retention period the pages are purged (maintenance, and each prune of the session) and the segment can
  no longer be restored; its text stays for audit, as before.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import delete, func, select

from kvstore.config import Settings
from kvstore.errors import Conflict, NotFound, ValidationFailed
from kvstore.sessions.livekv import LiveStates
from kvstore.sessions.pages import drop_unreferenced
from kvstore.sessions.rows import find_session, session_bank
from kvstore.storage.blobstore import BlobStore
from kvstore.storage.catalog import utcnow
from kvstore.storage.session_tables import SessionPageRow, SessionSegmentRow

if TYPE_CHECKING:
    from kvstore.ports import Engine


@dataclass
class RestoreResult:
    restored: list[int]  # segment ids made live again by this call
    tokens: int  # live KV tokens after it
    expired: list[int] = field(default_factory=list)  # pruned longer ago than the retention: their KV is gone


def prune_cap(live: int, fraction: float) -> int:
    """Live segments one prune may drop: ``fraction`` of them, at least one."""
    return max(1, math.floor(fraction * live)) if live else 0


def bound_doomed(doomed: Sequence[int], cap: int) -> tuple[list[int], list[int]]:
    """The first ``cap`` of ``doomed`` (already in the order to drop them) and the ones held back."""
    return list(doomed[:cap]), list(doomed[cap:])


class Retention:
    """Pruned segments of the sessions of one store kept restorable: their pages stay for
    ``session_prune_retention_s``, then are purged; ``write_lock`` is the part's one lock on catalog writes."""

    def __init__(self, store: Engine, live: LiveStates, blobs: BlobStore, write_lock: threading.Lock) -> None:
        self.store, self.live, self.blobs, self.write_lock = store, live, blobs, write_lock
        self.settings: Settings = store.settings

    def keeps_pages(self) -> bool:
        """Whether a prune keeps the pages for a later restore (a retention of 0 drops them at once)."""
        return self.period.total_seconds() > 0

    @property
    def period(self) -> timedelta:
        return timedelta(seconds=float(getattr(self.settings, "session_prune_retention_s", 0.0)))

    def purge_pruned(self, session_pk: int | None = None, now: datetime | None = None) -> int:
        """Delete the KV pages of segments pruned longer ago than the retention (of one session, or all);
        how many segments lost theirs."""
        cutoff = (now or utcnow()) - self.period
        with self.store.sessions() as s, self.write_lock:
            q = select(SessionSegmentRow.id).join(SessionPageRow, SessionPageRow.segment_pk == SessionSegmentRow.id
                                                  ).where(SessionSegmentRow.pruned_at.is_not(None),
                                                          SessionSegmentRow.pruned_at <= cutoff).distinct()
            if session_pk is not None:
                q = q.where(SessionSegmentRow.session_pk == session_pk)
            ids = list(s.scalars(q))
            if not ids:
                return 0
            blob_ids = set(s.scalars(select(SessionPageRow.blob_id).where(SessionPageRow.segment_pk.in_(ids))))
            s.execute(delete(SessionPageRow).where(SessionPageRow.segment_pk.in_(ids)))
            s.commit()
            drop_unreferenced(s, self.blobs, blob_ids)
            return len(ids)

    def restore(self, bank: str, session_id: str, segments: Sequence[int] | None = None) -> RestoreResult:
        """Make pruned segments live again (all restorable ones when ``segments`` is None). A named segment
        that does not exist is a 404, one whose KV was purged a 409; live ones are left as they are."""
        if segments is not None and (not isinstance(segments, list | tuple) or not all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 2**31 for i in segments)):
            raise ValidationFailed("segments must be a list of segment ids")
        with self.store.sessions() as s, self.write_lock:
            bank_row = session_bank(s, bank, self.store.llm.fingerprint)
            session = find_session(s, bank_row, session_id)
            rows = list(s.scalars(select(SessionSegmentRow).where(SessionSegmentRow.session_pk == session.id)
                                  .order_by(SessionSegmentRow.ordinal)))
            by_ordinal = {r.ordinal: r for r in rows}
            if segments is not None:
                missing = sorted(set(segments) - set(by_ordinal))
                if missing:
                    raise NotFound(f"session {session_id!r} has no segments {missing}")
            wanted = [r for r in rows if r.pruned_at is not None and (segments is None or r.ordinal in segments)]
            totals = select(SessionPageRow.segment_pk, func.sum(SessionPageRow.token_count)).where(
                SessionPageRow.segment_pk.in_([r.id for r in wanted])).group_by(SessionPageRow.segment_pk)
            paged = dict(s.execute(totals).tuples().all())
            restorable = [r for r in wanted if int(paged.get(r.id) or 0) == r.token_count]
            expired = sorted(r.ordinal for r in wanted if r not in restorable)
            if expired and segments is not None:
                raise Conflict(f"segments {expired} were pruned longer ago than the retention period; their KV is "
                               "gone (the text stays)")
            for r in restorable:
                r.pruned_at, r.prune_reason = None, None
            if restorable:
                session.updated_at = utcnow()
            s.commit()
            self.live.forget(bank_row.id, session.id)
            live = s.scalar(select(func.coalesce(func.sum(SessionSegmentRow.token_count), 0)).where(
                SessionSegmentRow.session_pk == session.id, SessionSegmentRow.pruned_at.is_(None))) or 0
            return RestoreResult(restored=sorted(r.ordinal for r in restorable), tokens=int(live), expired=expired)
