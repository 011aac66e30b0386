"""Search and query (plain JSON or server-sent events)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from kvstore.config import Settings
from kvstore.errors import KVRagError, ValidationFailed
from kvstore.types import QueryResult, SearchFilter

from ..auth import Reader
from ..deps import Store, Worker, plain
from ..errors import error_body, request_id_of
from ..querylog import logged
from ..schemas import Filter, HitOut, QueryIn, QueryOut, SearchIn, SearchOut
from ..worker import ModelWorker
from .common import ERRORS

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/banks/{bank}", tags=["retrieval"], responses=ERRORS)


def _filter(flt: Filter | None) -> SearchFilter | None:
    if flt is None:
        return None
    return SearchFilter(agent=flt.agent, tags=flt.tags or [], metadata=flt.metadata or {})


def _check_limits(settings: Settings, k: int, max_new_tokens: int = 0) -> None:
    """The configured limits (the schema holds the hard ceilings)."""
    if k > settings.max_k:
        raise ValidationFailed(f"k must be between 1 and {settings.max_k}")
    if max_new_tokens > settings.max_new_tokens:
        raise ValidationFailed(f"max_new_tokens must be between 0 and {settings.max_new_tokens}")


def _query_out(result: QueryResult) -> dict[str, Any]:
    return QueryOut(**plain(result)).model_dump(mode="json")


@router.post("/search", operation_id="search", response_model=SearchOut)
async def search(bank: str, body: SearchIn, request: Request, store: Store, worker: Worker,
                 _reader: Reader) -> SearchOut:
    """Top-k blocks by embedding similarity; the filter applies before top-k."""
    _check_limits(request.app.state.settings, body.k)
    hits = await worker.run(partial(store.search, bank, body.query, k=body.k, filter=_filter(body.filter),
                                   retrieval=body.retrieval))
    return SearchOut(hits=[HitOut(**plain(h)) for h in hits])


@router.post("/query", operation_id="query", response_model=QueryOut,
             responses={200: {"content": {"text/event-stream": {}},
                              "description": "JSON, or with stream=true events `token` ... then `done`"}})
async def query(bank: str, body: QueryIn, request: Request, store: Store, worker: Worker, reader: Reader) -> Any:
    """Answer from the bank: ``kv`` assembles stored KV, ``text`` re-reads the passages (the baseline).
    ``ttft_ms`` counts from the request's arrival, queueing included."""
    started_at: float = request.state.started_at
    _check_limits(request.app.state.settings, body.k, body.max_new_tokens)
    await run_in_threadpool(store.limits.check_question, body.question)  # 413 now, not after the queue
    call = partial(store.query, bank, body.question, k=body.k, mode=body.mode, max_new_tokens=body.max_new_tokens,
                   filter=_filter(body.filter), started_at=started_at, context_map=body.context_map,
                   retrieval=body.retrieval,
                   recompute=body.recompute,
                   compaction=body.compaction.model_dump(exclude_none=True) if body.compaction else None)
    call = logged(call, store, bank, body.question, k=body.k, agent=reader.agent)
    if not body.stream:
        return _query_out(await worker.run(call))
    # The model work starts first and the bank check runs beside it, not before it (issue 33: a catalog hop on
    # the time to first token). A missing bank is still a 404, not an error event: the answer is not sent yet,
    # and the work's own NotFound is read and dropped by the stream's done callback.
    response = stream_events(request, worker, call)
    await run_in_threadpool(store.get_bank, bank)
    return response


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def stream_events(request: Request, worker: ModelWorker, call: partial[Any],
                  render: Callable[[Any], dict[str, Any]] = _query_out) -> StreamingResponse:
    """Bridge ``on_token`` from the worker thread to the event loop and send each piece as an event; the
    ``done`` event carries ``render(result)`` (sessions' briefs stream the same way)."""
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue[str | None] = asyncio.Queue()

    def on_token(piece: str) -> None:
        loop.call_soon_threadsafe(pieces.put_nowait, piece)

    def finished(fut: asyncio.Future[Any]) -> None:
        # Runs on the loop after every token callback scheduled before it, so the end marker is last.
        # Reading the exception here keeps a client that left early from leaving it "never retrieved".
        if not fut.cancelled():
            fut.exception()
        pieces.put_nowait(None)

    future = worker.submit(partial(call, on_token=on_token))  # a full queue raises here: a 503, not a broken stream
    future.add_done_callback(finished)
    request_id = request_id_of(request)

    async def events() -> AsyncIterator[bytes]:
        while (piece := await pieces.get()) is not None:
            yield _sse("token", {"text": piece})
        try:
            result = future.result()
        except KVRagError as exc:
            yield _sse("error", error_body(exc.code, exc.detail, request_id))
            return
        except Exception:  # noqa: BLE001 - the status is already sent; report in-band, log the rest
            log.exception("streamed query failed (request %s)", request_id)
            yield _sse("error", error_body("internal", "internal server error", request_id))
            return
        yield _sse("done", render(result))

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
