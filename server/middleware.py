"""Request context: request id, body limits, metrics, and a JSON 500 for anything unexpected.

A pure ASGI middleware (not BaseHTTPMiddleware) so streamed responses pass through untouched and
the body can be read once, checked, and replayed to the route.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.message
import json
import logging
import re
import time
import uuid
from typing import Any

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import error_response
from .metrics import Metrics
from .settings import ServerSettings

log = logging.getLogger(__name__)

_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_BODY_METHODS = {"POST", "PUT", "PATCH", "DELETE"}


def has_lone_surrogate(value: Any) -> bool:
    """Whether parsed JSON holds a string (or key) with a lone UTF-16 surrogate: ``"\\ud800"`` is valid
    JSON but not text; it cannot be encoded, stored or tokenized. Computed without recursion."""
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def json_depth(value: Any) -> int:
    """Nesting depth of parsed JSON (a scalar is 0, ``{}`` is 1), computed without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            deepest = max(deepest, depth)
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            deepest = max(deepest, depth)
            stack.extend((v, depth + 1) for v in item)
    return deepest


def media_type(content_type: str) -> str:
    """``type/subtype`` of a ``Content-Type``, lower case, without parameters; parsed as a MIME header, the way
    FastAPI parses it, so no spelling means one thing here and another to a route."""
    message = email.message.Message()
    message["content-type"] = content_type
    return message.get_content_type()


def is_json_media_type(content_type: str) -> bool:
    """Whether FastAPI parses a body of this ``Content-Type`` as JSON: ``application/json`` or
    ``application/*+json`` in any case, with any parameters."""
    maintype, _, subtype = media_type(content_type).partition("/")
    return maintype == "application" and (subtype == "json" or subtype.endswith("+json"))


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None


class RequestContextMiddleware:
    """Gives every request an id (echoed as ``X-Request-ID``), enforces size and depth limits before
    the route runs, records metrics, and turns an unhandled exception into a JSON 500."""

    def __init__(self, app: ASGIApp, settings: ServerSettings, metrics: Metrics) -> None:
        self.app = app
        self.settings = settings
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        offered = _header(scope, b"x-request-id")
        request_id = offered if offered and _CLIENT_REQUEST_ID.fullmatch(offered) else uuid.uuid4().hex
        scope.setdefault("state", {})
        scope["state"]["request_id"] = request_id
        scope["state"]["started_at"] = started
        status = {"code": 500, "sent": False}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"], status["sent"] = message["status"], True
                MutableHeaders(scope=message)["X-Request-ID"] = request_id
            await send(message)

        try:
            replay = await self._checked_body(scope, receive, send_with_id, request_id)
            if replay is not None:
                await self.app(scope, replay, send_with_id)
        except Exception:  # noqa: BLE001 - the last line of defence: log it here, never show it to clients
            log.exception("unhandled error in %s %s (request %s)", scope["method"], scope["path"], request_id)
            if not status["sent"]:
                await error_response(500, "internal", "internal server error", request_id)(scope, receive,
                                                                                            send_with_id)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.metrics.observe(scope["method"], template, int(status["code"]), time.perf_counter() - started)

    async def _checked_body(self, scope: Scope, receive: Receive, send: Send, request_id: str) -> Receive | None:
        """Read the body under the size limit and check JSON depth; answer the error and return None
        when a limit is broken, else return a ``receive`` that replays the body."""
        if scope["method"] not in _BODY_METHODS:
            return receive
        limit = self.settings.max_body_bytes
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._too_large(scope, receive, send, request_id)
            return None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._too_large(scope, receive, send, request_id)
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        problem = self._json_problem(scope, body)
        if problem:
            status, code, detail = problem
            await self._reject(scope, receive, send, status, code, detail, request_id)
            return None
        return _replay(body, receive)

    def _json_problem(self, scope: Scope, body: bytes) -> tuple[int, str, str] | None:
        """(status, code, message) when the JSON body nests deeper than allowed (422) or holds strings that
        are not text (400); unparseable JSON is left to the route (it answers 400), so this check never
        hides a syntax error."""
        content_type = _header(scope, b"content-type")
        # No Content-Type: FastAPI does not parse the body, but a mounted app (MCP) may; check it anyway.
        if not body or (content_type is not None and not is_json_media_type(content_type)):
            return None
        limit = self.settings.max_json_depth
        try:
            parsed = json.loads(body)
        except RecursionError:
            return 422, "validation_error", f"JSON nesting exceeds {limit} levels"
        except ValueError:
            return None
        if json_depth(parsed) > limit:
            return 422, "validation_error", f"JSON nesting exceeds {limit} levels"
        if has_lone_surrogate(parsed):
            return 400, "bad_request", "JSON strings must be valid Unicode text (a lone surrogate escape was sent)"
        return None

    async def _too_large(self, scope: Scope, receive: Receive, send: Send, request_id: str) -> None:
        """413, then drain: send the whole answer, read and drop what the client still sends (up to
        ``oversize_drain_bytes`` for ``oversize_drain_s``), then close, as nginx's lingering close does. Closing a
        socket with unread data in it resets the connection, and the reset destroys the answer the client has not
        read yet: a client that sends its whole body before reading (most do) would see a broken connection
        instead of the 413. The connection is closed afterwards, so the rest of a huge body is never read.
        A client that sent ``Expect: 100-continue`` has not sent the body: nothing is drained (reading would
        invite it)."""
        limit = self.settings.max_body_bytes
        answer = error_response(413, "payload_too_large", f"request body exceeds {limit} bytes", request_id)
        await send({"type": "http.response.start", "status": 413,
                    "headers": [*answer.raw_headers, (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": answer.body, "more_body": True})
        if (_header(scope, b"expect") or "").lower() != "100-continue":
            await _drain(receive, self.settings.oversize_drain_bytes, self.settings.oversize_drain_s)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _reject(self, scope: Scope, receive: Receive, send: Send, status: int, code: str, detail: str,
                      request_id: str) -> None:
        await error_response(status, code, detail, request_id)(scope, receive, send)


async def _drain(receive: Receive, max_bytes: int, max_s: float) -> None:
    """Read and drop the rest of a request body, up to ``max_bytes`` or ``max_s`` seconds."""
    drained = 0
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(max_s):
            while drained <= max_bytes:
                message = await receive()
                if message["type"] == "http.disconnect" or not message.get("more_body", False):
                    return
                drained += len(message.get("body", b""))


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands the already-read body over once, then defers to the real one
    (so a streaming route still hears the client disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
