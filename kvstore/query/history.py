"""The per-bank query log: answered queries' timings, for the console and ``GET .../queries``."""

from __future__ import annotations

from sqlalchemy.orm import Session, sessionmaker

from kvstore.config import Settings
from kvstore.errors import ValidationFailed
from kvstore.ports import BankLookup
from kvstore.storage.querylog import LoggedQuery, QueryLogEntry
from kvstore.storage.querylog import recent as recent_log
from kvstore.storage.querylog import record as record_log
from kvstore.types import QueryResult


class QueryHistory:
    def __init__(self, settings: Settings, sessions: sessionmaker[Session], banks: BankLookup) -> None:
        self.settings = settings
        self.sessions = sessions
        self.banks = banks

    def log_query(self, bank: str, question: str, result: QueryResult, *, k: int, agent: str | None,
                  door: str = "rest") -> None:
        """Record an answered query's timings in the bank's query log (the newest ``query_log_keep`` stay)."""
        t, u = result.timings, result.usage
        entry = LoggedQuery(door=door, mode=result.mode, k=k, agent=agent, question=question,
                            retrieve_ms=t.retrieve_ms, load_ms=t.load_ms, prefill_ms=t.prefill_ms, ttft_ms=t.ttft_ms,
                            total_ms=t.total_ms, context_tokens=u.context_tokens, question_tokens=u.question_tokens,
                            generated_tokens=u.generated_tokens)
        with self.sessions() as s:
            record_log(s, self.banks.row(s, bank).id, entry, self.settings.query_log_keep)

    def recent_queries(self, bank: str, *, limit: int = 200) -> list[QueryLogEntry]:
        """The bank's newest logged queries (at most ``limit``), oldest first."""
        if limit < 1 or limit > 1000:
            raise ValidationFailed("limit must be between 1 and 1000")
        with self.sessions() as s:
            return recent_log(s, self.banks.row(s, bank).id, limit)
