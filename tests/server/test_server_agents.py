"""Many agents, one bank: concurrent writers with their own keys lose nothing, and reads filter by agent."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.server_harness import BACKENDS, LiveServer, live_server, make_key

AGENTS = [f"agent-{i}" for i in range(8)]
DOCS_PER_AGENT = 25
TOPICS = ["rivers", "castles", "plants", "stars", "ships"]


@pytest.fixture(scope="module", params=BACKENDS)
def live(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_llm, embedder
         ) -> Iterator[LiveServer]:
    with live_server(request.param, tmp_path_factory.mktemp("agents"), tiny_llm, embedder) as server:
        yield server


def _write_all(live: LiveServer, agent: str, key: str) -> list[int]:
    with live.client(key) as c:
        return [c.put(f"/v1/banks/shared/documents/{agent}-{i}",
                      json={"text": f"{agent} note {i} about {TOPICS[i % 5]}.", "tags": [TOPICS[i % 5]],
                            "metadata": {"n": i}}).status_code
                for i in range(DOCS_PER_AGENT)]


def test_eight_agents_write_concurrently_and_read_only_their_own(live: LiveServer) -> None:
    with live.admin() as c:
        assert c.post("/v1/banks", json={"name": "shared"}).status_code == 201
    keys = {agent: make_key(live, role="write", banks=["shared"], agent=agent, name=agent)["key"] for agent in AGENTS}
    with ThreadPoolExecutor(len(AGENTS)) as pool:
        statuses = list(pool.map(lambda a: _write_all(live, a, keys[a]), AGENTS))
    assert all(s == 201 for per_agent in statuses for s in per_agent)

    with live.admin() as c:
        docs = c.get("/v1/banks/shared/documents", params={"limit": 1000}).json()["documents"]
        assert len(docs) == len(AGENTS) * DOCS_PER_AGENT
        assert all(d["agent"] == d["doc_id"].rsplit("-", 1)[0] for d in docs)
        assert c.get("/v1/banks/shared").json()["documents"] == 200

    asked = "agent-3"
    with live.client(keys["agent-5"]) as c:
        hits = c.post("/v1/banks/shared/search", json={"query": "castles", "k": 10, "filter": {"agent": asked}})
        assert len(hits.json()["hits"]) == 10 and {h["agent"] for h in hits.json()["hits"]} == {asked}
        narrowed = c.post("/v1/banks/shared/search", json={
            "query": "castles", "k": 20, "filter": {"agent": asked, "tags": ["castles"], "metadata": {"n": 6}}})
        assert [h["doc_id"] for h in narrowed.json()["hits"]] == [f"{asked}-6"]
        for mode in ("kv", "text"):
            answer = c.post("/v1/banks/shared/query", json={"question": "Which castles?", "k": 5, "mode": mode,
                                                            "max_new_tokens": 2, "filter": {"agent": asked}})
            assert answer.status_code == 200, answer.text
            sources = answer.json()["sources"]
            assert len(sources) == 5 and {s["agent"] for s in sources} == {asked}
