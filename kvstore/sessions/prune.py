"""Pruning a session (SideQuest): the KV of segments no longer useful is dropped; their text stays for audit.

``model``: the judge (:mod:`kvstore.sessions.judge`) names the segments still needed for a goal and every
other live segment is pruned. ``attention``: segments whose recent share of the briefs' attention is low
(:mod:`kvstore.sessions.attention`) are pruned. Either way one prune drops a bounded share of the live
segments, and the pages stay restorable for a while (:mod:`kvstore.sessions.restore`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from sqlalchemy import delete, select

from kvstore.errors import ValidationFailed
from kvstore.sessions.attention import least_attended_first, low_attention
from kvstore.sessions.judge import Judge, JudgeError, default_judge, judge_prompt, parse_needed
from kvstore.sessions.pages import drop_unreferenced
from kvstore.sessions.restore import Retention, bound_doomed, prune_cap
from kvstore.sessions.rows import find_session, segments_of, session_bank
from kvstore.sessions.values import ATTENTION_HISTORY, PrunePolicy, PruneResult, ms
from kvstore.storage.blobstore import BlobStore
from kvstore.storage.catalog import utcnow
from kvstore.storage.session_tables import SessionPageRow, SessionSegmentRow

if TYPE_CHECKING:
    from kvstore.ports import Engine


class Pruner:
    """Prunes of the sessions of one store; ``write_lock`` is the part's one lock on catalog writes."""

    def __init__(self, store: Engine, retention: Retention, blobs: BlobStore, write_lock: threading.Lock) -> None:
        self.store, self.retention, self.blobs, self.write_lock = store, retention, blobs, write_lock

    def default_judge(self) -> Judge:
        """The ``KVRAG_MAP_LLM_URL`` endpoint when that setting is there and set, else the loaded model."""
        return default_judge(self.store.settings, self.store.runner, self.store.model_lock)

    def prune(self, bank: str, session_id: str, *, policy: PrunePolicy = "model", goal: str | None = None,
              window: int = 16, threshold: float = 0.25, judge: Judge | None = None) -> PruneResult:
        """Drop the KV of segments no longer useful; their text stays. ``model``: the judge (an auxiliary
        call; its tokens never enter the session) names the segments still needed for ``goal`` and every
        other live segment is pruned; a reply that does not parse prunes nothing and says why.
        ``attention``: segments whose mean share of the attention over their last ``window`` briefs is below
        ``threshold`` times an even share (1 / live segments; sinks left out) are pruned; a segment no brief
        has seen yet is kept."""
        if policy not in ("model", "attention"):
            raise ValidationFailed("policy must be 'model' or 'attention'")
        if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= ATTENTION_HISTORY:
            raise ValidationFailed(f"window must be between 1 and {ATTENTION_HISTORY}")
        if isinstance(threshold, bool) or not isinstance(threshold, int | float) or threshold < 0:
            raise ValidationFailed("threshold must be a non-negative number")
        if goal is not None and not isinstance(goal, str):
            raise ValidationFailed("goal must be a string")
        if goal is not None:
            self.store.limits.check_task(goal)  # the judge reads it: capped like a brief's task
        with self.store.sessions() as s:
            bank_row = session_bank(s, bank, self.store.llm.fingerprint)
            session = find_session(s, bank_row, session_id)
            live = segments_of(s, session, live_only=True)
        self.retention.purge_pruned(session.id)  # pages past their retention go before new ones are kept
        before = sum(g.token_count for g in live)
        judge_ms, error = 0.0, None
        if policy == "model":
            t0 = time.perf_counter()
            try:
                live_ids = [g.ordinal for g in live]
                reply = (judge or self.default_judge())(judge_prompt(goal, [(g.ordinal, g.role, g.text) for g in live]),
                                                        live_ids)
                needed = parse_needed(reply, live_ids)
                if live and not needed:  # stored text can steer the judge: "nothing is needed" is never obeyed
                    raise JudgeError("the judge named no segment as needed; refusing to prune the whole session")
            except JudgeError as exc:
                needed, error = [g.ordinal for g in live], str(exc)
            judge_ms = ms(time.perf_counter() - t0)
            doomed = [g.id for g in live if g.ordinal not in set(needed)]  # oldest first
        else:
            low = [g for g in live if low_attention(g.attention or [], window, threshold)]
            doomed = least_attended_first(low, window)
        cap = prune_cap(len(live), float(getattr(self.store.settings, "session_prune_max_fraction", 1.0)))
        doomed, spared = bound_doomed(doomed, cap)
        if policy == "attention":
            needed = [g.ordinal for g in live if g.id not in set(doomed)]
        ordinal_of = {g.id: g.ordinal for g in live}
        pruned = self.drop(bank, session_id, doomed, reason=policy)
        after = before - sum(g.token_count for g in live if g.ordinal in set(pruned))
        return PruneResult(policy=policy, pruned=pruned, needed=needed, tokens_before=before, tokens_after=after,
                           judge_ms=judge_ms, error=error, held_back=sorted(ordinal_of[i] for i in spared))

    def drop(self, bank: str, session_id: str, segment_pks: Sequence[int], reason: str) -> list[int]:
        """Mark segments pruned; their pages are kept for restore during the retention period (deleted at once,
        with blobs no one else uses, when it is 0). Returns their ordinals."""
        if not segment_pks:
            return []
        with self.store.sessions() as s, self.write_lock:
            bank_row = session_bank(s, bank, self.store.llm.fingerprint)
            session = find_session(s, bank_row, session_id)
            rows = s.scalars(select(SessionSegmentRow).where(
                SessionSegmentRow.id.in_(list(segment_pks)), SessionSegmentRow.session_pk == session.id,
                SessionSegmentRow.pruned_at.is_(None))).all()
            ids = [r.id for r in rows]
            blob_ids: set[str] = set()
            if not self.retention.keeps_pages():  # else kept for restore until the retention ends (restore.py)
                blob_ids = set(s.scalars(select(SessionPageRow.blob_id).where(SessionPageRow.segment_pk.in_(ids))))
                s.execute(delete(SessionPageRow).where(SessionPageRow.segment_pk.in_(ids)))
            now = utcnow()
            for r in rows:
                r.pruned_at, r.prune_reason = now, reason
            session.updated_at = now
            s.commit()
            drop_unreferenced(s, self.blobs, blob_ids)
            return sorted(r.ordinal for r in rows)
