"""The MCP tools of ``kvrag.mcp`` on the HTTP server: streamable HTTP at ``/mcp/{bank}`` for remote agents.

Each app gets its own MCP server and session manager, started by this router's lifespan (FastAPI merges
it into the app's). The door checks the caller's API key (401) and that it can see the bank (404), then
binds the MCP session it opens to that key and bank, so a session always acts with one key's scope.
The tools call the REST API of the same app in process (``httpx.ASGITransport``) with the caller's key:
auth, limits, the model worker and error codes are exactly the REST API's.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import APIRouter, FastAPI
from fastapi.security import HTTPAuthorizationCredentials
from kvrag_client import AsyncKVRag
from mcp.server.mcpserver import Context
from mcp.server.streamable_http import MCP_SESSION_ID_HEADER
from mcp.server.streamable_http_manager import DEFAULT_MAX_SESSIONS
from mcp.server.transport_security import TransportSecuritySettings
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.types import Message, Receive, Scope, Send

from kvrag.mcp import Connector, Memory, build_server
from kvstore.errors import KVRagError, NotFound

from .auth import check_bank, get_principal
from .deps import get_store
from .errors import error_response, request_id_of, status_of

MOUNT_PATH = "/mcp"
# The in-process base URL: requests never leave the app, the host only has to parse.
INTERNAL_URL = "http://kvrag.internal"
LOOPBACK_ONLY = TransportSecuritySettings(
    enable_dns_rebinding_protection=True, allowed_hosts=["127.0.0.1:*", "localhost:*", "[::1]:*"],
    allowed_origins=["http://127.0.0.1:*", "http://localhost:*", "http://[::1]:*"])


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
        open_mode = app.state.settings.admin_key is None
        # Called for the session manager it sets up; requests reach that manager through this endpoint, not
        # through the Starlette app it returns. Without an admin key nothing is authenticated, so a browser
        # page must not reach the tools through DNS rebinding: then only loopback Host/Origin are accepted.
        self.server.streamable_http_app(transport_security=LOOPBACK_ONLY if open_mode else
                                        TransportSecuritySettings(enable_dns_rebinding_protection=False))
        self.sessions = self.server.session_manager
        # session id -> (key fingerprint, bank); bounded like the manager's own session table.
        self._bound: OrderedDict[str, tuple[str, str]] = OrderedDict()

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
        scope.setdefault("state", {})["mcp_bank"] = bank
        session_id = request.headers.get(MCP_SESSION_ID_HEADER)
        if session_id is None:
            await self.sessions.handle_request(scope, receive, self._binding_send(send, (fingerprint, bank)))
            return
        if self._bound.get(session_id) != (fingerprint, bank):
            # Another key's (or another bank's) session is answered as if it did not exist.
            await error_response(404, "not_found", "unknown MCP session", request_id_of(request))(scope, receive,
                                                                                                 send)
            return
        if scope["method"] == "DELETE":
            self._bound.pop(session_id, None)
        await self.sessions.handle_request(scope, receive, send)

    async def _authorize(self, request: Request, bank: str) -> str:
        """The caller may read ``bank``; returns a fingerprint of the key (never the key itself)."""
        store = get_store(request)
        bearer, api_key = _credentials(request.headers)
        principal = await run_in_threadpool(get_principal, request, store, bearer, api_key)
        check_bank(principal, bank, "read")
        return hashlib.sha256((_secret(request.headers) or "").encode()).hexdigest()

    def _binding_send(self, send: Send, owner: tuple[str, str]) -> Send:
        """Record the session a request opens (its answer names it) as belonging to ``owner``."""

        async def bind(message: Message) -> None:
            if message["type"] == "http.response.start":
                session_id = Headers(raw=message.get("headers", [])).get(MCP_SESSION_ID_HEADER)
                if session_id is not None:
                    self._bound[session_id] = owner
                    while len(self._bound) > DEFAULT_MAX_SESSIONS:
                        self._bound.popitem(last=False)
            await send(message)

        return bind


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
