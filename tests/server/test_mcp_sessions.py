"""MCP sessions over the mounted /mcp/{bank} streamable HTTP endpoint (issue 26, hole 10f): a session id
works only with the key (and bank) that opened it, for every method, and one key cannot take every session
slot: KVRAG_MCP_SESSIONS_PER_KEY bounds the sessions a key holds open (429 beyond), while other keys still
open theirs."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from server.mcp_sessions import SessionTable
from tests.server_harness import LiveServer, live_server, make_key

pytest.importorskip("mcp", reason="the MCP door needs the `mcp` package")

INITIALIZE = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
              "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                         "clientInfo": {"name": "raw", "version": "0"}}}
PING = {"jsonrpc": "2.0", "id": 2, "method": "ping"}
HEADERS = {"Accept": "application/json, text/event-stream", "MCP-Protocol-Version": "2025-06-18"}
PER_KEY = 2


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, tiny_llm, embedder) -> Iterator[LiveServer]:
    with live_server("sqlite", tmp_path_factory.mktemp("mcp-sessions"), tiny_llm, embedder,
                     mcp_sessions_per_key=PER_KEY) as server:
        with server.admin() as c:
            for bank in ("alpha", "beta"):
                assert c.post("/v1/banks", json={"name": bank}).status_code == 201
        yield server


@pytest.fixture(scope="module")
def keys(live: LiveServer) -> dict[str, str]:
    return {"a": make_key(live, banks=["alpha", "beta"], agent="a", name="a")["key"],
            "b": make_key(live, role="read", banks=["alpha"], agent="b", name="b")["key"],
            "c": make_key(live, role="read", banks=["alpha"], agent="c", name="c")["key"]}


def _open(http: httpx.Client, key: str, bank: str = "alpha") -> httpx.Response:
    return http.post(f"/mcp/{bank}", json=INITIALIZE, headers={**HEADERS, "Authorization": f"Bearer {key}"})


def _use(http: httpx.Client, method: str, key: str, session: str, bank: str = "alpha") -> httpx.Response:
    headers = {**HEADERS, "Authorization": f"Bearer {key}", "mcp-session-id": session}
    return http.request(method, f"/mcp/{bank}", json=PING if method == "POST" else None, headers=headers)


def test_a_session_answers_only_the_key_and_bank_that_opened_it(live: LiveServer, keys: dict[str, str]) -> None:
    with httpx.Client(base_url=live.url, timeout=30) as http:
        opened = _open(http, keys["a"])
        assert opened.status_code == 200, opened.text
        session = opened.headers["mcp-session-id"]
        for method in ("POST", "GET", "DELETE"):
            hijack = _use(http, method, keys["b"], session)
            assert hijack.status_code == 404 and hijack.json()["code"] == "not_found", (method, hijack.text)
        assert _use(http, "POST", keys["a"], session, bank="beta").status_code == 404  # another bank
        assert _use(http, "POST", keys["a"], session).status_code == 200  # the owner's session survived
        assert _use(http, "DELETE", keys["a"], session).status_code == 200
        assert _use(http, "POST", keys["a"], session).status_code == 404


def test_one_key_cannot_take_every_session(live: LiveServer, keys: dict[str, str]) -> None:
    with httpx.Client(base_url=live.url, timeout=30) as http:
        held = []
        for _ in range(PER_KEY):
            opened = _open(http, keys["b"])
            assert opened.status_code == 200, opened.text
            held.append(opened.headers["mcp-session-id"])
        refused = _open(http, keys["b"])
        assert refused.status_code == 429 and refused.json()["code"] == "rate_limited", refused.text
        assert refused.headers["Retry-After"]
        assert _open(http, keys["c"]).status_code == 200  # other keys still open theirs
        assert _use(http, "DELETE", keys["b"], held.pop()).status_code == 200
        assert _open(http, keys["b"]).status_code == 200  # a closed session frees its slot


def test_idle_sessions_free_their_slot_and_streaming_ones_do_not() -> None:
    now = [0.0]
    table = SessionTable(per_key=2, idle_s=60, clock=lambda: now[0])
    for sid in ("s1", "s2"):
        assert table.reserve("k")
        table.bind(sid, ("k", "alpha"))
        table.release("k")
        table.end(sid)
    assert not table.reserve("k") and table.reserve("other")
    table.begin("s2")  # a GET stream held open on s2
    now[0] = 61.0
    assert table.owner_of("s1") is None and table.owner_of("s2") == ("k", "alpha")
    assert table.held_by("k") == 1 and table.reserve("k")
