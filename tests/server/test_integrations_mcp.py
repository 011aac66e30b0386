"""MCP against a live server: ``kvrag mcp`` over stdio (a subprocess) and the server's ``/mcp/{bank}`` mount,
with clients from the official ``mcp`` SDK. Tools, schemas, the memory round trip, errors as tool errors,
and sessions with keys for different banks that cannot see each other's memory."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

mcp = pytest.importorskip("mcp", reason="the MCP integration needs the `mcp` package (pip install -e .)")
httpx2 = pytest.importorskip("httpx2", reason="the mcp SDK's HTTP client (httpx2) is not installed")

from mcp import Client, StdioServerParameters  # noqa: E402
from mcp.client.streamable_http import streamable_http_client  # noqa: E402
from mcp.types import CallToolResult  # noqa: E402

from kvstore.model.loader import Embedder, LoadedModel  # noqa: E402
from tests.server_harness import LiveServer, live_server, make_key  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TOOLS = {"remember", "recall", "ask", "forget", "context_map", "context_map_edit", "context_map_pin",
         "session_append", "session_brief", "session_restore"}
ALPHA = "Paris is the capital and most populous city of France. The Seine flows through it."
BETA = "Photosynthesis converts light energy into chemical energy stored in glucose."


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, tiny_llm: LoadedModel, embedder: Embedder) -> Iterator[LiveServer]:
    with live_server("sqlite", tmp_path_factory.mktemp("mcp"), tiny_llm, embedder) as server:
        with server.admin() as admin:
            for bank in ("alpha", "beta"):
                assert admin.post("/v1/banks", json={"name": bank}).status_code == 201
        yield server


@pytest.fixture(scope="module")
def keys(live: LiveServer) -> dict[str, str]:
    """Write keys scoped to one bank each, and a second (read) key on alpha."""
    return {"alpha": make_key(live, banks=["alpha"], agent="agent-a", name="a")["key"],
            "beta": make_key(live, banks=["beta"], agent="agent-b", name="b")["key"],
            "alpha-reader": make_key(live, role="read", banks=["alpha"], agent="agent-r", name="r")["key"]}


def stdio_client(live: LiveServer, bank: str, key: str) -> Client:
    """``python -m kvrag.cli mcp`` as a subprocess pointed at the live server."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "client")]), "KVRAG_API_KEY": key}
    return Client(StdioServerParameters(command=sys.executable, args=["-m", "kvrag.cli", "mcp", "--bank", bank,
                                                                      "--url", live.url],
                                        env=env, cwd=str(ROOT)), read_timeout_seconds=60)


def http_client(live: LiveServer, bank: str, key: str) -> Client:
    """A streamable HTTP client on the server's mount, sending ``key`` as a bearer token."""
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=60)
    return Client(streamable_http_client(f"{live.url}/mcp/{bank}", http_client=http), read_timeout_seconds=60)


def data(result: CallToolResult) -> dict[str, Any]:
    assert not result.is_error, result.content
    assert result.structured_content is not None
    return result.structured_content


def failure(result: CallToolResult) -> dict[str, Any]:
    assert result.is_error and result.structured_content is not None
    return result.structured_content


async def check_tools(client: Client) -> None:
    tools = {t.name: t for t in (await client.list_tools()).tools}
    assert set(tools) == TOOLS
    remember = tools["remember"]
    assert remember.input_schema["required"] == ["text"]
    assert {"text", "doc_id", "tags", "metadata"} <= set(remember.input_schema["properties"])
    assert "doc_id" in remember.output_schema["properties"]
    assert "passages" in tools["recall"].output_schema["properties"]
    assert {"answer", "sources"} <= set(tools["ask"].output_schema["properties"])
    assert tools["context_map_edit"].input_schema["required"] == ["edits"]
    assert tools["recall"].annotations.read_only_hint


async def round_trip(client: Client, text: str) -> str | None:
    """remember -> recall -> ask -> context_map_edit -> forget; returns the context map error code, if any."""
    stored = data(await client.call_tool("remember", {"text": text, "tags": ["test"], "metadata": {"src": "t"}}))
    doc_id = stored["doc_id"]
    assert doc_id.startswith("mem-") and stored["created"] and stored["version"] == 1
    named = data(await client.call_tool("remember", {"text": text, "doc_id": "named-1"}))
    assert named["doc_id"] == "named-1"

    passages = data(await client.call_tool("recall", {"query": text, "k": 5}))["passages"]
    assert {p["doc_id"] for p in passages} == {doc_id, "named-1"}
    assert all(isinstance(p["score"], float) and p["text"] for p in passages)

    answer = data(await client.call_tool("ask", {"question": "What is this about?", "k": 2, "max_new_tokens": 4}))
    assert isinstance(answer["answer"], str) and answer["sources"] and answer["context_tokens"] > 0

    edited = await client.call_tool("context_map_edit", {"edits": [{"op": "add", "section": "understanding",
                                                                     "content": "The bank holds one fact."}]})
    map_code = None
    if edited.is_error:
        map_code = failure(edited)["code"]
        assert map_code == "not_found"  # the context map routes are not on this server yet
        assert failure(await client.call_tool("context_map", {}))["code"] == "not_found"
    else:
        assert any("one fact" in str(item) for item in data(edited)["items"])
        assert data(await client.call_tool("context_map", {}))["version"] >= 1

    step = data(await client.call_tool("session_append", {"session_id": "mcp-run", "text": text, "role": "tool"}))
    assert step["segment_tokens"] > 0 and step["tokens"] >= step["segment_tokens"]
    brief = data(await client.call_tool("session_brief", {"session_id": "mcp-run", "task": "What is this about?",
                                                          "budget_tokens": 4, "max_new_tokens": 2}))
    assert brief["kept_tokens"] <= 4 and brief["session_tokens"] >= step["tokens"]
    assert failure(await client.call_tool("session_brief", {"session_id": "nope", "task": "x"}))["code"] == "not_found"

    for forgotten in (doc_id, "named-1"):
        assert data(await client.call_tool("forget", {"doc_id": forgotten})) == {"doc_id": forgotten, "deleted": True}
    assert failure(await client.call_tool("forget", {"doc_id": doc_id}))["code"] == "not_found"
    assert data(await client.call_tool("recall", {"query": text}))["passages"] == []
    return map_code


def test_stdio_round_trip(live: LiveServer, keys: dict[str, str]) -> None:
    async def main() -> None:
        async with stdio_client(live, "alpha", keys["alpha"]) as client:
            await check_tools(client)
            await round_trip(client, ALPHA)

    anyio.run(main)


def test_http_round_trip(live: LiveServer, keys: dict[str, str]) -> None:
    async def main() -> None:
        async with http_client(live, "alpha", keys["alpha"]) as client:
            await check_tools(client)
            await round_trip(client, ALPHA)
            # Arguments outside the schema are tool errors too, and the session goes on.
            assert (await client.call_tool("recall", {"query": "x", "k": 0})).is_error
            assert (await client.call_tool("context_map_edit", {"edits": [{"op": "rename"}]})).is_error
            assert data(await client.call_tool("recall", {"query": "x"}))["passages"] == []

    anyio.run(main)


def test_sessions_with_keys_for_different_banks_are_isolated(live: LiveServer, keys: dict[str, str]) -> None:
    async def main() -> None:
        async with http_client(live, "alpha", keys["alpha"]) as a, stdio_client(live, "beta", keys["beta"]) as b:
            data(await a.call_tool("remember", {"text": ALPHA, "doc_id": "only-alpha"}))
            data(await b.call_tool("remember", {"text": BETA, "doc_id": "only-beta"}))
            seen_a = {p["doc_id"] for p in data(await a.call_tool("recall", {"query": BETA, "k": 10}))["passages"]}
            seen_b = {p["doc_id"] for p in data(await b.call_tool("recall", {"query": ALPHA, "k": 10}))["passages"]}
            assert seen_a == {"only-alpha"} and seen_b == {"only-beta"}
            assert failure(await a.call_tool("forget", {"doc_id": "only-beta"}))["code"] == "not_found"
            data(await a.call_tool("forget", {"doc_id": "only-alpha"}))
            data(await b.call_tool("forget", {"doc_id": "only-beta"}))
        # A stdio session on a bank outside its key's scope: every call is a tool error, never a crash.
        async with stdio_client(live, "beta", keys["alpha"]) as wrong:
            assert failure(await wrong.call_tool("recall", {"query": "anything"}))["code"] == "not_found"

    anyio.run(main)


def test_read_key_gets_forbidden_as_a_tool_error(live: LiveServer, keys: dict[str, str]) -> None:
    async def main() -> None:
        async with http_client(live, "alpha", keys["alpha-reader"]) as reader:
            assert failure(await reader.call_tool("remember", {"text": ALPHA}))["code"] == "forbidden"
            assert "passages" in data(await reader.call_tool("recall", {"query": ALPHA}))

    anyio.run(main)


INITIALIZE = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
              "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                         "clientInfo": {"name": "raw", "version": "0"}}}
MCP_HEADERS = {"Accept": "application/json, text/event-stream", "MCP-Protocol-Version": "2025-06-18"}


def test_http_door_checks_the_key_and_binds_sessions(live: LiveServer, keys: dict[str, str]) -> None:
    with httpx.Client(base_url=live.url, timeout=30) as http:
        assert http.post("/mcp/alpha", json=INITIALIZE, headers=MCP_HEADERS).json()["code"] == "unauthorized"
        bad = http.post("/mcp/alpha", json=INITIALIZE, headers={**MCP_HEADERS, "Authorization": "Bearer nope"})
        assert bad.status_code == 401
        other = http.post("/mcp/alpha", json=INITIALIZE,
                          headers={**MCP_HEADERS, "Authorization": f"Bearer {keys['beta']}"})
        assert other.status_code == 404 and other.json()["code"] == "not_found"

        opened = http.post("/mcp/alpha", json=INITIALIZE,
                           headers={**MCP_HEADERS, "Authorization": f"Bearer {keys['alpha']}"})
        assert opened.status_code == 200, opened.text
        session = opened.headers["mcp-session-id"]
        ping = {"jsonrpc": "2.0", "id": 2, "method": "ping"}
        # The same session with another key that may read the same bank: answered as an unknown session.
        hijack = http.post("/mcp/alpha", json=ping, headers={**MCP_HEADERS, "mcp-session-id": session,
                                                             "Authorization": f"Bearer {keys['alpha-reader']}"})
        assert hijack.status_code == 404
        own = http.post("/mcp/alpha", json=ping, headers={**MCP_HEADERS, "mcp-session-id": session,
                                                          "Authorization": f"Bearer {keys['alpha']}"})
        assert own.status_code == 200, own.text
        assert http.post("/mcp/", json=INITIALIZE, headers={**MCP_HEADERS, "Authorization":
                                                           f"Bearer {keys['alpha']}"}).status_code == 404
