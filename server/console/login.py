"""The console's login and logout: the only console routes that take a POST, both guarded against CSRF.

Login uses a double-submit token: the form page sets a random token in an HttpOnly, SameSite=Strict cookie
scoped to the login path and repeats it in a hidden field; a POST must bring both, equal. A page on another
site can neither read the field nor make the browser send the cookie, so it cannot log a browser in (into
its own key, say) or probe keys through it. Logout needs the token of the login it ends (in the layout's
logout form). Both also refuse a cross-site ``Origin`` / ``Sec-Fetch-Site`` outright.
"""

from __future__ import annotations

import hmac
import re
import secrets
from typing import Annotated

from fastapi import APIRouter, Form, Query, Request, Response
from fastapi.responses import RedirectResponse

from kvstore.errors import Forbidden, Unauthorized

from ..auth import principal_for
from ..deps import Store
from .logins import COOKIE, COOKIE_PATH, logins_of
from .render import ConsoleRoute, page

router = APIRouter(prefix=COOKIE_PATH, route_class=ConsoleRoute, include_in_schema=False)

CSRF_COOKIE = "kvrag_console_login"
LOGIN_PATH = f"{COOKIE_PATH}/login"
_CSRF_TTL_S = 3600
# Where a login may send the browser back to: a console path, never another host ("//evil", "/\\evil").
_SAFE_NEXT = re.compile(r"^/console(?:[/?][^\\\s]*)?$")

Next = Annotated[str, Query(max_length=2048)]


def safe_next(value: str | None) -> str:
    """``value`` when it is a console path on this server, else the console's first page."""
    if value and _SAFE_NEXT.fullmatch(value) and not value.startswith("//"):
        return value
    return COOKIE_PATH


def _secure(request: Request) -> bool:
    return request.url.scheme == "https"


def _same_origin(request: Request) -> None:
    """Refuse a POST a browser says came from another site (the CSRF tokens are checked as well)."""
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        raise Forbidden("cross-site requests to the console are refused")
    origin = request.headers.get("origin")
    if origin is not None and origin != f"{request.url.scheme}://{request.url.netloc}":
        raise Forbidden("cross-site requests to the console are refused")


def _login_form(request: Request, next_path: str, message: str | None = None, status_code: int = 200) -> Response:
    token = secrets.token_urlsafe(32)
    response = page(request, "login.html", status_code=status_code, csrf=token, next_path=safe_next(next_path),
                    message=message)
    response.set_cookie(CSRF_COOKIE, token, max_age=_CSRF_TTL_S, path=LOGIN_PATH, httponly=True,
                        samesite="strict", secure=_secure(request))
    return response


@router.get("/login")
def login_form(request: Request, next: Next = COOKIE_PATH) -> Response:
    """The login form (open mode has nothing to log in to)."""
    if request.app.state.settings.admin_key is None:
        return RedirectResponse(safe_next(next), status_code=303)
    return _login_form(request, next)


@router.post("/login")
def login(request: Request, store: Store, key: Annotated[str, Form(max_length=512)],
          csrf: Annotated[str, Form(max_length=128)],
          next: Annotated[str, Form(max_length=2048)] = COOKIE_PATH) -> Response:
    """Check the key as the API would and start a login; a wrong key shows the form again (401)."""
    _same_origin(request)
    expected = request.cookies.get(CSRF_COOKIE, "")
    if not expected or not hmac.compare_digest(expected.encode(), csrf.encode()):
        raise Forbidden("the login form has expired or did not come from this console; load it again")
    if request.app.state.settings.admin_key is None:
        return RedirectResponse(safe_next(next), status_code=303)
    try:
        principal_for(request, store, key.strip())
    except Unauthorized as exc:
        return _login_form(request, next, exc.detail, status_code=401)
    session_id, _ = logins_of(request).create(key.strip())
    response = RedirectResponse(safe_next(next), status_code=303)
    response.set_cookie(COOKIE, session_id, path=COOKIE_PATH, httponly=True, samesite="strict",
                        secure=_secure(request))
    response.delete_cookie(CSRF_COOKIE, path=LOGIN_PATH, httponly=True, samesite="strict", secure=_secure(request))
    return response


@router.post("/logout")
def logout(request: Request, csrf: Annotated[str, Form(max_length=128)] = "") -> Response:
    """End this browser's login (its token must match) and clear the cookie."""
    _same_origin(request)
    session_id = request.cookies.get(COOKIE)
    login = logins_of(request).get(session_id) if session_id else None
    if login is not None and session_id is not None:
        if not hmac.compare_digest(login.csrf.encode(), csrf.encode()):
            raise Forbidden("logout token mismatch; log out from a console page")
        logins_of(request).drop(session_id)
    response = RedirectResponse(LOGIN_PATH, status_code=303)
    response.delete_cookie(COOKIE, path=COOKIE_PATH, httponly=True, samesite="strict", secure=_secure(request))
    return response
