"""The web console at ``/console`` (read-only, behind the API's keys and scopes) and the API docs' local assets."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from . import apidocs, login, pages
from .logins import Logins
from .render import HERE


def install(app: FastAPI) -> None:
    """Add the console's pages, its login, its static files and the docs pages to ``app``."""
    app.state.console_logins = Logins(idle_s=app.state.settings.console_session_idle_s)
    app.include_router(login.router)
    app.include_router(pages.router)
    app.mount("/console/static", StaticFiles(directory=HERE / "static"), name="console-static")
    apidocs.install(app)
