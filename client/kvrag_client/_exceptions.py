"""The SDK's exceptions: one class per error ``code`` of the REST contract (as openai-python does).

``KVRagError`` catches everything the SDK raises on purpose; ``APIError`` is an answer from the server
(status, code, detail, request_id); ``APIConnectionError`` means no answer came back at all.
"""

from __future__ import annotations

from typing import Any

import httpx

__all__ = [
    "KVRagError", "APIError", "APIConnectionError", "APITimeoutError", "BadRequest", "AuthenticationError",
    "PermissionDenied", "NotFound", "Conflict", "VersionMismatch", "IncompatibleModel", "PayloadTooLarge",
    "ValidationError", "InvalidId", "RateLimited", "InternalServerError", "CorruptBlock", "Unavailable", "JobFailed",
    "JobCancelled", "error_from_response",
]


class KVRagError(Exception):
    """Base of every exception the SDK raises."""


class APIConnectionError(KVRagError):
    """The request never got an answer: refused connection, reset, DNS failure."""

    def __init__(self, message: str = "connection error", *, request: httpx.Request | None = None) -> None:
        super().__init__(message)
        self.request = request


class APITimeoutError(APIConnectionError):
    """The request ran past the client's timeout."""

    def __init__(self, message: str = "request timed out", *, request: httpx.Request | None = None) -> None:
        super().__init__(message, request=request)


class APIError(KVRagError):
    """The server answered with an error body ``{"detail", "code", "request_id"}``."""

    status: int = 0
    default_code: str = "internal"

    def __init__(self, detail: str, *, status: int | None = None, code: str | None = None,
                 request_id: str | None = None, body: Any = None, response: httpx.Response | None = None) -> None:
        self.detail = detail
        self.status = status if status is not None else type(self).status
        self.code = code or self.default_code
        self.request_id = request_id
        self.body = body
        self.response = response
        super().__init__(f"{self.status} {self.code}: {detail}" + (f" (request {request_id})" if request_id else ""))


class BadRequest(APIError):
    status, default_code = 400, "bad_request"


class AuthenticationError(APIError):
    status, default_code = 401, "unauthorized"


class PermissionDenied(APIError):
    status, default_code = 403, "forbidden"


class NotFound(APIError):
    status, default_code = 404, "not_found"


class Conflict(APIError):
    status, default_code = 409, "conflict"


class VersionMismatch(Conflict):
    """``If-Match`` (or a map ``base_version``) did not match the stored version."""

    default_code = "version_mismatch"


class IncompatibleModel(Conflict):
    """The bank is bound to another model than the one the server runs."""

    default_code = "incompatible_model"


class PayloadTooLarge(APIError):
    status, default_code = 413, "payload_too_large"


class ValidationError(APIError):
    status, default_code = 422, "validation_error"


class InvalidId(ValidationError, ValueError):
    """An id the server would refuse (a bank name, document, session, key or job id), refused by the SDK
    before anything is sent: nothing reached the server, so ``request_id`` is None."""


class RateLimited(APIError):
    status, default_code = 429, "rate_limited"


class InternalServerError(APIError):
    status, default_code = 500, "internal"


class CorruptBlock(InternalServerError):
    """A stored block failed its checksum and could not be rebuilt from the document text."""

    default_code = "corrupt_block"


class Unavailable(APIError):
    status, default_code = 503, "unavailable"


class JobFailed(KVRagError):
    """A background job (a large batch ingest, a maintenance run) ended with status ``failed``."""

    def __init__(self, job_id: str, error: Any) -> None:
        super().__init__(f"job {job_id} failed: {error}")
        self.job_id = job_id
        self.error = error


class JobCancelled(JobFailed):
    """A job whose result was waited for was cancelled (its finished steps stay done)."""

    def __init__(self, job_id: str) -> None:
        KVRagError.__init__(self, f"job {job_id} was cancelled")
        self.job_id = job_id
        self.error = "cancelled"


_BY_CODE: dict[str, type[APIError]] = {
    cls.default_code: cls
    for cls in (BadRequest, AuthenticationError, PermissionDenied, NotFound, Conflict, VersionMismatch,
                IncompatibleModel, PayloadTooLarge, ValidationError, RateLimited, InternalServerError,
                CorruptBlock, Unavailable)
}
_BY_STATUS: dict[int, type[APIError]] = {
    cls.status: cls
    for cls in (BadRequest, AuthenticationError, PermissionDenied, NotFound, Conflict, PayloadTooLarge,
                ValidationError, RateLimited, InternalServerError, Unavailable)
}


def error_class(status: int, code: str | None) -> type[APIError]:
    """The exception class for an error: by ``code`` first (finer), then by HTTP status."""
    if code and code in _BY_CODE:
        return _BY_CODE[code]
    if status in _BY_STATUS:
        return _BY_STATUS[status]
    return InternalServerError if status >= 500 else APIError


def error_from_body(status: int, body: Any, request_id: str | None = None,
                    response: httpx.Response | None = None) -> APIError:
    """Build the typed exception from a decoded error body (also used for SSE ``error`` events)."""
    code = detail = None
    if isinstance(body, dict):
        code = body.get("code") if isinstance(body.get("code"), str) else None
        raw = body.get("detail")
        detail = raw if isinstance(raw, str) else (None if raw is None else str(raw))
        request_id = request_id or body.get("request_id")
    cls = error_class(status, code)
    return cls(detail or f"HTTP {status}", status=status, code=code, request_id=request_id, body=body,
               response=response)


def error_from_response(response: httpx.Response) -> APIError:
    """Build the typed exception for a non-2xx response (the body need not be JSON)."""
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text or None
    if not isinstance(body, dict):
        body = {"detail": body or response.reason_phrase}
    return error_from_body(response.status_code, body, response.headers.get("x-request-id"), response)
