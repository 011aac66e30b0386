"""The query path's hook into the query log: a query call that, once answered, records its timings.

Wrapping the call (rather than each route's answer) logs the JSON and the streamed answers of both doors
(``/v1/banks/{bank}/query`` and ``/v1/chat/completions``; MCP goes through the former) in one place; the
record is written on the worker thread right after the answer, off the event loop. A record that cannot be
written is logged and dropped: it never costs the caller the answer.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

from kvstore.bank import BankStore
from kvstore.types import QueryResult

log = logging.getLogger(__name__)


def _answer_and_log(call: partial[QueryResult], store: BankStore, bank: str, question: str, k: int,
                    agent: str | None, door: str, **kwargs: Any) -> QueryResult:
    result = call(**kwargs)
    try:
        store.log_query(bank, question, result, k=k, agent=agent, door=door)
    except Exception:  # noqa: BLE001 - the log is for operators; the caller keeps the answer it already has
        log.warning("could not record a query of bank %s in the query log", bank, exc_info=True)
    return result


def logged(call: partial[QueryResult], store: BankStore, bank: str, question: str, *, k: int, agent: str | None,
           door: str = "rest") -> partial[QueryResult]:
    """``call`` (a ``store.query`` partial) recording its answer in ``bank``'s query log; keyword arguments
    given later (``on_token`` for a stream) pass through."""
    return partial(_answer_and_log, call, store, bank, question, k, agent, door)
