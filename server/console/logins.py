"""Who is looking at the console: an API key in a header, a browser login, or nobody (open mode).

A browser login is a server-side session: the login form's key is checked, then kept in this process's
memory under a random session id; the browser holds only that id, in an HttpOnly, SameSite=Strict cookie
scoped to ``/console`` (Secure over https). The key itself never reaches a cookie, a URL or a page. Every
request resolves the key again through :func:`server.auth.principal_for`, exactly as the API does, so a
revoked key loses the console at once; a login also ends after ``console_session_idle_s`` without a request,
on logout, and with the process (several replicas need sticky sessions, or the bearer header).
The API never reads this cookie: a page elsewhere cannot make a browser spend it on a write.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Annotated
from urllib.parse import quote

from fastapi import Depends, Request
from fastapi.security.utils import get_authorization_scheme_param

from kvstore.errors import Unauthorized

from ..auth import Principal, principal_for
from ..deps import Store

COOKIE = "kvrag_console"
COOKIE_PATH = "/console"
MAX_LOGINS = 10_000  # the oldest login goes first past this: memory stays bounded whatever is sent


@dataclass
class Login:
    """One browser login: the key it was made with and the token its logout form must send back."""

    secret: str
    csrf: str
    last_seen: float


class LoginRequired(Exception):
    """No valid login: the page answers a redirect to the login form (back to ``next`` afterwards)."""

    def __init__(self, next_path: str, reason: str | None = None) -> None:
        super().__init__(reason or "login required")
        self.next_path = next_path
        self.reason = reason


def _digest(session_id: str) -> str:
    """Sessions are held under a hash of their id, so the table never holds a usable cookie value."""
    return hashlib.sha256(session_id.encode()).hexdigest()


class Logins:
    """Server-side console logins of this process, expiring after ``idle_s`` without use."""

    def __init__(self, idle_s: float, max_logins: int = MAX_LOGINS) -> None:
        self.idle_s = idle_s
        self.max_logins = max_logins
        self._by_digest: OrderedDict[str, Login] = OrderedDict()
        self._lock = threading.Lock()

    def create(self, secret: str) -> tuple[str, Login]:
        """A new login for ``secret``: its session id (the cookie value) and the login."""
        session_id = secrets.token_urlsafe(32)
        login = Login(secret=secret, csrf=secrets.token_urlsafe(32), last_seen=time.monotonic())
        with self._lock:
            self._by_digest[_digest(session_id)] = login
            while len(self._by_digest) > self.max_logins:
                self._by_digest.popitem(last=False)
        return session_id, login

    def get(self, session_id: str) -> Login | None:
        """The live login of ``session_id`` (its idle clock restarted), or None."""
        key = _digest(session_id)
        now = time.monotonic()
        with self._lock:
            login = self._by_digest.get(key)
            if login is None:
                return None
            if now - login.last_seen > self.idle_s:
                del self._by_digest[key]
                return None
            login.last_seen = now
            self._by_digest.move_to_end(key)
            return login

    def drop(self, session_id: str) -> None:
        with self._lock:
            self._by_digest.pop(_digest(session_id), None)


def logins_of(request: Request) -> Logins:
    return request.app.state.console_logins


def header_secret(request: Request) -> str | None:
    """An API key sent as ``Authorization: Bearer`` or ``X-API-Key`` (scripts and tests use these)."""
    scheme, credentials = get_authorization_scheme_param(request.headers.get("authorization"))
    if scheme.lower() == "bearer" and credentials:
        return credentials
    return request.headers.get("x-api-key") or None


def here(request: Request) -> str:
    """This page's path and query, the place a login sends the browser back to."""
    query = request.url.query
    return request.url.path + (f"?{query}" if query else "")


def login_url(next_path: str) -> str:
    return f"{COOKIE_PATH}/login?next={quote(next_path, safe='')}"


def console_principal(request: Request, store: Store) -> Principal:
    """The caller of a console page: the header's key, else the login cookie's, else (open mode) the root.
    A bad header key is a 401; no login, or one whose key was revoked, is a redirect to the login form."""
    request.state.console_login = None
    secret = header_secret(request)
    if secret is not None or request.app.state.settings.admin_key is None:
        request.state.console_viewer = principal_for(request, store, secret)
        return request.state.console_viewer
    session_id = request.cookies.get(COOKIE)
    login = logins_of(request).get(session_id) if session_id else None
    if login is None or session_id is None:
        raise LoginRequired(here(request), "your login has ended" if session_id else None)
    try:
        principal = principal_for(request, store, login.secret)
    except Unauthorized:
        logins_of(request).drop(session_id)
        raise LoginRequired(here(request), "the key of this login is no longer valid") from None
    request.state.console_login = login
    request.state.console_viewer = principal
    return principal


Viewer = Annotated[Principal, Depends(console_principal)]
