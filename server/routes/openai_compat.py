"""The OpenAI-compatible door: ``POST /v1/chat/completions`` and ``GET /v1/models``.

``model`` names a bank (``kvrag:<bank>``, else ``openai_default_bank``); the last user message is the
question, earlier messages ride along as conversation context; retrieval and KV assembly happen here,
exactly as ``POST /v1/banks/{bank}/query`` in kv mode. Unlike every other route, unknown request fields
are ignored (OpenAI clients send many), and errors use OpenAI's shape
``{"error": {"message", "type", "code", "param"}}`` so OpenAI SDKs raise their usual exceptions.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from functools import partial
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from kvstore.bank import BankStore
from kvstore.errors import KVRagError, NotFound, PayloadTooLarge, ValidationFailed
from kvstore.types import QueryResult

from ..auth import AnyKey, check_bank
from ..deps import Store, Worker
from ..errors import RETRY_STATUSES, client_detail, request_id_of, status_of
from ..querylog import logged
from ..schemas import ErrorOut
from ..settings import ServerSettings
from ..worker import ModelWorker

log = logging.getLogger(__name__)

MODEL_PREFIX = "kvrag:"
DEFAULT_MAX_TOKENS = 256
# Earlier turns are context, not the question: keep the most recent part so the question stays in view
# of a small model's window and of retrieval, which embeds the whole text.
HISTORY_CHARS = 2000
_FRAMING_TOKENS = 32  # "Earlier in this conversation:" ... "Now:" around the history
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error",
               429: "rate_limit_error", 503: "server_error"}


# -- errors -------------------------------------------------------------------------------------------


def openai_error(status: int, message: str, code: str, param: str | None = None,
                 request_id: str | None = None, retry_after_s: int = 1) -> JSONResponse:
    """An error in OpenAI's shape; 429/503 carry Retry-After like every kvrag answer."""
    headers = {"Retry-After": str(retry_after_s)} if status in RETRY_STATUSES else {}
    body = {"error": {"message": client_detail(message, request_id), "type": ERROR_TYPES.get(status, "api_error"),
                      "code": code, "param": param}}
    if request_id:
        headers["X-Request-ID"] = request_id
    return JSONResponse(body, status_code=status, headers=headers)


class OpenAIError(KVRagError):
    """A kvrag error that names the offending request field (OpenAI's ``param``)."""

    def __init__(self, error: KVRagError, param: str, code: str | None = None) -> None:
        super().__init__(error.detail)
        self.code = code or error.code
        self.status = status_of(error)
        self.param = param


def _from_exception(request: Request, exc: KVRagError | RequestValidationError) -> JSONResponse:
    """OpenAI answers 400 for any invalid parameter, where kvrag says 422."""
    retry = request.app.state.settings.retry_after_s
    request_id = request_id_of(request)
    if isinstance(exc, RequestValidationError):
        errors = list(exc.errors())
        first = errors[0] if errors else {}
        param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        if first.get("type") == "json_invalid":
            return openai_error(400, "request body is not valid JSON", "bad_request", None, request_id)
        return openai_error(400, f"{param}: {first.get('msg', 'invalid')}", "validation_error", param, request_id)
    status = exc.status if isinstance(exc, OpenAIError) else status_of(exc)
    status = 400 if status == 422 else status
    param = exc.param if isinstance(exc, OpenAIError) else None
    return openai_error(status, exc.detail, exc.code, param, request_id, retry)


class OpenAIErrorRoute(APIRoute):
    """A route whose errors (auth, validation, domain) come back in OpenAI's error shape."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            try:
                return await handler(request)
            except (KVRagError, RequestValidationError) as exc:
                return _from_exception(request, exc)

        return guarded


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    code: str | None = None
    param: str | None = None


class OpenAIErrorOut(BaseModel):
    error: OpenAIErrorDetail


# Errors raised before the route runs (body size, JSON depth, unknown routes) keep kvrag's own shape.
OPENAI_ERRORS: dict[int | str, dict[str, Any]] = {
    **{status: {"model": OpenAIErrorOut, "description": text} for status, text in (
        (400, "Invalid request (OpenAI shape)"), (401, "Missing or invalid API key"), (403, "Role too low"),
        (404, "Unknown bank, or outside the key's scope"), (409, "Conflict"), (429, "Rate limited"),
        (503, "Busy or starting; see Retry-After"))},
    413: {"model": ErrorOut, "description": "Body too large"},
    422: {"model": ErrorOut, "description": "Body nested too deeply"},
}

router = APIRouter(prefix="/v1", tags=["openai"], route_class=OpenAIErrorRoute, responses=OPENAI_ERRORS)


# -- request ------------------------------------------------------------------------------------------


class ChatMessage(BaseModel):
    """An OpenAI chat message; only the text of ``content`` is used."""

    role: str
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The text of the message (text parts of a multi-part content joined)."""
        if isinstance(self.content, str):
            return self.content
        parts = self.content or []
        return "\n".join(p["text"] for p in parts if p.get("type") == "text" and isinstance(p.get("text"), str))


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionIn(BaseModel):
    """The OpenAI request body. Fields kvrag has no use for (``top_p``, ``tools``, ``seed``, ...) are ignored,
    as OpenAI-compatible servers do; ``temperature`` is accepted, decoding stays greedy."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=0)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    temperature: float | None = Field(default=None, ge=0, le=2)
    stop: str | list[str] | None = None
    n: int = 1
    k: int = Field(default=5, ge=1, le=100, description="kvrag: passages to retrieve.")


def _bank_for(model: str, settings: ServerSettings) -> str:
    if model.startswith(MODEL_PREFIX) and model != MODEL_PREFIX:
        return model[len(MODEL_PREFIX):]
    if settings.openai_default_bank:
        return settings.openai_default_bank
    raise OpenAIError(NotFound(f"model {model!r} not found: use {MODEL_PREFIX}<bank>"), "model", "model_not_found")


def question_text(messages: list[ChatMessage], history_bytes: int = HISTORY_CHARS) -> str:
    """The last user message, after the earlier turns (the most recent ``HISTORY_CHARS`` characters, and at most
    ``history_bytes`` UTF-8 bytes) as context."""
    last = messages[-1]
    if last.role != "user" or not last.text().strip():
        raise OpenAIError(ValidationFailed("the last message must be a user message with text"), "messages")
    history = "\n".join(f"{m.role}: {m.text()}" for m in messages[:-1] if m.text().strip())
    history = history[-HISTORY_CHARS:].encode()[-history_bytes:].decode(errors="ignore") if history_bytes > 0 else ""
    if not history.strip():
        return last.text()
    return f"Earlier in this conversation:\n{history}\n\nNow: {last.text()}"


def capped_question(messages: list[ChatMessage], store: BankStore) -> str:
    """:func:`question_text` within the question's token cap: the last message alone must fit (else 413); the
    history gets the room left. A token never spells less than one byte, so history bytes bound its tokens."""
    limits = store.limits
    try:
        last_tokens = limits.check_question(messages[-1].text()) if messages[-1].role == "user" else 0
        question = question_text(messages, max(0, limits.caps.question - last_tokens - _FRAMING_TOKENS))
        limits.check_question(question)
    except PayloadTooLarge as exc:
        raise OpenAIError(exc, "messages") from None
    return question


def _max_new_tokens(body: ChatCompletionIn, settings: ServerSettings) -> int:
    wanted = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    value = min(DEFAULT_MAX_TOKENS, settings.max_new_tokens) if wanted is None else wanted
    if value > settings.max_new_tokens:
        raise OpenAIError(ValidationFailed(f"{param} must be at most {settings.max_new_tokens}"), param)
    return value


def _stops(body: ChatCompletionIn) -> list[str]:
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > 4:
        raise OpenAIError(ValidationFailed("stop takes at most 4 sequences"), "stop")
    return [s for s in stops if s]


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """``text`` up to the first stop sequence, and whether one was found."""
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[:min(cuts)], True) if cuts else (text, False)


# -- response -----------------------------------------------------------------------------------------


def _finish_reason(result: QueryResult, max_new_tokens: int, stopped: bool) -> str:
    return "length" if not stopped and result.usage.generated_tokens >= max_new_tokens else "stop"


def _usage(result: QueryResult) -> dict[str, int]:
    prompt = result.usage.context_tokens + result.usage.question_tokens
    return {"prompt_tokens": prompt, "completion_tokens": result.usage.generated_tokens,
            "total_tokens": prompt + result.usage.generated_tokens}


def _kvrag_extra(result: QueryResult) -> dict[str, Any]:
    """What kvrag adds to the OpenAI object: the passages the answer came from and the timings."""
    return {"sources": [{"doc_id": h.doc_id, "block_id": h.block_id, "score": h.score} for h in result.sources],
            "timings": {"ttft_ms": result.timings.ttft_ms, "total_ms": result.timings.total_ms}}


class Completion:
    """Identity of one completion, shared by all its chunks."""

    def __init__(self, model: str) -> None:
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model

    def message(self, result: QueryResult, max_new_tokens: int, stops: list[str]) -> dict[str, Any]:
        answer, stopped = cut_at_stop(result.answer, stops)
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                             "finish_reason": _finish_reason(result, max_new_tokens, stopped), "logprobs": None}],
                "usage": _usage(result), "kvrag": _kvrag_extra(result)}

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None, **extra: Any) -> bytes:
        data = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
                **extra}
        return _sse(data)


def _sse(data: dict[str, Any] | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


# -- routes -------------------------------------------------------------------------------------------


@router.get("/models", operation_id="openai_list_models")
def list_models(store: Store, principal: AnyKey) -> dict[str, Any]:
    """The banks this key can see, as OpenAI models ``kvrag:<bank>``."""
    names = None if principal.all_banks else set(principal.banks)
    return {"object": "list", "data": [
        {"id": MODEL_PREFIX + b.name, "object": "model", "created": int(b.created_at.timestamp()),
         "owned_by": "kvrag"} for b in store.list_banks(names)]}


@router.post("/chat/completions", operation_id="openai_chat_completions",
             responses={200: {"content": {"text/event-stream": {}},
                              "description": "A chat.completion, or with stream=true chat.completion.chunk events "
                                             "ending with `data: [DONE]`"}})
async def chat_completions(body: ChatCompletionIn, request: Request, store: Store, worker: Worker,
                           principal: AnyKey) -> Any:
    """Answer the last user message from the bank named by ``model`` (kv mode)."""
    settings: ServerSettings = request.app.state.settings
    bank = _bank_for(body.model, settings)
    try:
        check_bank(principal, bank, "read")
        await run_in_threadpool(store.get_bank, bank)  # an unknown bank is a 404 now, not an error in a stream
    except NotFound as exc:
        raise OpenAIError(exc, "model", "model_not_found") from None
    if body.n != 1:
        raise OpenAIError(ValidationFailed("only n=1 is supported"), "n")
    if body.k > settings.max_k:
        raise OpenAIError(ValidationFailed(f"k must be at most {settings.max_k}"), "k")
    max_new_tokens = _max_new_tokens(body, settings)
    stops = _stops(body)
    question = await run_in_threadpool(capped_question, body.messages, store)  # a 413 before queueing
    call = logged(partial(store.query, bank, question, k=body.k, mode="kv", max_new_tokens=max_new_tokens,
                          started_at=request.state.started_at), store, bank, question, k=body.k,
                  agent=principal.agent, door="openai")
    completion = Completion(body.model)
    if not body.stream:
        return completion.message(await worker.run(call), max_new_tokens, stops)
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    return _stream(request, worker, call, completion, max_new_tokens, stops, include_usage)


class StopScanner:
    """Streams text while holding back just enough to never emit the start of a stop sequence."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def feed(self, piece: str) -> str:
        """The new text that is safe to send (empty once a stop sequence was seen)."""
        if self.stopped:
            return ""
        self.text += piece
        cut, self.stopped = cut_at_stop(self.text, self.stops)
        safe = len(cut) if self.stopped else max(self.emitted, len(self.text) - self.hold)
        out, self.emitted = cut[self.emitted:safe], safe
        return out

    def flush(self) -> str:
        """What was held back, at the end of the answer."""
        out = "" if self.stopped else self.text[self.emitted:]
        self.emitted = len(self.text)
        return out


def _stream(request: Request, worker: ModelWorker, call: partial[QueryResult], completion: Completion,
            max_new_tokens: int, stops: list[str], include_usage: bool) -> StreamingResponse:
    """``chat.completion.chunk`` events from the worker's tokens, then ``[DONE]``."""
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue[str | None] = asyncio.Queue()

    def finished(fut: asyncio.Future[QueryResult]) -> None:
        # Runs on the loop after every token callback scheduled before it, so the end marker comes last.
        if not fut.cancelled():
            fut.exception()
        pieces.put_nowait(None)

    future = worker.submit(partial(call, on_token=lambda p: loop.call_soon_threadsafe(pieces.put_nowait, p)))
    future.add_done_callback(finished)
    request_id = request_id_of(request)
    scanner = StopScanner(stops)

    async def events() -> AsyncIterator[bytes]:
        yield completion.chunk({"role": "assistant", "content": ""})
        while (piece := await pieces.get()) is not None:
            if text := scanner.feed(piece):
                yield completion.chunk({"content": text})
        try:
            result = future.result()
        except KVRagError as exc:
            yield _sse({"error": {"message": client_detail(exc.detail, request_id),
                                  "type": ERROR_TYPES.get(status_of(exc), "api_error"), "code": exc.code,
                                  "param": None}})
            return
        except Exception:  # noqa: BLE001 - the status is already sent; report in-band, log the rest
            log.exception("streamed chat completion failed (request %s)", request_id)
            yield _sse({"error": {"message": "internal server error", "type": "api_error", "code": "internal",
                                  "param": None}})
            return
        if text := scanner.flush():
            yield completion.chunk({"content": text})
        yield completion.chunk({}, _finish_reason(result, max_new_tokens, scanner.stopped), kvrag=_kvrag_extra(result))
        if include_usage:
            yield _sse({"id": completion.id, "object": "chat.completion.chunk", "created": completion.created,
                        "model": completion.model, "choices": [], "usage": _usage(result)})
        yield _sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
