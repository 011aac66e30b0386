"""Host and Origin checks (issue 26, hole 2), against real uvicorn servers: in open mode (no admin key) a
request addressed to another host name (DNS rebinding) or sent by a page of another origin is refused on
every route and changes nothing; with keys, a state-changing request from a foreign origin is refused
unless KVRAG_CORS_ORIGINS lists it, and only then is CORS answered."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import pytest

from server.app import create_app
from server.settings import ServerSettings
from tests.server_harness import LiveServer, live_server

CONSOLE = "https://console.example"


@pytest.fixture(scope="module")
def open_live(tmp_path_factory: pytest.TempPathFactory, tiny_llm, embedder) -> Iterator[LiveServer]:
    with live_server("sqlite", tmp_path_factory.mktemp("open"), tiny_llm, embedder, admin_key=None) as server:
        with server.client() as c:
            assert c.post("/v1/banks", json={"name": "home"}).status_code == 201
        yield server


@pytest.fixture(scope="module")
def keyed_live(tmp_path_factory: pytest.TempPathFactory, tiny_llm, embedder) -> Iterator[LiveServer]:
    with live_server("sqlite", tmp_path_factory.mktemp("keyed"), tiny_llm, embedder,
                     cors_origins=[CONSOLE]) as server:
        yield server


def _port(live: LiveServer) -> str:
    return live.url.rsplit(":", 1)[1]


def _banks(live: LiveServer) -> set[str]:
    return {b.name for b in live.store.list_banks(None)}


def _refused(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"detail", "code", "request_id"} and body["code"] == code
    assert "access-control-allow-origin" not in r.headers


@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "127.0.0.1.evil.example:{port}",
                                  "localhost.evil.example", "10.0.0.7:{port}", "[::1", "localhost:port"])
def test_open_mode_refuses_a_host_that_is_not_loopback(open_live: LiveServer, host: str) -> None:
    host = host.format(port=_port(open_live))
    with open_live.client() as c:
        _refused(c.post("/v1/banks", json={"name": "rebound"}, headers={"Host": host}), 421, "misdirected_request")
        _refused(c.get("/v1/banks", headers={"Host": host}), 421, "misdirected_request")
        _refused(c.get("/healthz", headers={"Host": host}), 421, "misdirected_request")
        _refused(c.post("/mcp/home", json={}, headers={"Host": host}), 421, "misdirected_request")
    assert "rebound" not in _banks(open_live)


@pytest.mark.parametrize("origin", ["http://evil.example", "null", "http://localhost.evil.example",
                                    "https://127.0.0.1.evil.example:8443", "file://", "http://[::1"])
def test_open_mode_refuses_a_page_of_another_origin(open_live: LiveServer, origin: str) -> None:
    with open_live.client() as c:
        _refused(c.post("/v1/banks", json={"name": "forged"}, headers={"Origin": origin}), 403, "forbidden")
        _refused(c.put("/v1/banks/home/documents/x", json={"text": "planted"}, headers={"Origin": origin}), 403,
                 "forbidden")
        _refused(c.get("/v1/banks", headers={"Origin": origin}), 403, "forbidden")
    assert "forged" not in _banks(open_live)
    assert open_live.store.stats("home").documents == 0


@pytest.mark.parametrize("headers", [{}, {"Host": "localhost:{port}"}, {"Host": "[::1]:{port}"},
                                     {"Host": "127.0.0.1"}, {"Host": "LOCALHOST"},
                                     {"Origin": "http://localhost:5173"}, {"Origin": "http://127.0.0.1:{port}"},
                                     {"Origin": "https://[::1]:8443"}])
def test_open_mode_serves_loopback_names_and_origins(open_live: LiveServer, headers: dict[str, str]) -> None:
    headers = {k: v.format(port=_port(open_live)) for k, v in headers.items()}
    with open_live.client() as c:
        assert c.get("/healthz", headers=headers).status_code == 200
        assert c.get("/readyz", headers=headers).status_code == 200
        assert c.get("/v1/banks", headers=headers).status_code == 200


def test_open_mode_mcp_tools_still_reach_the_api(open_live: LiveServer) -> None:
    """The MCP tools call the REST API in process; that call must pass the Host check too."""
    pytest.importorskip("mcp")
    httpx2 = pytest.importorskip("httpx2")
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    async def main() -> Any:
        http = httpx2.AsyncClient(timeout=60)
        async with Client(streamable_http_client(f"{open_live.url}/mcp/home", http_client=http),
                          read_timeout_seconds=60) as client:
            return await client.call_tool("recall", {"query": "anything"})

    result = anyio.run(main)
    assert not result.is_error, result.content


def test_keys_required_refuse_foreign_pages_that_write(keyed_live: LiveServer) -> None:
    own = keyed_live.url
    with keyed_live.admin() as c:
        _refused(c.post("/v1/banks", json={"name": "forged"}, headers={"Origin": "http://evil.example"}), 403,
                 "forbidden")
        preflight = c.options("/v1/banks", headers={"Origin": "http://evil.example",
                                                    "Access-Control-Request-Method": "POST"})
        _refused(preflight, 403, "forbidden")
        # Reads pass (a page cannot read the answer without CORS), and so do any host name and no Origin.
        r = c.get("/v1/banks", headers={"Origin": "http://evil.example"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
        assert c.post("/v1/banks", json={"name": "own"}, headers={"Origin": own}).status_code == 201
        assert c.post("/v1/banks", json={"name": "proxied"}, headers={"Host": "kv.example.com"}).status_code == 201
    assert _banks(keyed_live) == {"own", "proxied"}


def test_configured_origins_get_cors(keyed_live: LiveServer) -> None:
    with keyed_live.admin() as c:
        preflight = c.options("/v1/banks", headers={"Origin": CONSOLE, "Access-Control-Request-Method": "POST",
                                                    "Access-Control-Request-Headers": "authorization,content-type"})
        assert preflight.status_code == 200, preflight.text
        assert preflight.headers["access-control-allow-origin"] == CONSOLE
        assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
        created = c.post("/v1/banks", json={"name": "from-console"}, headers={"Origin": CONSOLE})
        assert created.status_code == 201 and created.headers["access-control-allow-origin"] == CONSOLE
        assert "X-Request-ID" in created.headers["access-control-expose-headers"]
    assert "from-console" in _banks(keyed_live)


def test_cors_wildcard_needs_an_admin_key(tmp_path) -> None:
    with pytest.raises(ValueError, match="admin key"):
        create_app(ServerSettings(data_dir=tmp_path, cors_origins=["*"]))
    assert ServerSettings(data_dir=tmp_path, cors_origins="https://a.example, http://b.example:8080/").cors_origins == [
        "https://a.example", "http://b.example:8080"]
    with pytest.raises(ValueError, match="not an origin"):
        ServerSettings(data_dir=tmp_path, cors_origins=["https://a.example/path"])
