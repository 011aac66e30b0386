"""Appending to a session: only the new tokens are prefilled, with the session's live KV as the cache and
positions continuing after the last appended token; their KV is persisted like document blocks.

Blobs are written before the one catalog transaction that acknowledges the append, so an acknowledged
append survives a crash; a concurrent append to the same session (another process) is a 409.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from kvstore.errors import Conflict, PayloadTooLarge, ValidationFailed
from kvstore.sessions.livekv import LiveStates, grown
from kvstore.sessions.pages import write_segment_pages
from kvstore.sessions.rows import find_session, session_bank, token_ids_bytes
from kvstore.sessions.values import MAX_SEGMENTS_PER_APPEND, ROLES, AppendResult, SegmentInput, ms
from kvstore.storage.blobstore import BlobStore
from kvstore.storage.catalog import utcnow
from kvstore.storage.replication import blob_gc_lock
from kvstore.storage.session_tables import AgentSessionRow, SessionPageRow, SessionSegmentRow

if TYPE_CHECKING:
    from kvstore.ports import Engine


def render_segment(role: str, text: str, agent: str | None) -> str:
    """A segment as the model reads it: a role tag, the text, a line break."""
    who = f"{role}:{agent}" if agent else role
    return f"[{who}] {text.strip()}\n"


class Appender:
    """Appends of the sessions of one store; ``write_lock`` is the part's one lock on catalog writes."""

    def __init__(self, store: Engine, live: LiveStates, blobs: BlobStore, write_lock: threading.Lock) -> None:
        self.store, self.live, self.blobs, self.write_lock = store, live, blobs, write_lock

    def validate(self, segments: Sequence[SegmentInput | dict[str, Any]]) -> list[SegmentInput]:
        """The segments as ``SegmentInput``; a bad role, blank or oversized text refuses the whole append."""
        if not isinstance(segments, list | tuple) or not 1 <= len(segments) <= MAX_SEGMENTS_PER_APPEND:
            raise ValidationFailed(f"segments must be a list of 1 to {MAX_SEGMENTS_PER_APPEND} segments")
        max_chars = self.store.settings.max_document_chars
        out = []
        for seg in segments:
            seg = seg if isinstance(seg, SegmentInput) else SegmentInput(**seg)
            if seg.role not in ROLES:
                raise ValidationFailed(f"segment role must be one of {ROLES}")
            if not isinstance(seg.text, str) or not seg.text.strip():
                raise ValidationFailed("segment text must be a non-empty string")
            if len(seg.text) > max_chars:
                raise PayloadTooLarge(f"segment text exceeds {max_chars} characters")
            out.append(seg)
        return out

    def append(self, bank: str, session_id: str, segments: Sequence[SegmentInput | dict[str, Any]], *,
               agent: str | None = None) -> AppendResult:
        """Prefill only the new segments after the session's live KV, persist their KV, acknowledge.

        ``agent`` (the writer) is recorded on segments that name none.
        """
        t0 = time.perf_counter()
        segs = self.validate(segments)
        self.store.limits.check_segments([g.text for g in segs])
        runner = self.store.runner
        token_ids = [runner.tokenize(render_segment(g.role, g.text, g.agent or agent)) for g in segs]
        counts = [len(ids) for ids in token_ids]
        with self.store.sessions() as s, self.write_lock:
            bank_row = session_bank(s, bank, self.store.llm.fingerprint)
            session = find_session(s, bank_row, session_id)
            state = self.live.load(s, bank_row, session)
            base = session.positions
            with self.store.model_lock:
                ctx = self.live.context(state, base)
                new = runner.extend(ctx, [t for ids in token_ids for t in ids])
            t_prefill = time.perf_counter()
            # Blobs first (atomic, fsynced), then one transaction: a crash in between leaves only orphan blobs.
            blob_gc_lock(s, exclusive=False)
            written, decoded = write_segment_pages(self.blobs, bank_row, new, counts)
            last = s.scalar(select(func.max(SessionSegmentRow.ordinal)).where(
                SessionSegmentRow.session_pk == session.id))
            first_ordinal = 0 if last is None else last + 1
            now = utcnow()
            rows: list[SessionSegmentRow] = []
            start = base
            for i, (seg, ids) in enumerate(zip(segs, token_ids, strict=True)):
                rows.append(SessionSegmentRow(session_pk=session.id, ordinal=first_ordinal + i, role=seg.role,
                                              agent=seg.agent or agent, text=seg.text, token_ids=token_ids_bytes(ids),
                                              start=start, token_count=len(ids), attention=[], created_at=now))
                start += len(ids)
            s.add_all(rows)
            s.flush()
            s.add_all([SessionPageRow(segment_pk=r.id, ordinal=j, token_count=n, blob_id=blob_id, stored_bytes=size)
                       for r, pages in zip(rows, written, strict=True)
                       for j, (blob_id, n, size) in enumerate(pages)])
            # Optimistic guard: another process appending to the same session moved ``positions`` first.
            moved = s.execute(update(AgentSessionRow).where(
                AgentSessionRow.id == session.id, AgentSessionRow.positions == base).values(
                positions=start, updated_at=now)).rowcount  # type: ignore[attr-defined]
            if moved != 1:
                s.rollback()
                raise Conflict(f"session {session_id!r} was appended to concurrently; retry")
            try:
                s.commit()
            except IntegrityError:
                s.rollback()
                raise Conflict(f"session {session_id!r} was appended to concurrently; retry") from None
            self.live.remember(bank_row.id, session.id, grown(runner, state, [r.id for r in rows], decoded, counts,
                                                              base))
            return AppendResult(session_id=session_id, segment_ids=[r.ordinal for r in rows], token_counts=counts,
                                tokens=state.tokens + start - base, prefill_ms=ms(t_prefill - t0),
                                total_ms=ms(time.perf_counter() - t0))
