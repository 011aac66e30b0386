"""The query log: answered queries of a bank with their timings, the last few per bank.

The context map keeps the questions it distills (``context_map_queries``) without timings; this log keeps
what an operator charts (mode, k, timings, tokens) and only a short preview of the question, which the
console shows to the agent who asked and to admins. Rows go with their bank (``ON DELETE CASCADE``).
No web imports: the facade (``BankStore.log_query`` / ``recent_queries``) calls these inside its sessions.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from kvstore.storage.catalog import QueryLogRow, utcnow

PREVIEW_CHARS = 80
DOORS = ("rest", "openai")


@dataclass
class QueryLogEntry:
    """One logged query. ``question_preview``: the first ``PREVIEW_CHARS`` characters of the question."""

    id: int
    at: datetime
    door: str
    mode: str
    k: int
    agent: str | None
    question_preview: str
    question_chars: int
    retrieve_ms: float
    load_ms: float
    prefill_ms: float
    ttft_ms: float
    total_ms: float
    context_tokens: int
    question_tokens: int
    generated_tokens: int


@dataclass
class LoggedQuery:
    """What the query path hands the log (the timings and usage of a ``QueryResult``)."""

    door: str
    mode: str
    k: int
    agent: str | None
    question: str
    retrieve_ms: float
    load_ms: float
    prefill_ms: float
    ttft_ms: float
    total_ms: float
    context_tokens: int
    question_tokens: int
    generated_tokens: int


def preview(question: str) -> str:
    """The question cut to ``PREVIEW_CHARS`` characters, whitespace runs folded (it is shown on one line)."""
    folded = " ".join(question.split())
    return folded if len(folded) <= PREVIEW_CHARS else folded[:PREVIEW_CHARS - 1] + "…"


def record(s: Session, bank_id: int, entry: LoggedQuery, keep: int) -> None:
    """Add one query and drop the bank's entries beyond the newest ``keep``; commits."""
    s.add(QueryLogRow(bank_id=bank_id, at=utcnow(), door=entry.door if entry.door in DOORS else "rest",
                      mode=entry.mode, k=entry.k, agent=entry.agent, question_preview=preview(entry.question),
                      question_chars=len(entry.question), retrieve_ms=entry.retrieve_ms, load_ms=entry.load_ms,
                      prefill_ms=entry.prefill_ms, ttft_ms=entry.ttft_ms, total_ms=entry.total_ms,
                      context_tokens=entry.context_tokens, question_tokens=entry.question_tokens,
                      generated_tokens=entry.generated_tokens))
    s.flush()
    # The (bank_id, id) index makes this an index walk of ``keep`` entries, not a scan of the table.
    cutoff = s.scalar(select(QueryLogRow.id).where(QueryLogRow.bank_id == bank_id)
                      .order_by(QueryLogRow.id.desc()).offset(keep).limit(1))
    if cutoff is not None:
        s.execute(delete(QueryLogRow).where(QueryLogRow.bank_id == bank_id, QueryLogRow.id <= cutoff))
    s.commit()


def recent(s: Session, bank_id: int, limit: int) -> list[QueryLogEntry]:
    """The bank's newest ``limit`` entries, oldest first (the order a chart draws them in)."""
    rows = s.scalars(select(QueryLogRow).where(QueryLogRow.bank_id == bank_id)
                     .order_by(QueryLogRow.id.desc()).limit(limit)).all()
    return [QueryLogEntry(id=r.id, at=r.at, door=r.door, mode=r.mode, k=r.k, agent=r.agent,
                          question_preview=r.question_preview, question_chars=r.question_chars,
                          retrieve_ms=r.retrieve_ms, load_ms=r.load_ms, prefill_ms=r.prefill_ms, ttft_ms=r.ttft_ms,
                          total_ms=r.total_ms, context_tokens=r.context_tokens, question_tokens=r.question_tokens,
                          generated_tokens=r.generated_tokens) for r in reversed(rows)]
