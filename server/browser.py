"""Browser guard: the Host and Origin checks that keep a web page from driving the API.

A page on another site can make the user's browser send requests to kvrag: a cross-site POST needs no
preflight when its content type is a "simple" one, and DNS rebinding points an attacker's host name at
127.0.0.1 so the page can even read the answers. Neither carries a kvrag API key (browsers add no
``Authorization`` or ``X-API-Key`` header on their own), so with keys required such a request is refused
as unauthenticated. Open mode (no admin key, loopback only) authenticates nothing, so there:

- ``Host`` must name the loopback (``localhost``, ``127.0.0.1`` or any 127/8 address, ``[::1]``; any port),
  else 421: a rebound name is the attacker's, not ours. Every route, ``/healthz`` and ``/readyz`` included:
  a rebinding page learns nothing, not even that kvrag runs here; probes on this machine use a loopback name.
- a request with an ``Origin`` that is not a loopback origin (``null`` included) is refused with 403, on every
  method. Requests without ``Origin`` (curl, the SDK, agents) pass: browsers send it on every cross-origin
  request that is not a plain navigation.

With keys required, a state-changing request (anything but GET and HEAD, CORS preflights included) whose
``Origin`` is neither the server's own (the ``Host`` it was sent to) nor a configured one is refused with 403:
defence in depth, as a careful vendor keeps it even where credentials are never ambient (a key pasted into
some page's script must not be usable to write from that page unless the operator allowed its origin). GETs
pass: without CORS the page cannot read the answer. ``Host`` is not checked there: behind a proxy the server
has any name, and every request needs a key.

Origins listed in ``KVRAG_CORS_ORIGINS`` pass the Origin check, and only then is CORS answered (Starlette's
``CORSMiddleware``); without the setting no CORS header is ever sent. Starlette's ``TrustedHostMiddleware``
is not used: it answers in plain text, not the error shape, and checks no Origin.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import error_response

SAFE_METHODS = frozenset({"GET", "HEAD"})


def is_loopback_name(host: str) -> bool:
    """``localhost`` or a loopback IP address (IPv6 without brackets)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _split_host(value: str) -> tuple[str, str] | None:
    """A ``Host`` header -> (host, port), IPv6 without brackets; None when it does not parse."""
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            return None
        port = rest[1:]
    else:
        host, _, port = value.partition(":")
        if ":" in port:
            return None
    if not host or (port and not port.isdigit()):
        return None
    return host, port


def is_loopback_host_header(value: str | None) -> bool:
    """Whether a ``Host`` header names this machine's loopback, with any port."""
    parts = _split_host(value or "")
    return parts is not None and is_loopback_name(parts[0])


def is_loopback_origin(origin: str) -> bool:
    """``http(s)://`` + a loopback host (any port); ``null`` and everything else are not."""
    try:
        parts = urlsplit(origin)
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number
    except ValueError:
        return False
    return (parts.scheme in ("http", "https") and parts.hostname is not None and not parts.path
            and is_loopback_name(parts.hostname))


def _netloc(origin: str) -> str | None:
    try:
        return urlsplit(origin).netloc.lower()
    except ValueError:
        return None


def normalize_origin(origin: str) -> str:
    return origin.strip().rstrip("/").lower()


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None


class BrowserGuard:
    """Refuses requests a browser may have been tricked into sending (see the module doc)."""

    def __init__(self, app: ASGIApp, open_mode: bool, allowed_origins: list[str]) -> None:
        self.app = app
        self.open_mode = open_mode
        self.allowed = {normalize_origin(o) for o in allowed_origins}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        problem = self._problem(scope)
        if problem is None:
            await self.app(scope, receive, send)
            return
        status, code, detail = problem
        request_id = scope.get("state", {}).get("request_id")
        await error_response(status, code, detail, request_id)(scope, receive, send)

    def _problem(self, scope: Scope) -> tuple[int, str, str] | None:
        host = _header(scope, b"host")
        origin = _header(scope, b"origin")
        if self.open_mode:
            if not is_loopback_host_header(host):
                return (421, "misdirected_request",
                        "this server has no admin key and answers only requests addressed to localhost, "
                        "127.0.0.1 or [::1]")
            if origin is not None and not is_loopback_origin(origin) and not self._configured(origin):
                return 403, "forbidden", "requests from a web page of another origin are refused"
            return None
        if origin is None or scope["method"] in SAFE_METHODS or self._configured(origin):
            return None
        if host is not None and _netloc(origin) == host.lower():
            return None  # the server's own origin (a page it serves)
        return 403, "forbidden", "requests from a web page of another origin are refused (see KVRAG_CORS_ORIGINS)"

    def _configured(self, origin: str) -> bool:
        return "*" in self.allowed or normalize_origin(origin) in self.allowed
