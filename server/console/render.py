"""Rendering the console: templates and their filters, HTML error pages, the headers every page carries."""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import RedirectResponse
from fastapi.routing import APIRoute
from fastapi.templating import Jinja2Templates

from kvstore.errors import KVRagError

from ..errors import request_id_of, status_of
from .logins import LoginRequired, login_url

HERE = Path(__file__).resolve().parent
templates = Jinja2Templates(directory=HERE / "templates")

# No script runs on a console page (charts are server-rendered SVG), so the policy forbids all of it; styles,
# images and the favicon come from this server only; no page can be framed (clickjacking) or post elsewhere.
CSP = ("default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; "
       "base-uri 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    # same-origin, not no-referrer: under no-referrer a browser sends "Origin: null" with the login form's
    # POST, which the login's cross-site check must refuse; other hosts still get no referrer.
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",  # pages show a key's private data: no shared or back-button copies
}


def human_bytes(value: int | float | None) -> str:
    """1536 -> '1.5 KiB'."""
    if value is None:
        return "—"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def when(value: datetime | None) -> str:
    """A catalog time in UTC, to the second (SQLite hands back naive datetimes; they are UTC)."""
    if value is None:
        return "—"
    aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    return aware.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def ms(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.0f} ms" if value >= 100 else f"{value:.1f} ms"


templates.env.filters.update(bytes=human_bytes, when=when, ms=ms)


def page(request: Request, name: str, status_code: int = 200, **context: Any) -> Response:
    """A console page, with the viewer and the logout token the layout needs."""
    login = getattr(request.state, "console_login", None)
    context.setdefault("viewer", getattr(request.state, "console_viewer", None))
    context.setdefault("bank_name", request.path_params.get("bank"))
    context["root"] = request.scope.get("root_path", "")
    context["logout_csrf"] = login.csrf if login is not None else None
    return templates.TemplateResponse(request, name, context, status_code=status_code)


def error_page(request: Request, status_code: int, code: str, detail: str) -> Response:
    # No bank tabs or crumbs: an error page shows the same frame whether the bank is missing or out of scope.
    return page(request, "error.html", status_code=status_code, code=code, detail=detail,
                request_id=request_id_of(request), bank_name=None)


class ConsoleRoute(APIRoute):
    """A console route: errors become HTML pages (same status and code as the API's), a missing login a
    redirect to the login form, and every answer carries the security headers."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            started = time.perf_counter()
            try:
                response = await handler(request)
            except LoginRequired as exc:
                response = RedirectResponse(login_url(exc.next_path), status_code=303)
            except KVRagError as exc:
                response = error_page(request, status_of(exc), exc.code, exc.detail)
            except RequestValidationError as exc:
                errors = list(exc.errors())
                where = ".".join(str(p) for p in errors[0].get("loc", ())) if errors else "request"
                response = error_page(request, 422, "validation_error",
                                      f"{where}: {errors[0].get('msg', 'invalid') if errors else 'invalid'}")
            response.headers.update(SECURITY_HEADERS)
            # The page's own time (auth, engine reads, template), shown by browser dev tools; the bench reads it.
            response.headers["Server-Timing"] = f"render;dur={(time.perf_counter() - started) * 1000:.1f}"
            return response

        return guarded
