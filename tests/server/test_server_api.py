"""The REST API end to end over a real uvicorn server: documents, search, query, jobs, If-Match, idempotency."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from kvstore.storage.catalog import DocumentRow
from tests.server_harness import BACKENDS, LiveServer, live_server, sse_events

NORMANS = "The Normans were the people who gave their name to Normandy, a region in France."
PARIS = "Paris is the capital and most populous city of France. The Seine flows through it."
PHOTO = "Photosynthesis converts light energy into chemical energy stored in glucose."


@pytest.fixture(scope="module", params=BACKENDS)
def live(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_llm, embedder
         ) -> Iterator[LiveServer]:
    with live_server(request.param, tmp_path_factory.mktemp("api"), tiny_llm, embedder,
                     batch_job_threshold=3) as server:
        yield server


def test_health_ready_and_request_ids(live: LiveServer) -> None:
    with live.client() as c:
        r = c.get("/healthz")
        assert r.json() == {"status": "ok"} and r.headers["X-Request-ID"]
        ready = c.get("/readyz")
        assert ready.status_code == 200 and ready.json()["status"] == "ready"
        assert c.get("/healthz", headers={"X-Request-ID": "abc-123"}).headers["X-Request-ID"] == "abc-123"


def test_document_lifecycle_search_and_query(live: LiveServer) -> None:
    with live.admin() as c:
        r = c.post("/v1/banks", json={"name": "life", "eviction": "lru"})
        assert r.status_code == 201, r.text
        assert set(r.json()) >= {"name", "codec", "model", "model_fingerprint", "block_tokens", "created_at"}
        assert c.post("/v1/banks", json={"name": "life"}).json()["code"] == "conflict"

        r = c.put("/v1/banks/life/documents/normans", json={"text": NORMANS, "metadata": {"topic": "history"},
                                                            "tags": ["history"]})
        assert r.status_code == 201 and r.headers["ETag"] == '"1"'
        body = r.json()
        assert body["created"] and body["changed"] and "text" not in body["document"]
        again = c.put("/v1/banks/life/documents/normans", json={"text": NORMANS, "metadata": {"topic": "history"},
                                                                "tags": ["history"]})
        assert again.status_code == 200 and not again.json()["changed"]
        for doc_id, text in (("paris", PARIS), ("photo", PHOTO)):
            assert c.put(f"/v1/banks/life/documents/{doc_id}", json={"text": text}).status_code == 201

        doc = c.get("/v1/banks/life/documents/normans")
        assert doc.json()["text"] == NORMANS and doc.json()["metadata"] == {"topic": "history"}

        page1 = c.get("/v1/banks/life/documents", params={"limit": 2}).json()
        page2 = c.get("/v1/banks/life/documents", params={"limit": 2, "cursor": page1["next_cursor"]}).json()
        assert [d["doc_id"] for d in page1["documents"] + page2["documents"]] == ["normans", "paris", "photo"]
        assert page2["next_cursor"] is None

        hits = c.post("/v1/banks/life/search", json={"query": "Who were the Normans?", "k": 2}).json()["hits"]
        assert len(hits) == 2 and hits[0]["doc_id"] == "normans"
        assert set(hits[0]) == {"doc_id", "block_id", "score", "text", "metadata", "agent", "ordinal"}
        tagged = c.post("/v1/banks/life/search", json={"query": "France", "k": 5, "filter": {"tags": ["history"]}})
        assert [h["doc_id"] for h in tagged.json()["hits"]] == ["normans"]

        for mode in ("kv", "text"):
            r = c.post("/v1/banks/life/query", json={"question": "Who were the Normans?", "k": 2, "mode": mode,
                                                     "max_new_tokens": 4})
            assert r.status_code == 200, r.text
            result = r.json()
            assert result["mode"] == mode and isinstance(result["answer"], str) and len(result["sources"]) == 2
            assert set(result["timings"]) >= {"retrieve_ms", "load_ms", "prefill_ms", "ttft_ms", "total_ms"}
            assert result["usage"]["generated_tokens"] <= 4 and result["usage"]["context_tokens"] > 0
            assert 0 < result["timings"]["ttft_ms"] <= result["timings"]["total_ms"]

        stats = c.get("/v1/banks/life").json()
        assert stats["documents"] == 3 and stats["blocks"] >= 3 and stats["stored_bytes"] > 0
        assert {"raw_bytes", "compression_ratio", "budget_bytes", "eviction", "evictions", "merges"} <= set(stats)
        patched = c.patch("/v1/banks/life", json={"budget_bytes": 1 << 20})
        assert patched.status_code == 200 and patched.json()["budget_bytes"] == 1 << 20
        assert patched.json()["documents"] == 3

        updated = c.put("/v1/banks/life/documents/photo", json={"text": PHOTO + " Plants do it."})
        assert updated.status_code == 200 and updated.json()["document"]["version"] == 2
        assert c.delete("/v1/banks/life/documents/photo").status_code == 204
        missing = c.get("/v1/banks/life/documents/photo")
        assert missing.status_code == 404 and missing.json()["code"] == "not_found"
        assert c.get("/v1/banks/life").json()["documents"] == 2

        assert [b["name"] for b in c.get("/v1/banks").json()["banks"]] == ["life"]
        assert c.delete("/v1/banks/life").status_code == 204
        assert c.get("/v1/banks/life").status_code == 404


def test_streaming_query(live: LiveServer) -> None:
    with live.admin() as c:
        c.post("/v1/banks", json={"name": "stream"})
        c.put("/v1/banks/stream/documents/normans", json={"text": NORMANS})
        body = {"question": "Who were the Normans?", "k": 1, "max_new_tokens": 6, "stream": True}
        with c.stream("POST", "/v1/banks/stream/query", json=body) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = sse_events(r.read().decode())
        names = [e for e, _ in events]
        assert names[-1] == "done" and set(names[:-1]) <= {"token"}
        done = json.loads(events[-1][1])
        assert "".join(json.loads(d)["text"] for e, d in events if e == "token") == done["answer"]
        assert done["sources"][0]["doc_id"] == "normans" and done["usage"]["generated_tokens"] <= 6
        missing = c.post("/v1/banks/nope/query", json=body)
        assert missing.status_code == 404 and missing.json()["code"] == "not_found"


def test_if_match(live: LiveServer) -> None:
    with live.admin() as c:
        c.post("/v1/banks", json={"name": "ifm"})
        url = "/v1/banks/ifm/documents/d1"
        assert c.put(url, json={"text": PARIS}, headers={"If-Match": "0"}).status_code == 201
        stale = c.put(url, json={"text": PHOTO}, headers={"If-Match": "0"})
        assert stale.status_code == 409 and stale.json()["code"] == "version_mismatch"
        ok = c.put(url, json={"text": PHOTO}, headers={"If-Match": '"1"'})
        assert ok.status_code == 200 and ok.headers["ETag"] == '"2"'
        assert c.put(url, json={"text": PARIS}, headers={"If-Match": "soon"}).json()["code"] == "bad_request"
        assert c.delete(url, headers={"If-Match": "1"}).json()["code"] == "version_mismatch"
        assert c.delete(url, headers={"If-Match": "2"}).status_code == 204


def test_idempotency_key(live: LiveServer) -> None:
    with live.admin() as c:
        c.post("/v1/banks", json={"name": "idem"})
        url = "/v1/banks/idem/documents/d1"
        first = c.put(url, json={"text": PARIS}, headers={"Idempotency-Key": "k-1"})
        # Someone else changes the document; the retry must still get the first answer, not redo the write.
        c.put(url, json={"text": PHOTO})
        retry = c.put(url, json={"text": PARIS}, headers={"Idempotency-Key": "k-1"})
        assert first.status_code == retry.status_code == 201 and retry.json() == first.json()
        assert c.get(url).json()["text"] == PHOTO
        reused = c.put(url, json={"text": NORMANS}, headers={"Idempotency-Key": "k-1"})
        assert reused.status_code == 409 and reused.json()["code"] == "conflict"
        docs = [{"id": "b1", "text": NORMANS}]
        batch = c.post("/v1/banks/idem/documents", json={"documents": docs}, headers={"Idempotency-Key": "k-2"})
        assert c.post("/v1/banks/idem/documents", json={"documents": docs},
                      headers={"Idempotency-Key": "k-2"}).json() == batch.json()
    with live.store.session() as s:
        assert s.query(DocumentRow).filter(DocumentRow.doc_id == "d1").one().version == 2


def test_batch_in_place_and_as_job(live: LiveServer) -> None:
    with live.admin() as c:
        c.post("/v1/banks", json={"name": "batch"})
        small = [{"id": f"s{i}", "text": f"Small batch document number {i} about France."} for i in range(3)]
        r = c.post("/v1/banks/batch/documents", json={"documents": small})
        assert r.status_code == 200 and [x["document"]["doc_id"] for x in r.json()["results"]] == ["s0", "s1", "s2"]
        large = [{"id": f"j{i}", "text": f"Job document {i}: the Seine flows through Paris.", "tags": ["job"]}
                 for i in range(5)]
        accepted = c.post("/v1/banks/batch/documents", json={"documents": large})
        assert accepted.status_code == 202, accepted.text
        job_id = accepted.json()["job_id"]
        deadline = time.monotonic() + 30
        while (job := c.get(f"/v1/jobs/{job_id}").json())["status"] in ("queued", "running"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert job["status"] == "succeeded" and job["done"] == job["total"] == 5 and job["kind"] == "ingest"
        assert len(job["result"]["results"]) == 5
        assert c.get("/v1/banks/batch").json()["documents"] == 8
        assert c.get("/v1/jobs/nope").status_code == 404


def test_metrics_and_openapi(live: LiveServer) -> None:
    with live.admin() as c:
        text = c.get("/metrics").text
        assert "kvrag_requests_total" in text and "kvrag_model_queue_depth" in text
        assert "kvrag_hot_tier_hits" in text and 'route="/v1/banks/{bank}/documents/{doc_id}"' in text
        spec = c.get("/openapi.json").json()
    ops = {op["operationId"] for path in spec["paths"].values() for op in path.values()}
    assert {"put_document", "put_documents", "search", "query", "create_key", "get_job", "list_banks"} <= ops
