"""The one place that turns errors into HTTP answers: ``{"detail", "code", "request_id"}``.

Domain errors carry a stable ``code``; the framework's own errors (unknown routes, request validation,
unparseable JSON) are mapped onto the same codes, so a client handles every failure one way.

Every detail sent to a client passes ``redact``: credentials in URLs (``user:pass@``, query tokens), bearer
tokens, kvrag key secrets and absolute paths of this server are replaced, so an error can show neither the map
LLM's credentials nor where the data lives. The full detail goes to the server log.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvstore.errors import KVRagError

log = logging.getLogger(__name__)

STATUS_BY_CODE: dict[str, int] = {
    "bad_request": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "conflict": 409,
    "version_mismatch": 409,
    "incompatible_model": 409,
    "payload_too_large": 413,
    "unsupported_media_type": 415,
    "misdirected_request": 421,
    "validation_error": 422,
    "rate_limited": 429,
    "unavailable": 503,
    "corrupt_block": 500,
    "internal": 500,
}
CODE_BY_STATUS: dict[int, str] = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 409: "conflict",
    413: "payload_too_large", 415: "unsupported_media_type", 421: "misdirected_request", 422: "validation_error",
    429: "rate_limited", 503: "unavailable",
}
RETRY_STATUSES = (429, 503)


_USERINFO = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@'\"<>]+@")
_QUERY_SECRET = re.compile(r"([?&;][^=&\s'\"#]*(?:key|token|secret|passw|pwd|auth|sig|credential)[^=&\s'\"#]*=)"
                           r"[^&\s'\"#]+", re.IGNORECASE)
_SCHEME_TOKEN = re.compile(r"\b(Bearer|Basic|Token)\s+[A-Za-z0-9._~+/=-]+", re.IGNORECASE)
_KEY_SECRET = re.compile(r"\bkvr_[A-Za-z0-9_-]+")
_FILE_URL = re.compile(r"\bfile://[^\s'\"]*")
# An absolute path not inside a URL (a URL's path follows its host); whether it is a path of this server is
# decided by its first directory existing here, so route paths a detail echoes (/v1/...) stay readable.
_ABS_PATH = re.compile(r"(?<![\w.:/~-])/[\w.@+~-]+(?:/[\w.@+~-]*)*")


def _local_path(match: re.Match[str]) -> str:
    first = match.group(0).split("/")[1]
    return "<path>" if first and os.path.isdir("/" + first) else match.group(0)


def redact(text: str) -> str:
    """``text`` without credentials or server paths, fit to send to a client (see the module doc)."""
    text = _USERINFO.sub(r"\1***@", text)
    text = _QUERY_SECRET.sub(r"\1***", text)
    text = _SCHEME_TOKEN.sub(r"\1 ***", text)
    text = _KEY_SECRET.sub("kvr_***", text)
    text = _FILE_URL.sub("file://<path>", text)
    return _ABS_PATH.sub(_local_path, text)


def client_detail(detail: str, request_id: str | None = None) -> str:
    """``redact(detail)``; when that changed anything, the full detail is logged for the operator."""
    shown = redact(detail)
    if shown != detail:
        log.warning("request %s: error detail redacted for the client; in full: %s", request_id, detail)
    return shown


def request_id_of(request: Request) -> str | None:
    """The id the request-context middleware gave this request."""
    return getattr(request.state, "request_id", None)


def error_body(code: str, detail: str, request_id: str | None) -> dict[str, Any]:
    """The error shape, with the detail redacted (every error answer and error event is built here)."""
    return {"detail": client_detail(detail, request_id), "code": code, "request_id": request_id}


def error_response(status: int, code: str, detail: str, request_id: str | None,
                   retry_after_s: int = 1) -> JSONResponse:
    """A JSON error answer; 429 and 503 tell the client when to retry."""
    headers = {"Retry-After": str(retry_after_s)} if status in RETRY_STATUSES else {}
    if request_id:
        headers["X-Request-ID"] = request_id
    return JSONResponse(error_body(code, detail, request_id), status_code=status, headers=headers)


def status_of(exc: KVRagError) -> int:
    return STATUS_BY_CODE.get(exc.code, 500)


def _retry_after(request: Request) -> int:
    return request.app.state.settings.retry_after_s


async def _domain_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, KVRagError)
    status = status_of(exc)
    if status >= 500:
        log.error("request %s failed: %s (%s)", request_id_of(request), exc.detail, exc.code)
    return error_response(status, exc.code, exc.detail, request_id_of(request), _retry_after(request))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = CODE_BY_STATUS.get(exc.status_code, "bad_request" if exc.status_code < 500 else "internal")
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if exc.status_code == 404 and detail == "Not Found":
        detail = f"no route {request.method} {request.url.path}"
    return error_response(exc.status_code, code, detail, request_id_of(request), _retry_after(request))


def _describe(errors: list[dict[str, Any]]) -> str:
    """A short human message naming the offending fields (inputs are not echoed back)."""
    parts = []
    for err in errors[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    if any(err.get("type") == "json_invalid" for err in errors):
        return error_response(400, "bad_request", "request body is not valid JSON", request_id_of(request))
    return error_response(422, "validation_error", _describe(errors), request_id_of(request))


def install_error_handlers(app: FastAPI) -> None:
    """Route domain, HTTP and validation errors through the single JSON error shape."""
    app.add_exception_handler(KVRagError, _domain_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
