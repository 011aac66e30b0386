"""Token caps on questions, tasks, segments and appends (issue 26, hole 3), through every door.

A multi-megabyte question used to hold the model for tens of seconds and then answer 500. Every text a caller
asks the model to read has a cap (kvstore/model/limits.py); above it the answer is ``413 payload_too_large`` within
about a second, before any model work, and nothing is stored. REST, the OpenAI door and the MCP tools (which
call REST in process) all get it. A kv query keeps its assembled context within the model's positions by
leaving out the lowest-ranked blocks that would not fit.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from kvstore.bank import BankStore
from kvstore.model.loader import Embedder, LoadedModel
from tests.conftest import build_tiny
from tests.server_harness import LiveServer, live_server, make_key

HUGE = "memory " * 600_000  # 4.2 MB of text: under the 8 MiB body limit, far over every token cap
CAPS = {"max_question_tokens": 40, "max_task_tokens": 40, "max_segment_tokens": 60, "max_append_tokens": 100}
NORMANS = "The Normans gave their name to Normandy, a region in France."


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, tiny_llm: LoadedModel, embedder: Embedder) -> Iterator[LiveServer]:
    with live_server("sqlite", tmp_path_factory.mktemp("caps"), tiny_llm, embedder, **CAPS) as server:
        with server.admin() as c:
            assert c.post("/v1/banks", json={"name": "kb"}).status_code == 201
            assert c.put("/v1/banks/kb/documents/normans", json={"text": NORMANS}).status_code in (200, 201)
        yield server


@pytest.fixture(scope="module")
def key(live: LiveServer) -> str:
    return make_key(live, banks=["kb"], agent="agent-a")["key"]


def _refused(call: Callable[[], httpx.Response], code: str = "payload_too_large") -> httpx.Response:
    t0 = time.perf_counter()
    r = call()
    elapsed = time.perf_counter() - t0
    assert r.status_code == 413, r.text
    assert elapsed < 1.5, f"refusing took {elapsed:.2f} s"
    if code:
        assert r.json()["code"] == code
    return r


def _words(n: int) -> str:
    return " ".join(["memory"] * n)


def test_a_huge_or_long_question_is_refused_before_any_model_work(live: LiveServer, key: str) -> None:
    with live.client(key) as c:
        _refused(lambda: c.post("/v1/banks/kb/query", json={"question": HUGE, "max_new_tokens": 2}))
        # Short in bytes but over the cap in tokens: counted exactly, refused with the count.
        r = _refused(lambda: c.post("/v1/banks/kb/query", json={"question": _words(60), "max_new_tokens": 2}))
        assert "tokens" in r.json()["detail"]
        streamed = _refused(lambda: c.post("/v1/banks/kb/query", json={"question": HUGE, "stream": True}))
        assert streamed.headers["content-type"].startswith("application/json")
        ok = c.post("/v1/banks/kb/query", json={"question": "Who were the Normans?", "max_new_tokens": 2})
        assert ok.status_code == 200, ok.text


def test_session_appends_tasks_and_goals_are_capped_and_nothing_is_stored(live: LiveServer, key: str) -> None:
    with live.client(key) as c:
        assert c.post("/v1/banks/kb/sessions", json={"session_id": "s1"}).status_code == 201
        append = "/v1/banks/kb/sessions/s1/append"
        _refused(lambda: c.post(append, json={"segments": [{"role": "tool", "text": HUGE}]}))
        _refused(lambda: c.post(append, json={"segments": [{"role": "tool", "text": _words(80)}]}))
        # Each segment under its cap, together over the append's.
        _refused(lambda: c.post(append, json={"segments": [{"role": "tool", "text": _words(50)}] * 3}))
        assert c.get("/v1/banks/kb/sessions/s1").json()["tokens"] == 0
        assert c.post(append, json={"segments": [{"role": "tool", "text": NORMANS}]}).status_code == 200
        _refused(lambda: c.post("/v1/banks/kb/sessions/s1/brief", json={"task": HUGE, "max_new_tokens": 2}))
        _refused(lambda: c.post("/v1/banks/kb/sessions/s1/brief", json={"task": _words(60), "stream": True}))
        _refused(lambda: c.post("/v1/banks/kb/sessions/s1/prune", json={"policy": "attention", "goal": HUGE}))
        info = c.get("/v1/banks/kb/sessions/s1").json()
        assert info["tokens"] > 0 and len(info["segments"]) == 1
        # Three short segments whose byte bounds exceed the append cap but whose tokens do not: counted, accepted.
        three = [{"role": "tool", "text": NORMANS}] * 3
        assert c.post(append, json={"segments": three}).status_code == 200


def test_the_openai_door_refuses_a_huge_message_in_its_own_shape(live: LiveServer, key: str) -> None:
    body = {"model": "kvrag:kb", "messages": [{"role": "user", "content": HUGE}], "max_tokens": 2}
    with live.client(key) as c:
        r = _refused(lambda: c.post("/v1/chat/completions", json=body), code="")
        error = r.json()["error"]
        assert error["code"] == "payload_too_large" and error["param"] == "messages"
        # A long conversation with a short last message is answered: the history gets the room the cap leaves.
        history = [{"role": "user", "content": _words(300)}, {"role": "assistant", "content": "ok"}] * 3
        short = {**body, "messages": [*history, {"role": "user", "content": "Who were the Normans?"}]}
        answered = c.post("/v1/chat/completions", json=short)
        assert answered.status_code == 200, answered.text
        assert answered.json()["usage"]["prompt_tokens"] > 0


def test_the_mcp_ask_tool_gets_the_refusal_as_a_tool_error(live: LiveServer, key: str) -> None:
    pytest.importorskip("mcp", reason="the MCP door needs the `mcp` package")
    httpx2 = pytest.importorskip("httpx2", reason="the mcp SDK's HTTP client (httpx2) is not installed")
    import anyio
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    async def ask() -> tuple[dict, float]:
        http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=60)
        async with Client(streamable_http_client(f"{live.url}/mcp/kb", http_client=http),
                          read_timeout_seconds=60) as client:
            t0 = time.perf_counter()
            result = await client.call_tool("ask", {"question": _words(2000), "max_new_tokens": 2})
            elapsed = time.perf_counter() - t0
            assert result.is_error and result.structured_content is not None
            return result.structured_content, elapsed

    failure, elapsed = anyio.run(ask)
    assert failure["code"] == "payload_too_large" and failure["status"] == 413
    assert elapsed < 1.5


def test_a_kv_query_keeps_its_context_within_the_models_positions(make_store: Callable[..., BankStore]) -> None:
    """Retrieval is trimmed: the lowest-ranked blocks that would not fit are left out of context and sources."""
    small = build_tiny("llama", max_position_embeddings=160)
    store = make_store(llm=small, block_tokens=32)
    store.create_bank("kb")
    for i in range(8):
        store.put_document("kb", f"d{i}", f"Note {i}: " + NORMANS + " " + _words(12))
    max_new = 8
    result = store.query("kb", "Who were the Normans?", k=8, max_new_tokens=max_new)
    used = len(store.runner.prefix_ids) + result.usage.context_tokens + result.usage.question_tokens + max_new
    assert used <= 160, used
    assert 0 < len(result.sources) < 8
    text = store.query("kb", "Who were the Normans?", k=8, mode="text", max_new_tokens=max_new)
    assert [h.doc_id for h in text.sources] == [h.doc_id for h in result.sources]


def test_a_brief_reads_only_the_documents_that_fit_after_the_trajectory(make_store: Callable[..., BankStore]) -> None:

    small = build_tiny("llama", max_position_embeddings=200)
    store = make_store(llm=small, block_tokens=32)
    store.create_bank("kb")
    for i in range(8):
        store.put_document("kb", f"d{i}", f"Note {i}: " + NORMANS + " " + _words(12))
    sessions = store.agent_sessions
    sessions.create("kb", "s")
    sessions.append("kb", "s", [{"role": "tool", "text": NORMANS}])
    max_new = 8
    result = sessions.brief("kb", "s", "Who were the Normans?", include_documents=8, max_new_tokens=max_new)
    positions = sessions.get("kb", "s").total_tokens
    used = len(store.runner.prefix_ids) + positions + result.document_tokens + result.task_tokens + max_new
    assert used <= 200, used
    assert 0 < len(result.sources) < 8
