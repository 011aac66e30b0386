"""Maintenance over HTTP: a budget set by PATCH is enforced, damaged blobs are rebuilt, reads keep working."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.server_harness import LiveServer, live_server, maintain

TEXTS = {
    "normans": "The Normans were the people who gave their name to Normandy, a region in France.",
    "paris": "Paris is the capital and most populous city of France. The Seine flows through it.",
    "photo": "Photosynthesis converts light energy into chemical energy stored in glucose.",
}


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, tiny_llm, embedder) -> Iterator[LiveServer]:
    with live_server("sqlite", tmp_path_factory.mktemp("maint"), tiny_llm, embedder) as server:
        yield server


def test_budget_patch_and_maintenance_report(live: LiveServer) -> None:
    with live.admin() as c:
        assert c.post("/v1/banks", json={"name": "m"}).status_code == 201
        for doc_id, text in TEXTS.items():
            assert c.put(f"/v1/banks/m/documents/{doc_id}", json={"text": text}).status_code == 201
        full = c.get("/v1/banks/m").json()
        budget = full["stored_bytes"] // 2
        patched = c.patch("/v1/banks/m", json={"budget_bytes": budget})
        assert patched.status_code == 200 and patched.json()["stored_bytes"] <= budget
        body = maintain(c, "m", rebuild=True)
        assert body["bank"] == "m" and body["over_budget"] is False and body["verify"]["rebuilt"] == 0
        stats = c.get("/v1/banks/m").json()
        assert stats["stored_bytes"] <= budget and stats["tiers"]["cold"]["blocks"] >= 1
        answer = c.post("/v1/banks/m/query", json={"question": "Who were the Normans?", "k": 3,
                                                   "max_new_tokens": 3})
        assert answer.status_code == 200 and len(answer.json()["sources"]) == 3


def test_maintenance_needs_write_scope_and_rejects_unknown_fields(live: LiveServer) -> None:
    with live.admin() as c:
        c.post("/v1/banks", json={"name": "m2"})
        key = c.post("/v1/keys", json={"name": "r", "agent": "r", "role": "read", "banks": ["m2"]}).json()["key"]
        assert c.post("/v1/banks/m2/maintenance", json={"bogus": 1}).status_code == 422
    with live.client(key) as reader:
        assert reader.post("/v1/banks/m2/maintenance", json={}).status_code == 403


def test_query_accepts_recompute_and_compaction(live: LiveServer) -> None:
    with live.admin() as c:
        c.post("/v1/banks", json={"name": "q"})
        for doc_id, text in TEXTS.items():
            c.put(f"/v1/banks/q/documents/{doc_id}", json={"text": text})
        r = c.post("/v1/banks/q/query", json={"question": "Who were the Normans?", "k": 3, "max_new_tokens": 2,
                                              "recompute": 0.5, "compaction": {"budget_tokens": 12}})
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        assert usage["recomputed_tokens"] > 0 and usage["kept_tokens"] <= 12
        bad = c.post("/v1/banks/q/query", json={"question": "x", "recompute": 2.0})
        assert bad.status_code == 422 and bad.json()["code"] == "validation_error"
        bad = c.post("/v1/banks/q/query", json={"question": "x", "compaction": {"nope": 1}})
        assert bad.status_code == 422
