"""The SDK against a real local HTTP server that answers scripted responses.

This checks what the SDK itself decides (retries, backoff, error mapping, SSE parsing, pagination, job
polling) without the engine; tests/client/test_sdk_e2e.py drives the real kvrag server.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pydantic
import pytest
from kvrag_client import (
    APIConnectionError,
    APITimeoutError,
    AsyncKVRag,
    AuthenticationError,
    BadRequest,
    Conflict,
    CorruptBlock,
    DoneEvent,
    IncompatibleModel,
    InternalServerError,
    JobFailed,
    KVRag,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
    RateLimited,
    TokenEvent,
    Unavailable,
    ValidationError,
    VersionMismatch,
)

BANK = {"name": "notes", "codec": "fp16", "model": "tiny", "model_fingerprint": "abc", "block_tokens": 256,
        "budget_bytes": None, "max_blocks": None, "eviction": "lru", "created_at": "2026-01-01T00:00:00Z"}
DOC = {"doc_id": "a", "version": 1, "metadata": {}, "tags": [], "agent": None, "pinned": False, "blocks": 1,
       "tokens": 7, "content_hash": "h", "created_at": "2026-01-01T00:00:00Z",
       "updated_at": "2026-01-01T00:00:00Z", "text": None}
RESULT = {"answer": "Paris", "mode": "kv",
          "sources": [{"doc_id": "a", "block_id": 1, "score": 0.9, "text": "t", "metadata": {}, "agent": None,
                       "ordinal": 0}],
          "timings": {"retrieve_ms": 1, "load_ms": 2, "prefill_ms": 3, "ttft_ms": 4, "total_ms": 5, "extra_ms": 6},
          "usage": {"context_tokens": 10, "question_tokens": 3, "generated_tokens": 1}}


@dataclass
class Reply:
    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    raw: bytes | None = None


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: Any
    at: float


class FakeServer:
    """A threaded HTTP server; each (method, path) answers its scripted replies in order, the last repeating."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], list[Reply]] = {}
        self.seen: list[Seen] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                url = urlsplit(self.path)
                length = int(self.headers.get("content-length") or 0)
                data = self.rfile.read(length) if length else b""
                fake.seen.append(Seen(self.command, url.path, parse_qs(url.query),
                                      {k.lower(): v for k, v in self.headers.items()},
                                      json.loads(data) if data else None, time.monotonic()))
                replies = fake.routes.get((self.command, url.path)) or [
                    Reply(404, {"detail": "no such route", "code": "not_found", "request_id": "r-404"})]
                reply = replies.pop(0) if len(replies) > 1 else replies[0]
                time.sleep(reply.delay)
                payload = reply.raw if reply.raw is not None else (
                    b"" if reply.body is None else json.dumps(reply.body).encode())
                self.send_response(reply.status)
                headers = {"Content-Type": "application/json", "X-Request-ID": f"req-{len(fake.seen)}",
                           **reply.headers}
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def on(self, method: str, path: str, *replies: Reply) -> None:
        self.routes[(method, path)] = list(replies)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake() -> Iterator[FakeServer]:
    server = FakeServer()
    yield server
    server.close()


def err(status: int, code: str, **headers: str) -> Reply:
    return Reply(status, {"detail": f"{code} happened", "code": code, "request_id": "body-rid"}, headers)


def sse(*events: tuple[str, Any]) -> Reply:
    text = "".join(f"event: {name}\ndata: {json.dumps(data)}\n\n" for name, data in events)
    return Reply(200, raw=text.encode(), headers={"Content-Type": "text/event-stream"})


# -- retries ------------------------------------------------------------------------------------------


def test_503_with_retry_after_then_success(fake: FakeServer) -> None:
    fake.on("GET", "/v1/banks/notes", err(503, "unavailable", **{"Retry-After": "1"}), Reply(200, BANK))
    with KVRag(fake.url) as kv:
        bank = kv.banks.get("notes")
    assert bank.name == "notes" and bank.eviction == "lru"
    assert len(fake.seen) == 2
    assert fake.seen[1].at - fake.seen[0].at >= 0.95  # Retry-After honoured, not the 0.5 s backoff


def test_429_retried_until_max_retries_then_raised(fake: FakeServer) -> None:
    fake.on("POST", "/v1/banks/notes/search", err(429, "rate_limited", **{"Retry-After": "0"}))
    with KVRag(fake.url, max_retries=2) as kv, pytest.raises(RateLimited) as info:
        kv.search("notes", "q")
    assert len(fake.seen) == 3
    assert info.value.status == 429 and info.value.code == "rate_limited"
    assert info.value.response is not None and info.value.response.headers["retry-after"] == "0"


def test_no_retry_when_disabled(fake: FakeServer) -> None:
    fake.on("GET", "/v1/banks", err(503, "unavailable", **{"Retry-After": "0"}))
    with KVRag(fake.url, max_retries=0) as kv, pytest.raises(Unavailable):
        kv.banks.list()
    assert len(fake.seen) == 1


def test_connection_refused_is_retried_then_raised() -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with KVRag(f"http://127.0.0.1:{port}", max_retries=1) as kv, pytest.raises(APIConnectionError) as info:
        kv.health()
    assert not isinstance(info.value, APITimeoutError)
    assert time.monotonic() - t0 >= 0.3  # one backoff sleep (0.375..0.5 s) happened


def test_read_timeout_retries_only_idempotent_calls(fake: FakeServer) -> None:
    fake.on("GET", "/v1/banks/notes", Reply(200, BANK, delay=0.5))
    fake.on("POST", "/v1/keys", Reply(201, {}, delay=0.5))
    with KVRag(fake.url, timeout=0.1, max_retries=1) as kv:
        with pytest.raises(APITimeoutError):
            kv.banks.get("notes")
        assert len(fake.seen) == 2  # GET is resent
        with pytest.raises(APITimeoutError):
            kv.keys.create("k")
        assert len(fake.seen) == 3  # creating a key twice would make two keys: not resent


# -- error mapping ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "code", "cls"), [
    (400, "bad_request", BadRequest),
    (401, "unauthorized", AuthenticationError),
    (403, "forbidden", PermissionDenied),
    (404, "not_found", NotFound),
    (409, "conflict", Conflict),
    (409, "version_mismatch", VersionMismatch),
    (409, "incompatible_model", IncompatibleModel),
    (413, "payload_too_large", PayloadTooLarge),
    (422, "validation_error", ValidationError),
    (500, "internal", InternalServerError),
    (500, "corrupt_block", CorruptBlock),
])
def test_error_codes_map_to_classes(fake: FakeServer, status: int, code: str, cls: type) -> None:
    fake.on("DELETE", "/v1/banks/notes", err(status, code))
    with KVRag(fake.url) as kv, pytest.raises(cls) as info:
        kv.banks.delete("notes")
    exc = info.value
    assert type(exc) is cls
    assert (exc.status, exc.code, exc.detail) == (status, code, f"{code} happened")
    assert exc.request_id == "req-1"  # the X-Request-ID header wins over the body's copy
    assert len(fake.seen) == 1  # only 429/503 are retried


def test_version_mismatch_is_a_conflict_and_non_json_errors_still_map(fake: FakeServer) -> None:
    assert issubclass(VersionMismatch, Conflict) and issubclass(IncompatibleModel, Conflict)
    fake.on("GET", "/v1/banks", Reply(502, raw=b"<html>bad gateway</html>", headers={"Content-Type": "text/html"}))
    with KVRag(fake.url) as kv, pytest.raises(InternalServerError) as info:
        kv.banks.list()
    assert info.value.status == 502 and "bad gateway" in info.value.detail


# -- request shapes -----------------------------------------------------------------------------------


def test_put_sends_auth_headers_body_and_quoted_path(fake: FakeServer) -> None:
    fake.on("PUT", "/v1/banks/notes/documents/team%3Aa.md", Reply(201, {"document": DOC, "created": True,
                                                                          "changed": True}))
    with KVRag(fake.url, api_key="sk-test") as kv:
        res = kv.documents.put("notes", "team:a.md", "hello", metadata={"k": 1}, tags=["x"], if_match=3,
                               idempotency_key="idem-1")
    assert res.created and res.document.tokens == 7
    seen = fake.seen[0]
    assert seen.headers["authorization"] == "Bearer sk-test"
    assert seen.headers["if-match"] == "3" and seen.headers["idempotency-key"] == "idem-1"
    assert seen.body == {"text": "hello", "metadata": {"k": 1}, "tags": ["x"], "pinned": False}


def test_api_key_and_url_from_environment(fake: FakeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVRAG_URL", fake.url)
    monkeypatch.setenv("KVRAG_API_KEY", "sk-env")
    fake.on("GET", "/v1/keys", Reply(200, {"keys": [{"id": 7, "prefix": "kv_ab", "name": "n", "agent": "a",
                                                      "role": "read", "banks": ["*"]}]}))
    with KVRag() as kv:
        keys = kv.keys.list()
    assert keys[0].id == "7" and keys[0].key is None
    assert fake.seen[0].headers["authorization"] == "Bearer sk-env"


def test_search_and_query_bodies(fake: FakeServer) -> None:
    fake.on("POST", "/v1/banks/notes/search", Reply(200, {"hits": RESULT["sources"]}))
    fake.on("POST", "/v1/banks/notes/query", Reply(200, RESULT))
    with KVRag(fake.url) as kv:
        hits = kv.search("notes", "france", k=3, filter={"agent": "bob", "tags": ["geo"]})
        result = kv.query("notes", "capital?", mode="text", max_new_tokens=8)
    assert hits[0].doc_id == "a" and hits[0].score == 0.9
    assert fake.seen[0].body == {"query": "france", "k": 3, "filter": {"agent": "bob", "tags": ["geo"]}}
    assert fake.seen[1].body == {"question": "capital?", "k": 5, "mode": "text", "max_new_tokens": 8,
                                 "stream": False}
    assert result.answer == "Paris" and result.timings.ttft_ms == 4 and result.usage.generated_tokens == 1
    assert result.timings.extra_ms == 6  # unknown fields are kept


def test_query_knobs_are_sent_only_when_set(fake: FakeServer) -> None:
    fake.on("POST", "/v1/banks/notes/search", Reply(200, {"hits": RESULT["sources"]}))
    fake.on("POST", "/v1/banks/notes/query", Reply(200, RESULT))
    with KVRag(fake.url) as kv:
        kv.search("notes", "france", retrieval="hybrid")
        kv.query("notes", "capital?", retrieval="kv", recompute=0.15, compaction={"budget_tokens": 64})
        with pytest.raises(pydantic.ValidationError):
            kv.query("notes", "capital?", recompute=2.0)
    assert fake.seen[0].body == {"query": "france", "k": 5, "retrieval": "hybrid"}
    assert fake.seen[1].body == {"question": "capital?", "k": 5, "mode": "kv", "max_new_tokens": 64,
                                 "stream": False, "retrieval": "kv", "recompute": 0.15,
                                 "compaction": {"budget_tokens": 64}}
    assert len(fake.seen) == 2  # an invalid knob is refused before anything is sent


def test_documents_list_follows_the_cursor(fake: FakeServer) -> None:
    second = {**DOC, "doc_id": "b"}
    fake.on("GET", "/v1/banks/notes/documents", Reply(200, {"documents": [DOC], "next_cursor": "c1"}),
            Reply(200, {"documents": [second], "next_cursor": None}))
    with KVRag(fake.url) as kv:
        ids = [d.doc_id for d in kv.documents.list("notes", limit=1)]
    assert ids == ["a", "b"]
    assert fake.seen[0].query == {"limit": ["1"]}
    assert fake.seen[1].query == {"cursor": ["c1"], "limit": ["1"]}


def test_put_many_waits_for_the_job(fake: FakeServer) -> None:
    results = [{"document": DOC, "created": True, "changed": True}]
    fake.on("POST", "/v1/banks/notes/documents", Reply(202, {"job_id": "j1", "status": "queued"}))
    fake.on("GET", "/v1/jobs/j1",
            Reply(200, {"id": "j1", "kind": "ingest", "bank": "notes", "status": "running", "total": 1, "done": 0}),
            Reply(200, {"id": "j1", "kind": "ingest", "bank": "notes", "status": "succeeded", "total": 1,
                        "done": 1, "result": {"results": results}}))
    with KVRag(fake.url) as kv:
        out = kv.documents.put_many("notes", [{"id": "a", "text": "x", "tags": ["t"]}], poll_interval=0.01)
    assert [r.document.doc_id for r in out] == ["a"]
    assert fake.seen[0].body == {"documents": [{"id": "a", "text": "x", "tags": ["t"]}]}
    assert len(fake.seen) == 3


def test_put_many_small_batch_and_failed_job(fake: FakeServer) -> None:
    fake.on("POST", "/v1/banks/notes/documents", Reply(200, {"results": [{"document": DOC, "created": False,
                                                                           "changed": False}]}),
            Reply(202, {"job_id": "j2", "status": "queued"}))
    fake.on("GET", "/v1/jobs/j2", Reply(200, {"id": "j2", "status": "failed", "error": {"detail": "boom"}}))
    with KVRag(fake.url) as kv:
        assert not kv.documents.put_many("notes", [{"id": "a", "text": "x"}])[0].changed
        with pytest.raises(JobFailed) as info:
            kv.documents.put_many("notes", [{"id": "a", "text": "x"}], poll_interval=0.01)
    assert info.value.job_id == "j2" and "boom" in str(info.value)


def test_ready_and_wait_ready(fake: FakeServer) -> None:
    fake.on("GET", "/readyz", err(503, "unavailable", **{"Retry-After": "1"}), err(503, "unavailable"),
            Reply(200, {"status": "ready"}))
    with KVRag(fake.url) as kv:
        assert kv.ready() is False  # no retry loop inside ready()
        kv.wait_ready(timeout=5, poll_interval=0.01)
    assert len(fake.seen) == 3


# -- streaming ----------------------------------------------------------------------------------------


def test_stream_yields_tokens_then_the_result(fake: FakeServer) -> None:
    fake.on("POST", "/v1/banks/notes/query", sse(("token", {"text": "Pa"}), ("token", {"text": "ris"}),
                                                  ("done", RESULT)))
    with KVRag(fake.url) as kv:
        stream = kv.query("notes", "capital?", stream=True)
        events = list(stream)
    assert [e.text for e in events if isinstance(e, TokenEvent)] == ["Pa", "ris"]
    assert isinstance(events[-1], DoneEvent) and events[-1].result.answer == "Paris"
    assert stream.result is not None and stream.result.usage.context_tokens == 10
    assert fake.seen[0].body["stream"] is True and fake.seen[0].headers["accept"] == "text/event-stream"


def test_stream_error_event_raises_typed_error(fake: FakeServer) -> None:
    fake.on("POST", "/v1/banks/notes/query", sse(("token", {"text": "x"}),
                                                  ("error", {"detail": "gone", "code": "not_found",
                                                             "request_id": "r9"})))
    with KVRag(fake.url) as kv, pytest.raises(NotFound) as info:
        list(kv.query("notes", "q", stream=True))
    assert info.value.request_id == "req-1" and info.value.detail == "gone"


def test_stream_cut_before_done_is_a_connection_error(fake: FakeServer) -> None:
    fake.on("POST", "/v1/banks/notes/query", sse(("token", {"text": "x"})))
    with KVRag(fake.url) as kv, pytest.raises(APIConnectionError):
        list(kv.query("notes", "q", stream=True))


def test_stream_error_status_is_raised_at_the_call(fake: FakeServer) -> None:
    fake.on("POST", "/v1/banks/notes/query", err(503, "unavailable", **{"Retry-After": "0"}), err(404, "not_found"))
    with KVRag(fake.url) as kv, pytest.raises(NotFound):
        kv.query("notes", "q", stream=True)
    assert len(fake.seen) == 2


# -- async --------------------------------------------------------------------------------------------


def test_async_client_same_behaviour(fake: FakeServer) -> None:
    fake.on("GET", "/v1/banks/notes", err(503, "unavailable", **{"Retry-After": "0"}), Reply(200, BANK))
    fake.on("DELETE", "/v1/banks/gone", err(404, "not_found"))
    fake.on("GET", "/v1/banks/notes/documents", Reply(200, {"documents": [DOC], "next_cursor": "c1"}),
            Reply(200, {"documents": [{**DOC, "doc_id": "b"}], "next_cursor": None}))
    fake.on("POST", "/v1/banks/notes/documents", Reply(202, {"job_id": "j1", "status": "queued"}))
    fake.on("GET", "/v1/jobs/j1", Reply(200, {"id": "j1", "status": "succeeded",
                                              "result": [{"document": DOC, "created": True, "changed": True}]}))
    fake.on("POST", "/v1/banks/notes/query", sse(("token", {"text": "Paris"}), ("done", RESULT)))

    async def scenario() -> None:
        async with AsyncKVRag(fake.url, api_key="sk-a") as kv:
            assert (await kv.banks.get("notes")).name == "notes"
            with pytest.raises(NotFound):
                await kv.banks.delete("gone")
            assert [d.doc_id async for d in kv.documents.list("notes")] == ["a", "b"]
            out = await kv.documents.put_many("notes", [{"id": "a", "text": "x"}], poll_interval=0.01)
            assert out[0].created
            stream = await kv.query("notes", "q", stream=True)
            events = [e async for e in stream]
            assert isinstance(events[0], TokenEvent) and stream.result is not None
            assert stream.result.answer == "Paris"

    asyncio.run(scenario())
    assert all(s.headers["authorization"] == "Bearer sk-a" for s in fake.seen)


def test_importing_the_sdk_never_imports_torch_or_the_engine() -> None:
    code = ("import sys, kvrag_client; bad = [m for m in ('torch', 'kvstore', 'server', 'transformers') "
            "if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
