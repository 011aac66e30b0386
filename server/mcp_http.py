"""The MCP tools of ``kvrag_client.mcp`` on the HTTP server: streamable HTTP at ``/mcp/{bank}`` for remote agents.

Each app gets its own MCP server and session manager, started by this router's lifespan (FastAPI merges
it into the app's). The door checks the caller's API key (401) and that it can see the bank (404), then
binds the MCP session it opens to that key and bank, so a session always acts with one key's scope, and
bounds the sessions one key holds open (``KVRAG_MCP_SESSIONS_PER_KEY``; server.mcp_sessions).
The tools call the REST API of the same app in process (``httpx.ASGITransport``) with the caller's key:
auth, limits, the model worker and error codes are exactly the REST API's.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import APIRouter, FastAPI
from fastapi.security import HTTPAuthorizationCredentials
from kvrag_client import AsyncKVRag
from kvrag_client.mcp import Connector, Memory, build_server
from mcp.server.mcpserver import Context
from mcp.server.streamable_http import MCP_SESSION_ID_HEADER
from mcp.server.transport_security import TransportSecuritySettings
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.types import Message, Receive, Scope, Send

from kvstore.errors import KVRagError, NotFound

from .auth import check_bank, get_principal
from .deps import get_store
from .errors import error_response, request_id_of, status_of
from .mcp_sessions import Owner, SessionTable
from .middleware import media_type

MOUNT_PATH = "/mcp"
# The in-process base URL: requests never leave the app. A loopback name, so open mode's Host check
# (server/browser.py) lets the tools' own calls through.
INTERNAL_URL = "http://localhost"


def _credentials(headers: Headers) -> tuple[HTTPAuthorizationCredentials | None, str | None]:
    """The bearer token and the ``X-API-Key`` header, as ``server.auth.get_principal`` takes them."""
    scheme, _, token = headers.get("authorization", "").partition(" ")
    bearer = HTTPAuthorizationCredentials(scheme=scheme, credentials=token.strip()) \
        if scheme.lower() == "bearer" and token.strip() else None
    return bearer, headers.get("x-api-key")


def _secret(headers: Headers) -> str | None:
    bearer, api_key = _credentials(headers)
    return bearer.credentials if bearer is not None else api_key


def _bank_of(scope: Scope) -> str:
    """``/mcp/{bank}`` (a trailing slash allowed) -> bank."""
    bank = scope["path"].removeprefix(scope.get("root_path", "")).strip("/")
    if not bank or "/" in bank:
        raise NotFound(f"the MCP endpoint is {MOUNT_PATH}/{{bank}}")
    return bank


class McpEndpoint:
    """The ASGI endpoint of one app: key and bank check, session binding, then the MCP session manager."""

    def __init__(self, app: FastAPI) -> None:
        self.server = build_server(self._connector(app))
        settings = app.state.settings
        # Called for the session manager it sets up; requests reach that manager through this endpoint, not
        # through the Starlette app it returns. Host and Origin are checked before any route, this one included
        # (server/browser.py: loopback only in open mode), so the SDK's own, narrower check would only refuse
        # in plain text what the app allows (a port-less Host, 127.0.0.2, https://localhost).
        self.server.streamable_http_app(
            transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
            session_idle_timeout=settings.mcp_session_idle_s)
        self.sessions = self.server.session_manager
        self.table = SessionTable(settings.mcp_sessions_per_key, settings.mcp_session_idle_s)
        self.retry_after_s = settings.retry_after_s

    @staticmethod
    def _connector(app: FastAPI) -> Connector:
        @asynccontextmanager
        async def connect(ctx: Context) -> AsyncIterator[Memory]:
            request = ctx.request_context.request
            assert isinstance(request, Request)  # the streamable HTTP transport hands over the HTTP request
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), timeout=None) as http, \
                    AsyncKVRag(INTERNAL_URL, api_key=_secret(request.headers) or "", http_client=http,
                               max_retries=0) as kv:
                yield Memory(kv, request.state.mcp_bank)

        return connect

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        try:
            bank = _bank_of(scope)
            fingerprint = await self._authorize(request, bank)
        except KVRagError as exc:
            await error_response(status_of(exc), exc.code, exc.detail, request_id_of(request))(scope, receive, send)
            return
        if scope["method"] == "POST" and media_type(request.headers.get("content-type", "")) != "application/json":
            # The SDK would answer this one in plain text; every other refusal it makes is JSON-RPC.
            await error_response(415, "unsupported_media_type", "the MCP endpoint takes application/json",
                                 request_id_of(request))(scope, receive, send)
            return
        scope.setdefault("state", {})["mcp_bank"] = bank
        session_id = request.headers.get(MCP_SESSION_ID_HEADER)
        if session_id is None:
            await self._open(scope, receive, send, (fingerprint, bank), request_id_of(request))
            return
        if self.table.owner_of(session_id) != (fingerprint, bank):
            # Another key's (or another bank's) session is answered as if it did not exist.
            await error_response(404, "not_found", "unknown MCP session", request_id_of(request))(scope, receive,
                                                                                                 send)
            return
        self.table.begin(session_id)
        try:
            await self.sessions.handle_request(scope, receive, self._watching_send(send, session_id))
        finally:
            self.table.end(session_id)
            if scope["method"] == "DELETE":
                self.table.forget(session_id)

    async def _open(self, scope: Scope, receive: Receive, send: Send, owner: Owner, request_id: str | None) -> None:
        """A request without a session id (an ``initialize`` opens one) within the key's session allowance."""
        if not self.table.reserve(owner[0]):
            await error_response(429, "rate_limited",
                                 f"this key holds {self.table.per_key} open MCP sessions already; end one (DELETE) "
                                 "or let one expire", request_id, self.retry_after_s)(scope, receive, send)
            return
        opened: list[str] = []
        try:
            await self.sessions.handle_request(scope, receive, self._binding_send(send, owner, opened))
        finally:
            self.table.release(owner[0])
            for session_id in opened:
                self.table.end(session_id)

    async def _authorize(self, request: Request, bank: str) -> str:
        """The caller may read ``bank``; returns a fingerprint of the key (never the key itself)."""
        store = get_store(request)
        bearer, api_key = _credentials(request.headers)
        principal = await run_in_threadpool(get_principal, request, store, bearer, api_key)
        check_bank(principal, bank, "read")
        return hashlib.sha256((_secret(request.headers) or "").encode()).hexdigest()

    def _binding_send(self, send: Send, owner: Owner, opened: list[str]) -> Send:
        """Record the session a request opens (its answer names it) as belonging to ``owner``."""

        async def bind(message: Message) -> None:
            if message["type"] == "http.response.start":
                session_id = Headers(raw=message.get("headers", [])).get(MCP_SESSION_ID_HEADER)
                if session_id is not None:
                    self.table.bind(session_id, owner)
                    opened.append(session_id)
            await send(message)

        return bind

    def _watching_send(self, send: Send, session_id: str) -> Send:
        """Forget a session the SDK no longer knows (it answers 404: ended or expired on its side)."""

        async def watch(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 404:
                self.table.forget(session_id)
            await send(message)

        return watch


async def _dispatch(scope: Scope, receive: Receive, send: Send) -> None:
    """Hand the request to the endpoint of the app serving it (one process may serve several apps)."""
    endpoint: McpEndpoint = scope["app"].state.mcp
    await endpoint(scope, receive, send)


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.mcp = endpoint = McpEndpoint(app)
    async with endpoint.sessions.run():
        yield


router = APIRouter(lifespan=_lifespan)
router.mount(MOUNT_PATH, _dispatch, name="mcp")
