"""What the sync and async clients share: request descriptions, retry policy, raw responses, SSE parsing, config."""

from __future__ import annotations

import contextvars
import email.utils
import functools
import json
import os
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Generic, ParamSpec, TypeVar

import httpx

from ._exceptions import APIConnectionError, APITimeoutError, error_class, error_from_body
from ._version import __version__
from .types import DoneEvent, QueryResult, StreamEvent, TokenEvent

T = TypeVar("T")
P = ParamSpec("P")
R = TypeVar("R")
TimeoutLike = float | httpx.Timeout

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
# Queries on a small CPU can take a while to produce the whole answer; connecting should not.
DEFAULT_TIMEOUT = httpx.Timeout(120.0, connect=5.0)
RETRY_STATUSES = frozenset({429, 503})
# Methods that change nothing more when repeated, so a request that may have reached the server can be resent.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
IDEMPOTENCY_HEADER = "Idempotency-Key"


@dataclass(frozen=True)
class Call(Generic[T]):
    """One REST call: what to send and how to turn the JSON answer into a typed value."""

    method: str
    path: str
    parse: Callable[[Any], T]
    json: Any = None
    params: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    # Safe to resend after an answer was lost (reads, upserts); POSTs that create things are not.
    idempotent: bool | None = None
    # A write the server replays from its Idempotency-Key record: the client sends a key (one per logical
    # call, the same on every retry), which makes it safe to resend after a lost answer.
    keyed: bool = False
    retries: bool = True

    @property
    def safe_to_resend(self) -> bool:
        if self.keyed:
            return True
        return self.idempotent if self.idempotent is not None else self.method in IDEMPOTENT_METHODS

    def with_idempotency_key(self) -> Call[T]:
        """This call with an ``Idempotency-Key`` header: the caller's if it set one, else a new random one."""
        if any(name.lower() == IDEMPOTENCY_HEADER.lower() for name in self.headers):
            return self
        return replace(self, headers={**self.headers, IDEMPOTENCY_HEADER: f"kvrag-{uuid.uuid4().hex}"})


@dataclass(frozen=True)
class RawResponse(Generic[R]):
    """What ``client.with_raw_response.<resource>.<method>(...)`` returns: the HTTP status and headers of the
    answer with the value the plain method returns (``parsed``, or ``parse()`` as openai-python has it)."""

    status_code: int
    headers: httpx.Headers
    parsed: R
    http_response: httpx.Response

    @property
    def request_id(self) -> str | None:
        value: str | None = self.headers.get("x-request-id")
        return value

    def parse(self) -> R:
        return self.parsed


# Set by a raw-response wrapper for the duration of one method call; the client records its answers there.
_RAW_SLOT: contextvars.ContextVar[list[httpx.Response] | None] = contextvars.ContextVar("kvrag_raw", default=None)


def record_response(response: httpx.Response) -> None:
    """Keep ``response`` for the raw-response wrapper running this call, if any."""
    slot = _RAW_SLOT.get()
    if slot is not None:
        slot.append(response)


def _raw(slot: list[httpx.Response], parsed: R) -> RawResponse[R]:
    if not slot:
        raise RuntimeError("the call sent no request to take a raw response from")
    last = slot[-1]
    return RawResponse(status_code=last.status_code, headers=last.headers, parsed=parsed, http_response=last)


def raw_wrapper(method: Callable[P, R]) -> Callable[P, RawResponse[R]]:
    """``method`` returning a ``RawResponse`` of its answer instead of the parsed value alone."""

    @functools.wraps(method)
    def wrapped(*args: P.args, **kwargs: P.kwargs) -> RawResponse[R]:
        slot: list[httpx.Response] = []
        token = _RAW_SLOT.set(slot)
        try:
            parsed = method(*args, **kwargs)
        finally:
            _RAW_SLOT.reset(token)
        return _raw(slot, parsed)

    return wrapped


def async_raw_wrapper(method: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[RawResponse[R]]]:
    """The ``raw_wrapper`` of a coroutine method (the context variable follows the awaiting task)."""

    @functools.wraps(method)
    async def wrapped(*args: P.args, **kwargs: P.kwargs) -> RawResponse[R]:
        slot: list[httpx.Response] = []
        token = _RAW_SLOT.set(slot)
        try:
            parsed = await method(*args, **kwargs)
        finally:
            _RAW_SLOT.reset(token)
        return _raw(slot, parsed)

    return wrapped


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter; a server's ``Retry-After`` wins when it is reasonable."""

    max_retries: int = 3
    initial_delay: float = 0.5
    max_delay: float = 8.0
    max_retry_after: float = 60.0

    def delay(self, attempt: int, response: httpx.Response | None = None) -> float:
        """Seconds to wait before retry number ``attempt + 1``."""
        if response is not None:
            retry_after = parse_retry_after(response.headers.get("retry-after"))
            if retry_after is not None and 0 <= retry_after <= self.max_retry_after:
                return retry_after
        backoff: float = min(self.max_delay, self.initial_delay * 2.0**attempt)
        return backoff * (1 - 0.25 * random.random())

    def retry_status(self, attempt: int, status: int) -> bool:
        return attempt < self.max_retries and status in RETRY_STATUSES

    def retry_exception(self, attempt: int, exc: httpx.TransportError, call: Call[Any]) -> bool:
        """Connection failures before sending are always safe to retry; lost answers only for idempotent calls."""
        if attempt >= self.max_retries:
            return False
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout):
            return True
        return call.safe_to_resend


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds: a number or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def transport_error(exc: httpx.TransportError) -> APIConnectionError:
    """The SDK's exception for an httpx transport failure."""
    request = exc.request if _has_request(exc) else None
    if isinstance(exc, httpx.TimeoutException):
        return APITimeoutError(f"request timed out: {exc}", request=request)
    return APIConnectionError(f"connection error: {exc}", request=request)


def _has_request(exc: httpx.TransportError) -> bool:
    try:
        exc.request  # noqa: B018 - httpx raises RuntimeError when the error carries no request
    except RuntimeError:
        return False
    return True


@dataclass(frozen=True)
class ClientConfig:
    """Base URL, credentials, timeout, retry policy and extra headers of one client (``with_options`` copies it)."""

    base_url: str
    api_key: str | None
    timeout: httpx.Timeout
    retry: RetryPolicy
    headers: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def create(cls, base_url: str | None, api_key: str | None, timeout: TimeoutLike | None, max_retries: int,
               headers: Mapping[str, str] | None = None) -> ClientConfig:
        """Arguments first, then ``$KVRAG_URL`` / ``$KVRAG_API_KEY``, then the defaults."""
        return cls(base_url=(base_url or os.environ.get("KVRAG_URL") or DEFAULT_BASE_URL).rstrip("/"),
                   api_key=api_key if api_key is not None else os.environ.get("KVRAG_API_KEY") or None,
                   timeout=DEFAULT_TIMEOUT if timeout is None else httpx.Timeout(timeout),
                   retry=RetryPolicy(max_retries=max_retries), headers=dict(headers or {}))

    def with_options(self, timeout: TimeoutLike | None, max_retries: int | None,
                     headers: Mapping[str, str] | None) -> ClientConfig:
        """A copy with the given options changed (``headers`` are added to the ones already set)."""
        return replace(self, timeout=self.timeout if timeout is None else httpx.Timeout(timeout),
                       retry=self.retry if max_retries is None else replace(self.retry, max_retries=max_retries),
                       headers={**self.headers, **(headers or {})})

    def request_timeout(self, timeout: TimeoutLike | None) -> httpx.Timeout:
        """A per-call ``timeout=`` when given, else the client's."""
        return self.timeout if timeout is None else httpx.Timeout(timeout)

    def prepare(self, call: Call[T]) -> Call[T]:
        """The call as it will be sent by every attempt: a write the server replays gets its Idempotency-Key
        now, once, so each retry of this logical call carries the same one."""
        return call.with_idempotency_key() if call.keyed and call.retries and self.retry.max_retries > 0 else call

    def default_headers(self) -> dict[str, str]:
        headers = {"User-Agent": f"kvrag-client/{__version__}", "Accept": "application/json", **self.headers}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers


class SSEDecoder:
    """Turns the lines of a ``text/event-stream`` body into (event, data) pairs."""

    def __init__(self) -> None:
        self._event: str | None = None
        self._data: list[str] = []

    def feed(self, line: str) -> tuple[str, str] | None:
        """Consume one line; return a complete event at the blank line that ends it."""
        line = line.rstrip("\r\n")
        if not line:
            if not self._data and self._event is None:
                return None
            out = (self._event or "message", "\n".join(self._data))
            self._event, self._data = None, []
            return out
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        return None

    def flush(self) -> tuple[str, str] | None:
        """An event left without its closing blank line when the body ended."""
        return self.feed("")


class EventReader:
    """Lines of a streamed query in, typed events out; remembers the final result."""

    def __init__(self, request_id: str | None) -> None:
        self.request_id = request_id
        self.result: QueryResult | None = None
        self._decoder = SSEDecoder()

    def feed(self, line: str) -> StreamEvent | None:
        raw = self._decoder.feed(line)
        return None if raw is None else self._typed(*raw)

    def finish(self) -> StreamEvent | None:
        """The event the body ended on, if any; raises when the stream ended without its final event."""
        raw = self._decoder.flush()
        event = None if raw is None else self._typed(*raw)
        if self.result is None:
            raise APIConnectionError("the stream ended before its final event")
        return event

    def _typed(self, event: str, data: str) -> StreamEvent | None:
        typed = stream_event(event, data, self.request_id)
        if isinstance(typed, DoneEvent):
            self.result = typed.result
        return typed


def stream_event(event: str, data: str, request_id: str | None) -> StreamEvent | None:
    """Typed event of a streamed query; raises the API error an ``error`` event carries."""
    payload = json.loads(data) if data else {}
    if event == "token":
        return TokenEvent(text=payload.get("text", ""))
    if event == "done":
        return DoneEvent(result=QueryResult.model_validate(payload.get("result", payload)))
    if event == "error":
        status = payload.get("status") if isinstance(payload.get("status"), int) else None
        raise error_from_body(status or error_class(0, payload.get("code")).status or 500, payload, request_id)
    return None
