"""Bad input is always a 4xx JSON error (never a 500), stores nothing, and never becomes a path on disk."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from kvstore.errors import Unavailable
from server.worker import ModelWorker
from tests.server_harness import LiveServer, live_server

TEXT = "Paris is the capital and most populous city of France."
BODY_LIMIT = 64 << 10


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, tiny_llm, embedder) -> Iterator[LiveServer]:
    with live_server("sqlite", tmp_path_factory.mktemp("input"), tiny_llm, embedder, max_body_bytes=BODY_LIMIT,
                     max_document_chars=20_000, queue_size=1) as server:
        with server.admin() as c:
            assert c.post("/v1/banks", json={"name": "inputs"}).status_code == 201
        yield server


def _assert_error(r: Any, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"detail", "code", "request_id"} and body["code"] == code
    assert body["request_id"] == r.headers["X-Request-ID"] and "Traceback" not in r.text


def _nothing_stored(live: LiveServer) -> None:
    assert live.store.stats("inputs").documents == 0
    assert not any(p.is_file() for p in (live.settings.data_dir / "blobs").rglob("*"))


DOC = "/v1/banks/inputs/documents/d1"
BAD_BODIES: list[tuple[str, str, Any, int, str]] = [
    ("PUT", DOC, {"text": 123}, 422, "validation_error"),
    ("PUT", DOC, {"text": TEXT, "tags": "a"}, 422, "validation_error"),
    ("PUT", DOC, {"text": TEXT, "metadata": [1]}, 422, "validation_error"),
    ("PUT", DOC, {"text": TEXT, "pinned": "yes"}, 422, "validation_error"),
    ("PUT", DOC, {"text": TEXT, "colour": "red"}, 422, "validation_error"),
    ("PUT", DOC, {}, 422, "validation_error"),
    ("PUT", DOC, {"text": "   "}, 422, "validation_error"),
    ("PUT", DOC, {"text": "x" * 20_001}, 413, "payload_too_large"),
    ("PUT", DOC, {"text": TEXT, "metadata": {"blob": "y" * (16 << 10)}}, 422, "validation_error"),
    ("PUT", DOC, [TEXT], 422, "validation_error"),
    ("POST", "/v1/banks/inputs/documents", {"documents": [{"id": "ok", "text": TEXT}, {"id": "../x", "text": TEXT}]},
     422, "validation_error"),
    ("POST", "/v1/banks/inputs/documents", {"documents": [{"id": "ok", "text": TEXT, "extra": 1}]},
     422, "validation_error"),
    ("POST", "/v1/banks/inputs/documents", {"documents": []}, 422, "validation_error"),
    ("POST", "/v1/banks/inputs/search", {"query": "x", "k": 101}, 422, "validation_error"),
    ("POST", "/v1/banks/inputs/search", {"query": "x", "k": "5"}, 422, "validation_error"),
    ("POST", "/v1/banks/inputs/search", {"query": "x", "filter": {"who": "me"}}, 422, "validation_error"),
    ("POST", "/v1/banks/inputs/query", {"question": "x", "max_new_tokens": 1025}, 422, "validation_error"),
    ("POST", "/v1/banks/inputs/query", {"question": "x", "mode": "telepathy"}, 422, "validation_error"),
    ("POST", "/v1/banks", {"name": "Bad Name"}, 422, "validation_error"),
    ("POST", "/v1/banks", {"name": "../etc"}, 422, "validation_error"),
    ("POST", "/v1/banks", {"name": "-x"}, 422, "validation_error"),
    ("POST", "/v1/banks", {"name": "ok", "eviction": "random"}, 422, "validation_error"),
    ("POST", "/v1/banks", {"name": "ok", "codec": "nonsense"}, 422, "validation_error"),
    ("POST", "/v1/banks", {"name": "ok", "codec": "int4"}, 422, "validation_error"),  # research preset: not offered
    ("POST", "/v1/keys", {"name": "k", "agent": "a", "role": "root", "banks": ["*"]}, 422, "validation_error"),
    ("POST", "/v1/keys", {"name": "k", "agent": "a", "role": "read", "banks": ["../x"]}, 422, "validation_error"),
]


@pytest.mark.parametrize(("method", "path", "body", "status", "code"), BAD_BODIES)
def test_bad_bodies(live: LiveServer, method: str, path: str, body: Any, status: int, code: str) -> None:
    with live.admin() as c:
        _assert_error(c.request(method, path, json=body), status, code)
        assert [b["name"] for b in c.get("/v1/banks").json()["banks"]] == ["inputs"]
    _nothing_stored(live)


@pytest.mark.parametrize("raw", [b"{", b'{"text": "a",}', b"\xff\xfe", b"text=hello"])
def test_unparseable_json_is_400(live: LiveServer, raw: bytes) -> None:
    with live.admin() as c:
        r = c.put(DOC, content=raw, headers={"Content-Type": "application/json"})
    _assert_error(r, 400, "bad_request")
    _nothing_stored(live)


def test_too_deep_json_is_422(live: LiveServer) -> None:
    nested: Any = "leaf"
    for _ in range(40):
        nested = {"n": nested}
    with live.admin() as c:
        _assert_error(c.put(DOC, json={"text": TEXT, "metadata": nested}), 422, "validation_error")
        very_deep = "[" * 20_000 + "]" * 20_000  # deeper than the parser recurses
        _assert_error(c.put(DOC, content=very_deep, headers={"Content-Type": "application/json"}), 422,
                      "validation_error")
    _nothing_stored(live)


def test_oversize_bodies_are_413(live: LiveServer) -> None:
    big = json.dumps({"text": "z" * BODY_LIMIT}).encode()

    def chunks() -> Iterator[bytes]:  # no Content-Length: the streamed size must be counted
        for i in range(0, len(big), 4096):
            yield big[i:i + 4096]

    with live.admin() as c:
        _assert_error(c.put(DOC, content=big, headers={"Content-Type": "application/json"}), 413,
                      "payload_too_large")
        _assert_error(c.put(DOC, content=chunks(), headers={"Content-Type": "application/json"}), 413,
                      "payload_too_large")
    _nothing_stored(live)


# A bare ".." is resolved by HTTP clients before sending (to the bank's own URL), so it is sent encoded.
@pytest.mark.parametrize("doc_id", ["..%2F..%2Fetc%2Fpasswd", "a%2Fb", "%2E%2E", ".hidden", "a b", "x" * 129, "d%0A",
                                    "d%0D%0A"])
def test_document_ids_never_touch_disk(live: LiveServer, doc_id: str) -> None:
    with live.admin() as c:
        for method in ("PUT", "GET", "DELETE"):
            r = c.request(method, f"/v1/banks/inputs/documents/{doc_id}", json={"text": TEXT})
            assert r.status_code in (400, 404, 422), r.text  # 400: a dot segment, refused before routing
            assert r.json()["code"] in ("bad_request", "not_found", "validation_error")
    _nothing_stored(live)


def test_unknown_routes_and_methods_are_json(live: LiveServer) -> None:
    with live.admin() as c:
        _assert_error(c.get("/v2/nothing"), 404, "not_found")
        _assert_error(c.get("/v1/banks/Bad..Name"), 404, "not_found")
        _assert_error(c.get("/v1/banks/inputs/documents", params={"limit": 0}), 422, "validation_error")
        r = c.request("PATCH", "/healthz")
        assert r.status_code == 405 and r.json()["code"] == "bad_request"


def test_a_full_model_queue_answers_503_with_retry_after(live: LiveServer, monkeypatch) -> None:
    gate = threading.Event()
    real_search = live.store.search

    def blocked_search(*args: Any, **kwargs: Any) -> Any:
        gate.wait(30)
        return real_search(*args, **kwargs)

    monkeypatch.setattr(live.store, "search", blocked_search)
    results: list[int] = []

    def search() -> None:
        with live.admin() as c:
            results.append(c.post("/v1/banks/inputs/search", json={"query": "Paris"}).status_code)

    threads = [threading.Thread(target=search) for _ in range(2)]
    for t in threads:
        t.start()
        for _ in range(200):  # wait until this call is running or queued, so the order is known
            if live.app.state.worker.depth == len(results) + threads.index(t) + 1:
                break
            threading.Event().wait(0.01)
    with live.admin() as c:
        r = c.post("/v1/banks/inputs/search", json={"query": "Paris"})
    gate.set()
    for t in threads:
        t.join()
    _assert_error(r, 503, "unavailable")
    assert r.headers["Retry-After"] == "1"
    assert results == [200, 200]


def test_worker_runs_one_call_at_a_time_and_bounds_its_queue() -> None:
    async def scenario() -> None:
        worker = ModelWorker(queue_size=2)
        gate = threading.Event()
        running: list[int] = []

        def job(i: int) -> int:
            running.append(i)
            gate.wait(5)
            return i

        first = worker.submit(job, 0)
        while worker.waiting:  # the first call has started
            await asyncio.sleep(0.001)
        queued = [worker.submit(job, i) for i in (1, 2)]
        with pytest.raises(Unavailable):
            worker.submit(job, 3)
        assert worker.depth == 3 and running == [0]
        gate.set()
        assert await asyncio.gather(first, *queued) == [0, 1, 2]
        worker.shutdown()

    asyncio.run(scenario())


def test_worker_with_threads_keeps_one_call_at_a_time_unless_a_call_gives_its_turn_up() -> None:
    async def scenario() -> None:
        worker = ModelWorker(queue_size=8, threads=4)
        order: list[str] = []
        inside = threading.Semaphore(0)
        gate = threading.Event()

        def job(name: str, wait: bool = False) -> str:
            order.append(f"{name} start")
            time.sleep(0.02)  # another thread's call would start here if the turn did not hold it back
            if wait:
                with worker.released():  # as a batched question does while it waits for its batch
                    inside.release()
                    gate.wait(5)
            order.append(f"{name} end")
            return name

        waiting = worker.submit(job, "a", True)
        await asyncio.to_thread(inside.acquire)
        later = [worker.submit(job, "b")]
        while "b start" not in order:
            await asyncio.sleep(0.001)
        later.append(worker.submit(job, "c"))
        assert await asyncio.gather(*later) == ["b", "c"]  # they ran while "a" had given its turn up
        gate.set()
        assert await waiting == "a"
        assert order == ["a start", "b start", "b end", "c start", "c end", "a end"]
        worker.shutdown()

    asyncio.run(scenario())
