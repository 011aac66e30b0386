"""A live server with two keys over two banks (documents, queries in both modes, a context map with versions,
a session with a pruned segment) that the console's HTTP and browser tests read."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from tests.server_harness import LiveServer, live_server, make_key

ALPHA, BETA = "alpha-bank", "bank-beta-7q"
BETA_SECRET = "zebra-secret-4411"  # only in bank BETA's documents
ALPHA_DOCS = [f"alpha-doc-{i:02d}" for i in range(12)]
ASKED = "where did the normans settle in the tenth century"


@dataclass
class World:
    live: LiveServer
    key_a: str  # write key of agent-a over ALPHA
    key_b: str  # write key of agent-b over BETA
    reader_c: str  # read key of agent-c over ALPHA (another agent than the asker)
    key_a_id: str

    def client(self, key: str | None = None, **kwargs: object) -> httpx.Client:
        return self.live.client(key, follow_redirects=False, **kwargs)  # type: ignore[arg-type]


def _check(response: httpx.Response, *codes: int) -> httpx.Response:
    assert response.status_code in codes, response.text
    return response


def seed(live: LiveServer) -> World:
    """Two banks, each written by its own agent's key, with everything a console page shows."""
    with live.admin() as admin:
        for bank in (ALPHA, BETA):
            _check(admin.post("/v1/banks", json={"name": bank}), 201)
    a = make_key(live, role="write", banks=[ALPHA], agent="agent-a", name="key-a")
    b = make_key(live, role="write", banks=[BETA], agent="agent-b", name="key-b")
    c = make_key(live, role="read", banks=[ALPHA], agent="agent-c", name="reader-c")
    with live.client(a["key"]) as ca:
        docs = [{"id": d, "text": f"Alpha note {d}: the Normans settled in Normandy in the tenth century.",
                 "tags": ["history"]} for d in ALPHA_DOCS]
        _check(ca.post(f"/v1/banks/{ALPHA}/documents", json={"documents": docs[:10]}), 200)
        for d in docs[10:]:
            _check(ca.put(f"/v1/banks/{ALPHA}/documents/{d['id']}", json={"text": d["text"]}), 201)
        for mode in ("kv", "text", "kv", "text"):
            _check(ca.post(f"/v1/banks/{ALPHA}/query", json={"question": ASKED, "mode": mode, "k": 2,
                                                            "max_new_tokens": 3}), 200)
        _check(ca.post(f"/v1/banks/{ALPHA}/context-map/edits", json={"edits": [
            {"op": "add", "section": "roadmap", "content": "alpha-doc-00 to 11 hold notes on the Normans"},
            {"op": "add", "section": "understanding", "content": "dates are given by century"}]}), 200)
        _check(ca.post(f"/v1/banks/{ALPHA}/context-map/edits", json={"edits": [
            {"op": "replace", "id": "cu-1", "content": "dates are given by century, never by year"},
            {"op": "add", "section": "reusable_results", "content": "Normandy: settled in the 10th century"}],
            "feedback": [{"id": "cr-1", "tag": "helpful"}]}), 200)
        _check(ca.post(f"/v1/banks/{ALPHA}/sessions", json={"session_id": "trip-1"}), 201)
        _check(ca.post(f"/v1/banks/{ALPHA}/sessions/trip-1/append", json={"segments": [
            {"role": "orchestrator", "text": "plan the visit to Normandy"},
            {"role": "tool", "text": "weather report: rain all week"},
            {"role": "worker", "text": "booked the ferry to Caen"}]}), 200)
    live.store.agent_sessions.prune(ALPHA, "trip-1", policy="model", judge=lambda prompt, ids: '{"needed": [0, 2]}')
    with live.client(b["key"]) as cb:
        for i in range(3):
            _check(cb.put(f"/v1/banks/{BETA}/documents/beta-doc-{i}",
                          json={"text": f"{BETA_SECRET} item {i}: Paris is the capital of France."}), 201)
        _check(cb.post(f"/v1/banks/{BETA}/query", json={"question": f"{BETA_SECRET} what is the capital",
                                                         "max_new_tokens": 2}), 200)
        _check(cb.post(f"/v1/banks/{BETA}/sessions", json={"session_id": "beta-session"}), 201)
    return World(live=live, key_a=a["key"], key_b=b["key"], reader_c=c["key"], key_a_id=a["id"])


@pytest.fixture(scope="package")  # seeded once for the console's test modules; no test changes what it seeded
def world(tmp_path_factory: pytest.TempPathFactory, tiny_llm, embedder) -> Iterator[World]:
    with live_server("sqlite", tmp_path_factory.mktemp("console"), tiny_llm, embedder,
                     batch_job_threshold=20, query_log_keep=50) as live:
        yield seed(live)


def alpha_pages() -> list[str]:
    """Every console page of bank ALPHA."""
    base = f"/console/banks/{ALPHA}"
    return ["/console", base, f"{base}/documents", f"{base}/documents?limit=5&cursor=alpha-doc-04",
            f"{base}/documents/alpha-doc-03", f"{base}/blocks", f"{base}/context-map", f"{base}/context-map?version=1",
            f"{base}/context-map/diff?a=1&b=2", f"{base}/sessions", f"{base}/sessions/trip-1", f"{base}/queries"]


def beta_pages() -> list[str]:
    """Every console page of bank BETA (each must be a 404 for a key outside it)."""
    base = f"/console/banks/{BETA}"
    return [base, f"{base}/documents", f"{base}/documents/beta-doc-0", f"{base}/blocks", f"{base}/context-map",
            f"{base}/context-map/diff?a=0&b=0", f"{base}/sessions", f"{base}/sessions/beta-session",
            f"{base}/queries"]
