"""Refuse any request whose path holds a dot segment (``.`` or ``..``, percent-encoded or not), before routing.

Starlette routes the path as sent, but every proxy or client that normalizes URLs resolves a dot segment
into the parent: ``/v1/banks/notes/documents/..`` *is* ``/v1/banks/notes`` to them. No valid id is a dot
segment (ids start with a letter or digit), so such a path is never a request for what it names; it is
answered 400 in the error shape and reaches no route.
"""

from __future__ import annotations

from urllib.parse import unquote

from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import error_response

DOT_SEGMENTS = frozenset({".", ".."})


def has_dot_segment(raw_path: str) -> bool:
    """Whether a path, as sent or once percent-decoded (``%2e``, ``%2F`` included), has a ``.``/``..`` segment."""
    if any(unquote(segment) in DOT_SEGMENTS for segment in raw_path.split("/")):
        return True
    return any(segment in DOT_SEGMENTS for segment in unquote(raw_path).replace("\\", "/").split("/"))


class DotSegmentGuard:
    """Pure ASGI middleware: checks the raw path (``scope["raw_path"]``) and the decoded one."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            raw = scope.get("raw_path")
            path = raw.decode("latin-1").split("?", 1)[0] if raw else scope.get("path", "")
            if has_dot_segment(path) or has_dot_segment(scope.get("path", "")):
                request_id = scope.get("state", {}).get("request_id")
                detail = "the path holds a '.' or '..' segment; no kvrag id is one"
                await error_response(400, "bad_request", detail, request_id)(scope, receive, send)
                return
        await self.app(scope, receive, send)
