"""``/docs`` (Swagger UI) served with local assets, open without a key as before.

FastAPI's own docs pages load their script, style and favicon from CDNs and show nothing offline. The
assets come from ``fastapi-offline`` (a maintained package that vendors Swagger UI 5 and a favicon); the
page is FastAPI's, pointed at them, with Swagger's online validator badge (an image from another host)
turned off, and a Content-Security-Policy that lets the browser fetch from this server only. ReDoc is not
served: its bundle loads a logo from its vendor's CDN that no option turns off.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS = "/docs-assets"
OAUTH2_REDIRECT = "/docs/oauth2-redirect"
# The page's one inline script starts Swagger UI; everything else (script, style, spec, images) is this server's.
CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
       "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")


def install(app: FastAPI, docs_url: str = "/docs") -> None:
    """Add the docs page and its assets to ``app`` (built with ``docs_url=None, redoc_url=None``)."""
    app.mount(ASSETS, StaticFiles(packages=[("fastapi_offline", "static")]), name="docs-assets")
    openapi_url = app.openapi_url or "/openapi.json"

    @app.get(docs_url, include_in_schema=False)
    def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        page = get_swagger_ui_html(
            openapi_url=f"{root}{openapi_url}", title=f"{app.title} - API docs",
            swagger_js_url=f"{root}{ASSETS}/swagger-ui-bundle.js", swagger_css_url=f"{root}{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS}/favicon.png", oauth2_redirect_url=f"{root}{OAUTH2_REDIRECT}",
            swagger_ui_parameters={"validatorUrl": None, **(app.swagger_ui_parameters or {})})
        page.headers["Content-Security-Policy"] = CSP
        return page

    @app.get(OAUTH2_REDIRECT, include_in_schema=False)
    def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()
