"""Agent sessions: an agent's trajectory kept as a KV state that grows by appending.

A session lives in a bank and is a list of segments (orchestrator turns, tool outputs, worker replies,
notes). ``SessionStore`` is the part's facade: it keeps the sessions' catalog rows (create, list, read,
delete) and hands each operation to the module that owns it:

- appending, which prefills only the new tokens (:mod:`kvstore.sessions.append`), their KV stored as pages
  (:mod:`kvstore.sessions.pages`) and kept live in memory (:mod:`kvstore.sessions.livekv`);
- briefs, a task-compacted slice of the trajectory for a worker (:mod:`kvstore.sessions.brief`), which
  also record the attention the ``attention`` prune reads (:mod:`kvstore.sessions.attention`);
- pruning the KV of segments no longer useful (:mod:`kvstore.sessions.prune`, its judge
  :mod:`kvstore.sessions.judge`), bounded and restorable for a while (:mod:`kvstore.sessions.restore`).
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import case, delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from kvstore.errors import Conflict, ValidationFailed
from kvstore.model.compaction import Selection
from kvstore.model.runner import Runner
from kvstore.sessions.append import Appender
from kvstore.sessions.brief import Briefer
from kvstore.sessions.judge import Judge, judge_needs_model
from kvstore.sessions.livekv import LiveStates
from kvstore.sessions.pages import collect_orphans, drop_unreferenced
from kvstore.sessions.prune import Pruner
from kvstore.sessions.restore import RestoreResult, Retention
from kvstore.sessions.rows import find_session, page_blobs_of, segments_of, session_bank
from kvstore.sessions.values import (
    SESSION_ID,
    AppendResult,
    BriefResult,
    PrunePolicy,
    PruneResult,
    SegmentInfo,
    SegmentInput,
    SessionInfo,
    SessionSummary,
)
from kvstore.storage.blobstore import BlobStore, open_blob_store
from kvstore.storage.catalog import BankRow
from kvstore.storage.session_tables import AgentSessionRow, SessionPageRow, SessionSegmentRow
from kvstore.types import Context

if TYPE_CHECKING:
    from kvstore.ports import Engine

class SessionStore:
    """Sessions of every bank of one ``BankStore``: same catalog, model and model lock, a blob store of their
    own (the documents' orphan collection never sees these blobs)."""

    def __init__(self, store: Engine) -> None:
        self.store = store
        self.settings = store.settings
        self.runner: Runner = store.runner
        settings = store.settings
        self.blobs: BlobStore = open_blob_store(settings.blob_url, settings.data_dir / "session-blobs",
                                                cache_bytes=settings.blob_cache_bytes,
                                                allow_http=settings.blob_allow_http)
        self.write_lock = threading.Lock()  # appends, prunes, restores and deletes of this process, one at a time
        self.live = LiveStates(self.runner, self.blobs, store.kv_memory)
        self.retention = Retention(store, self.live, self.blobs, self.write_lock)
        self.appender = Appender(store, self.live, self.blobs, self.write_lock)
        self.briefer = Briefer(store, self.live)
        self.pruner = Pruner(store, self.retention, self.blobs, self.write_lock)

    def bank_row(self, s: Session, name: str) -> BankRow:
        """The bank named, bound to the loaded model (else 409: its sessions' KV would not fit it)."""
        return session_bank(s, name, self.store.llm.fingerprint)

    # -- sessions ---------------------------------------------------------------------------------

    def create(self, bank: str, session_id: str | None = None, *, metadata: dict[str, Any] | None = None,
               agent: str | None = None) -> SessionInfo:
        """A new empty session; ``session_id`` defaults to a random one. 409 if the id is taken."""
        session_id = session_id or f"s-{uuid.uuid4().hex[:16]}"
        if not isinstance(session_id, str) or not SESSION_ID.fullmatch(session_id):
            raise ValidationFailed("session id must match [A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
        if metadata is not None and not isinstance(metadata, dict):
            raise ValidationFailed("metadata must be an object")
        if metadata and len(json.dumps(metadata)) > self.settings.max_metadata_bytes:
            raise ValidationFailed(f"metadata exceeds {self.settings.max_metadata_bytes} bytes")
        with self.store.sessions() as s:
            bank_row = self.bank_row(s, bank)
            row = AgentSessionRow(bank_id=bank_row.id, session_id=session_id, meta=metadata or {}, agent=agent,
                                  positions=0)
            s.add(row)
            try:
                s.commit()
            except IntegrityError:
                raise Conflict(f"session {session_id!r} already exists in bank {bank!r}") from None
            return self._info(s, bank_row, row)

    def get(self, bank: str, session_id: str, *, with_text: bool = True) -> SessionInfo:
        with self.store.sessions() as s:
            bank_row = self.bank_row(s, bank)
            return self._info(s, bank_row, find_session(s, bank_row, session_id), with_text)

    def list_sessions(self, bank: str, *, cursor: str | None = None, limit: int = 50
                      ) -> tuple[list[SessionSummary], str | None]:
        """A bank's sessions ordered by id, a page after ``cursor`` (the previous page's last id), with the
        next cursor; segment counts come from one grouped query for the whole page."""
        if limit < 1 or limit > 1000:
            raise ValidationFailed("limit must be between 1 and 1000")
        with self.store.sessions() as s:
            bank_row = self.bank_row(s, bank)
            q = select(AgentSessionRow).where(AgentSessionRow.bank_id == bank_row.id)
            if cursor:
                q = q.where(AgentSessionRow.session_id > cursor)
            rows = s.scalars(q.order_by(AgentSessionRow.session_id).limit(limit + 1)).all()
            page = rows[:limit]
            live = SessionSegmentRow.pruned_at.is_(None)
            counts = {r.session_pk: r for r in s.execute(
                select(SessionSegmentRow.session_pk, func.count().label("segments"),
                       func.sum(case((live, 0), else_=1)).label("pruned"),
                       func.sum(case((live, SessionSegmentRow.token_count), else_=0)).label("tokens"),
                       func.sum(SessionSegmentRow.token_count).label("total"))
                .where(SessionSegmentRow.session_pk.in_([r.id for r in page]))
                .group_by(SessionSegmentRow.session_pk))}
            out = []
            for r in page:
                c = counts.get(r.id)
                segments, pruned, tokens, total = (int(c.segments), int(c.pruned or 0), int(c.tokens or 0),
                                                   int(c.total or 0)) if c else (0, 0, 0, 0)
                out.append(SessionSummary(session_id=r.session_id, agent=r.agent, segments=segments,
                                          pruned_segments=pruned, tokens=tokens, total_tokens=total,
                                          created_at=r.created_at, updated_at=r.updated_at))
            return out, (page[-1].session_id if len(rows) > limit else None)

    def delete(self, bank: str, session_id: str) -> None:
        """Delete a session with its segments and the blobs no other session shares."""
        with self.store.sessions() as s, self.write_lock:
            bank_row = self.bank_row(s, bank)
            row = find_session(s, bank_row, session_id)
            blob_ids = page_blobs_of(s, [row.id])
            seg_ids = select(SessionSegmentRow.id).where(SessionSegmentRow.session_pk == row.id)
            s.execute(delete(SessionPageRow).where(SessionPageRow.segment_pk.in_(seg_ids)))
            s.execute(delete(SessionSegmentRow).where(SessionSegmentRow.session_pk == row.id))
            s.delete(row)
            s.commit()
            self.live.forget(bank_row.id, row.id)
            drop_unreferenced(s, self.blobs, blob_ids)

    @contextmanager
    def deleting_bank(self, s: Session, bank_id: int) -> Iterator[None]:
        """Around the transaction that deletes a bank: the catalog cascades to the bank's sessions, segments
        and pages; once the body has committed, their blobs that no other session (of any bank) shares are
        deleted and their live KV forgotten. Holding the write lock keeps an append from writing a shared
        blob between the reference count and the delete."""
        with self.write_lock:
            session_pks = list(s.scalars(select(AgentSessionRow.id).where(AgentSessionRow.bank_id == bank_id)))
            blob_ids = page_blobs_of(s, session_pks)
            yield
            for pk in session_pks:
                self.live.forget(bank_id, pk)
            drop_unreferenced(s, self.blobs, blob_ids)

    def collect_orphans(self, grace_s: float) -> int:
        """Delete session blobs no page references, older than ``grace_s`` seconds: an append writes its
        blobs before the transaction that acknowledges it, so one that died in between leaves them behind
        (the grace period spares another process's append still in flight). Returns how many went."""
        with self.store.sessions() as s, self.write_lock:
            return collect_orphans(s, self.blobs, grace_s)

    def _info(self, s: Session, bank: BankRow, row: AgentSessionRow, with_text: bool = True) -> SessionInfo:
        segments = segments_of(s, row)
        stored = s.scalar(select(func.coalesce(func.sum(SessionPageRow.stored_bytes), 0)).join(
            SessionSegmentRow, SessionSegmentRow.id == SessionPageRow.segment_pk).where(
            SessionSegmentRow.session_pk == row.id)) or 0
        infos = [SegmentInfo(id=g.ordinal, role=g.role, agent=g.agent, tokens=g.token_count, start=g.start,
                             pruned=g.pruned_at is not None, created_at=g.created_at,
                             text=g.text if with_text else None, prune_reason=g.prune_reason) for g in segments]
        return SessionInfo(session_id=row.session_id, bank=bank.name, metadata=dict(row.meta or {}), agent=row.agent,
                           segments=infos, tokens=sum(g.tokens for g in infos if not g.pruned),
                           total_tokens=sum(g.tokens for g in infos), stored_bytes=int(stored),
                           created_at=row.created_at, updated_at=row.updated_at)

    # -- the operations, each in its own module ----------------------------------------------------

    def append(self, bank: str, session_id: str, segments: Sequence[SegmentInput | dict[str, Any]], *,
               agent: str | None = None) -> AppendResult:
        """:meth:`kvstore.sessions.append.Appender.append`."""
        return self.appender.append(bank, session_id, segments, agent=agent)

    def brief(self, bank: str, session_id: str, task: str, *, budget_tokens: int | None = None,
              tau: float | None = None, selection: Selection = "segments", include_documents: int = 0,
              max_new_tokens: int = 64, on_token: Callable[[str], None] | None = None,
              started_at: float | None = None) -> BriefResult:
        """:meth:`kvstore.sessions.brief.Briefer.brief`."""
        return self.briefer.brief(bank, session_id, task, budget_tokens=budget_tokens, tau=tau, selection=selection,
                                  include_documents=include_documents, max_new_tokens=max_new_tokens,
                                  on_token=on_token, started_at=started_at)

    def briefing_context(self, bank: str, session_id: str, task: str, *, budget_tokens: int | None = None,
                         tau: float | None = None, selection: Selection = "segments") -> tuple[Context, int, int]:
        """:meth:`kvstore.sessions.brief.Briefer.briefing_context`."""
        return self.briefer.briefing_context(bank, session_id, task, budget_tokens=budget_tokens, tau=tau,
                                             selection=selection)

    def prune(self, bank: str, session_id: str, *, policy: PrunePolicy = "model", goal: str | None = None,
              window: int = 16, threshold: float = 0.25, judge: Judge | None = None) -> PruneResult:
        """:meth:`kvstore.sessions.prune.Pruner.prune`."""
        return self.pruner.prune(bank, session_id, policy=policy, goal=goal, window=window, threshold=threshold,
                                 judge=judge)

    def prune_needs_model(self, policy: str) -> bool:
        """:func:`kvstore.sessions.judge.judge_needs_model` with this store's settings."""
        return judge_needs_model(self.settings, policy)

    def restore(self, bank: str, session_id: str, segments: Sequence[int] | None = None) -> RestoreResult:
        """:meth:`kvstore.sessions.restore.Retention.restore`."""
        return self.retention.restore(bank, session_id, segments)

    def purge_pruned(self, session_pk: int | None = None, now: datetime | None = None) -> int:
        """:meth:`kvstore.sessions.restore.Retention.purge_pruned`."""
        return self.retention.purge_pruned(session_pk, now)
