"""What several route modules share: documented error answers, header parsing, idempotent replay."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from kvstore import idempotency
from kvstore.bank import BankStore
from kvstore.errors import BadRequest

from ..schemas import ErrorOut

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorOut, "description": text} for status, text in (
        (400, "Unparseable request"), (401, "Missing or invalid API key"), (403, "Role too low"),
        (404, "Not found (or outside the key's scope)"), (409, "Conflict"), (413, "Body too large"),
        (422, "Invalid input"), (503, "Busy or starting; see Retry-After"))
}


def parse_if_match(value: str | None) -> int | None:
    """``If-Match: 3`` or ``"3"`` (an ETag as we send it) -> 3; 0 means "must not exist yet"."""
    if value is None:
        return None
    raw = value.strip()
    if raw.startswith("W/"):
        raw = raw[2:]
    raw = raw.strip('"')
    if not raw.isdigit():
        raise BadRequest("If-Match must be a document version number")
    return int(raw)


def etag(version: int) -> str:
    return f'"{version}"'


async def idempotent(request: Request, store: BankStore, bank: str, key: str | None, payload: Any,
                     work: Callable[[], Awaitable[tuple[int, dict[str, Any]]]]) -> tuple[int, dict[str, Any]]:
    """Run ``work`` once per Idempotency-Key: a retry with the same request gets the stored answer,
    the same key on a different request is a 409. Only successful answers are stored, so a failed
    attempt can be retried."""
    if key is None:
        return await work()
    req_hash = idempotency.request_hash(request.method, request.url.path, payload)
    stored = await run_in_threadpool(idempotency.lookup, store.sessions, bank, key, req_hash)
    if stored is not None:
        return stored.status_code, stored.body
    status, body = await work()
    await run_in_threadpool(idempotency.save, store.sessions, bank, key, req_hash, status, body)
    return status, body
