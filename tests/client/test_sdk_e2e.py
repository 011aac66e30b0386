"""End to end through the SDK: a real uvicorn server on a free port over a BankStore with the tiny model.

ingest -> search -> query (kv, text, streaming) -> update -> delete, with ``KVRag`` and ``AsyncKVRag``,
plus keys and scopes as a client sees them.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import uvicorn
from kvrag_client import (
    AsyncKVRag,
    AuthenticationError,
    Conflict,
    DoneEvent,
    KVRag,
    NotFound,
    PermissionDenied,
    TokenEvent,
    VersionMismatch,
)

from kvstore.bank import BankStore
from server.app import create_app

ADMIN = "root-secret-for-tests"
DOCS = {
    "normans": "The Normans were the people who in the 10th and 11th centuries gave their name to Normandy.",
    "paris": "Paris is the capital and most populous city of France. The Seine flows through it.",
    "photosynthesis": "Photosynthesis converts light energy into chemical energy stored in glucose.",
}


@dataclass
class LiveServer:
    """A kvrag server running in a background thread; ``url`` to reach it, ``admin_key`` to manage it."""

    url: str
    admin_key: str | None
    store: BankStore

    def client(self, api_key: str | None = None, **kwargs: object) -> KVRag:
        return KVRag(self.url, api_key=api_key if api_key is not None else self.admin_key, **kwargs)


def start_server(store: BankStore) -> tuple[uvicorn.Server, threading.Thread, str]:
    """Serve ``store`` on a free loopback port; the socket is bound here, so there is no race for the port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(create_app(store.settings, store=store), log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    return server, thread, f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
def live_server(make_store: Callable[..., BankStore]) -> Iterator[Callable[..., LiveServer]]:
    """Start a real server over a tiny-model store; settings (admin_key, batch_job_threshold...) as keywords."""
    running: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(**settings: object) -> LiveServer:
        store = make_store(**settings)
        server, thread, url = start_server(store)
        running.append((server, thread))
        return LiveServer(url=url, admin_key=store.settings.admin_key, store=store)

    yield start
    for server, thread in running:
        server.should_exit = True
        thread.join(timeout=30)


def test_sync_lifecycle(live_server: Callable[..., LiveServer]) -> None:
    srv = live_server(admin_key=ADMIN)
    with srv.client() as admin, KVRag(srv.url, api_key="") as anonymous:
        assert admin.ready() and admin.health().status == "ok"
        with pytest.raises(AuthenticationError):
            anonymous.banks.list()

        bank = admin.banks.create("notes", eviction="lru")
        assert bank.name == "notes" and bank.model_fingerprint
        with pytest.raises(Conflict):
            admin.banks.create("notes")

        writer_key = admin.keys.create("writer", agent="alice", role="write", banks=["notes"])
        reader_key = admin.keys.create("reader", role="read", banks=["notes"])
        assert writer_key.key and writer_key.key.startswith(writer_key.prefix)
        assert {k.id for k in admin.keys.list()} >= {writer_key.id, reader_key.id}
        assert all(k.key is None for k in admin.keys.list())  # secrets are shown once

        with srv.client(writer_key.key) as alice, srv.client(reader_key.key) as reader:
            # ingest
            first = alice.documents.put("notes", "normans", DOCS["normans"], metadata={"src": "wiki"},
                                        tags=["history"])
            assert first.created and first.document.agent == "alice" and first.document.version == 1
            again = alice.documents.put("notes", "normans", DOCS["normans"], metadata={"src": "wiki"},
                                        tags=["history"])
            assert not again.created and not again.changed
            batch = alice.documents.put_many("notes", [{"id": k, "text": v, "tags": ["misc"]}
                                                       for k, v in DOCS.items() if k != "normans"])
            assert [r.document.doc_id for r in batch] == ["paris", "photosynthesis"]
            assert sorted(d.doc_id for d in reader.documents.list("notes", limit=1)) == sorted(DOCS)

            # search
            hits = reader.search("notes", "Which region is named after the Normans?", k=2)
            assert hits[0].doc_id == "normans" and hits[0].metadata == {"src": "wiki"}
            only_misc = reader.search("notes", "Normandy", k=3, filter={"tags": ["misc"]})
            assert {h.doc_id for h in only_misc} <= {"paris", "photosynthesis"} and only_misc

            # query, both modes and streaming
            for mode in ("kv", "text"):
                result = reader.query("notes", "What is the capital of France?", k=2, mode=mode, max_new_tokens=4)
                assert result.mode == mode and isinstance(result.answer, str)
                assert len(result.sources) == 2 and result.usage.generated_tokens <= 4
                assert result.usage.context_tokens > 0 and result.timings.ttft_ms > 0
            # the query knobs reach the engine: recompute and compaction report what they did
            tuned = reader.query("notes", "What is the capital of France?", k=2, max_new_tokens=2,
                                 retrieval="embedding", recompute=1.0, compaction={"budget_tokens": 12})
            assert tuned.usage.recomputed_tokens > 0 and 0 < tuned.usage.kept_tokens <= 12
            kv_hits = reader.search("notes", "Which region is named after the Normans?", k=2, retrieval="kv")
            assert len(kv_hits) == 2
            stream = reader.query("notes", "What is the capital of France?", k=2, max_new_tokens=4, stream=True)
            events = list(stream)
            assert isinstance(events[-1], DoneEvent) and stream.result is not None
            tokens = [e.text for e in events if isinstance(e, TokenEvent)]
            assert "".join(tokens) == stream.result.answer
            assert len(stream.result.sources) == 2

            # a read key cannot write
            with pytest.raises(PermissionDenied):
                reader.documents.put("notes", "x", "text")

            # update with optimistic concurrency
            updated = alice.documents.put("notes", "paris", "Paris lies on the Seine.", if_match=1)
            assert updated.changed and updated.document.version == 2
            with pytest.raises(VersionMismatch):
                alice.documents.put("notes", "paris", "A stale write.", if_match=1)
            assert reader.documents.get("notes", "paris").text == "Paris lies on the Seine."

            # delete
            alice.documents.delete("notes", "photosynthesis")
            with pytest.raises(NotFound):
                reader.documents.get("notes", "photosynthesis")
            stats = admin.banks.get("notes")
            assert stats.documents == 2 and stats.blocks and stats.stored_bytes

            # revoked keys stop working at once
            admin.keys.delete(reader_key.id)
            with pytest.raises(AuthenticationError):
                reader.banks.list()

        assert admin.banks.update("notes", eviction="importance").eviction == "importance"
        admin.banks.update("notes", max_blocks=1)
        handle = admin.banks.maintain("notes", merge=False)  # a job: the handle comes back at once
        steps: list[tuple[str, int | None, str | None]] = []
        report = handle.wait(poll_interval=0.02, progress=lambda j: steps.append((j.status, j.done, j.step)))
        assert handle.job.status == "succeeded" and steps[-1][0] == "succeeded" and handle.job.kind == "maintenance"
        assert report.bank == "notes" and not report.over_budget and report.merged == 0
        stats = admin.banks.get("notes")
        assert stats.tiers is not None and stats.blocks is not None
        assert (stats.tiers["warm"]["blocks"], stats.tiers["cold"]["blocks"]) == (1, stats.blocks - 1)
        admin.banks.delete("notes")
        with pytest.raises(NotFound):
            admin.banks.get("notes")


def test_async_lifecycle(live_server: Callable[..., LiveServer]) -> None:
    srv = live_server()  # no admin key: loopback, unauthenticated

    async def scenario() -> None:
        async with AsyncKVRag(srv.url) as kv:
            await kv.wait_ready(timeout=10)
            await kv.banks.create("memory")
            put = await kv.documents.put("memory", "normans", DOCS["normans"])
            assert put.created
            await kv.documents.put_many("memory", [{"id": k, "text": v} for k, v in DOCS.items() if k != "normans"])
            assert len([d async for d in kv.documents.list("memory", limit=2)]) == 3
            hits = await kv.search("memory", "light energy and glucose", k=1)
            assert hits[0].doc_id == "photosynthesis"
            for mode in ("kv", "text"):
                result = await kv.query("memory", "Who were the Normans?", k=2, mode=mode, max_new_tokens=3)
                assert result.mode == mode and len(result.sources) == 2
            stream = await kv.query("memory", "Who were the Normans?", k=1, max_new_tokens=3, stream=True)
            events = [e async for e in stream]
            assert isinstance(events[-1], DoneEvent) and stream.result is not None
            updated = await kv.documents.put("memory", "normans", "The Normans came from Normandy.", if_match=1)
            assert updated.document.version == 2
            await kv.documents.delete("memory", "normans", if_match=2)
            with pytest.raises(NotFound):
                await kv.documents.get("memory", "normans")
            assert [b.name for b in await kv.banks.list()] == ["memory"]
            handle = await kv.banks.maintain("memory", rebuild=True)
            report = await handle.wait(poll_interval=0.02)
            assert report.bank == "memory" and report.verify is not None and report.evicted == 0
            await kv.banks.delete("memory")

    asyncio.run(scenario())


def test_large_batch_becomes_a_job_the_sdk_waits_for(live_server: Callable[..., LiveServer]) -> None:
    srv = live_server(batch_job_threshold=2)
    with srv.client() as kv:
        kv.banks.create("big")
        docs = [{"id": f"doc-{i}", "text": f"Document number {i} is about topic {i % 3}."} for i in range(5)]
        results = kv.documents.put_many("big", docs, poll_interval=0.05)
        assert [r.document.doc_id for r in results] == [d["id"] for d in docs]
        assert kv.banks.get("big").documents == 5
