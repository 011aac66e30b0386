"""What several route modules share: documented error answers, header parsing, idempotent replay."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import Header, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from kvstore.bank import BankStore
from kvstore.errors import BadRequest
from kvstore.storage import idempotency

from ..schemas import ErrorOut

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorOut, "description": text} for status, text in (
        (400, "Unparseable request"), (401, "Missing or invalid API key"), (403, "Role too low"),
        (404, "Not found (or outside the key's scope)"), (409, "Conflict"),
        (413, "Body too large, or a text over its token cap"), (422, "Invalid input"),
        (503, "Busy or starting; see Retry-After"))
}


IdempotencyKey = Annotated[str | None, Header(max_length=200, description="A retry with this key and the same "
                                                                        "request gets the first answer back.")]


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


def record_owner(request: Request) -> str:
    """Whose idempotency record this request makes: the API key's id, ``root`` for the admin key (and open mode).
    Every write route authenticates first (``server.auth.resolve_principal`` remembers the principal)."""
    principal = getattr(request.state, "principal", None)
    if principal is None:
        raise RuntimeError("idempotent() on a route without a principal")
    return principal.key_id or "root"


async def idempotent(request: Request, store: BankStore, bank: str, key: str | None, payload: Any,
                     work: Callable[[], Awaitable[tuple[int, dict[str, Any]]]]) -> tuple[int, dict[str, Any]]:
    """Run ``work`` once per Idempotency-Key and API key: a retry with the same request gets the stored answer,
    the same key on a different request is a 409; another API key's record under the same Idempotency-Key is
    neither replayed nor a conflict. Only successful answers are stored, so a failed attempt can be retried;
    they expire after KVRAG_IDEMPOTENCY_TTL_S."""
    if key is None:
        return await work()
    owner, ttl_s = record_owner(request), request.app.state.settings.idempotency_ttl_s
    req_hash = idempotency.request_hash(request.method, request.url.path, payload)
    stored = await run_in_threadpool(idempotency.lookup, store.sessions, bank, owner, key, req_hash, ttl_s)
    if stored is not None:
        return stored.status_code, stored.body
    status, body = await work()
    # A twin of this request that finished first (on any replica) keeps the key: answer as it did.
    kept = await run_in_threadpool(idempotency.save, store.sessions, bank, owner, key, req_hash, status, body, ttl_s)
    return kept.status_code, kept.body


async def replayable(request: Request, store: BankStore, bank: str, key: str | None, payload: Any,
                     work: Callable[[], Awaitable[BaseModel | None]], status_code: int = 200) -> Response:
    """``idempotent`` for a route whose work returns a response model (or None for a 204): a write the SDK
    may resend after a lost answer is done once per Idempotency-Key, and the resend gets the first answer."""

    async def run() -> tuple[int, dict[str, Any]]:
        out = await work()
        return status_code, {} if out is None else out.model_dump(mode="json")

    code, body = await idempotent(request, store, bank, key, payload, run)
    return Response(status_code=code) if code == 204 else JSONResponse(body, status_code=code)
