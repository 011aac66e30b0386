"""openai-python habits in the SDK, against a real server: ``timeout=`` per call, ``with_options()``,
``with_raw_response``, typed bank options, job progress and job listing; and the one-source check of the
generated synchronous client."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kvrag_client import APITimeoutError, AsyncKVRag, Job, KVRag, MaintenanceReport, RawResponse
from pydantic import ValidationError as PydanticValidationError

from kvstore.bank import BankStore
from tests.client.live import Live, live, running  # noqa: F401 - the fixture, by name

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def silent() -> Iterator[str]:
    """A server that accepts connections and never answers: only a timeout ends a request to it."""
    listener = socket.create_server(("127.0.0.1", 0))
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    listener.close()


def test_timeout_per_call_and_with_options(silent: str, live: Live) -> None:  # noqa: F811
    with KVRag(silent, timeout=300, max_retries=0) as kv:
        with pytest.raises(APITimeoutError):
            kv.banks.list(timeout=0.3)  # the call's timeout, not the client's 300 s
        quick = kv.with_options(timeout=0.3)
        assert quick.timeout.read == 0.3 and kv.timeout.read == 300 and quick.max_retries == 0
        with pytest.raises(APITimeoutError):
            quick.health()
    with KVRag(live.url) as kv:
        tagged = kv.with_options(headers={"X-Request-ID": "trace-42"}, max_retries=5)
        assert tagged.max_retries == 5 and kv.max_retries == 3
        raw = tagged.with_raw_response.health()
        assert raw.headers["x-request-id"] == "trace-42" and raw.request_id == "trace-42"
        tagged.close()  # shares the pool; the original still works
        assert kv.health().status == "ok"


def test_raw_responses(live: Live) -> None:  # noqa: F811
    with KVRag(live.url) as kv:
        created = kv.with_raw_response.banks.create("notes", eviction="hybrid", budget_bytes=1 << 20)
        assert isinstance(created, RawResponse) and created.status_code == 201
        assert created.parsed.eviction == "hybrid" and created.parse().budget_bytes == 1 << 20
        put = kv.with_raw_response.documents.put("notes", "a", "The Normans gave their name to Normandy.")
        assert put.status_code == 201 and put.headers["etag"] == '"1"'
        got = kv.with_raw_response.documents.get("notes", "a")
        assert got.status_code == 200 and got.parsed.text and got.headers["etag"] == '"1"' and got.request_id
        deleted = kv.with_raw_response.documents.delete("notes", "a")
        assert deleted.status_code == 204 and deleted.parsed is None
        hits = kv.with_raw_response.search("notes", "Normandy", k=1)
        assert hits.status_code == 200 and hits.parsed == []

    async def main() -> None:
        async with AsyncKVRag(live.url) as kv:
            raw = await kv.with_raw_response.banks.get("notes")
            assert raw.status_code == 200 and raw.parsed.name == "notes"

    asyncio.run(main())


def test_bank_options_are_typed(live: Live) -> None:  # noqa: F811
    with KVRag(live.url) as kv:
        with pytest.raises(TypeError):
            kv.banks.create("notes", eviktion="lru")  # type: ignore[call-arg]
        with pytest.raises(PydanticValidationError):
            kv.banks.create("notes", eviction="newest")  # type: ignore[arg-type]
        bank = kv.banks.create("notes", codec="int8", max_blocks=4, context_map_budget_tokens=64)
        assert (bank.codec, bank.max_blocks, bank.context_map_budget_tokens) == ("int8", 4, 64)
        updated = kv.banks.update("notes", max_blocks=8)
        assert updated.max_blocks == 8 and updated.codec == "int8"  # untouched settings are not sent
        handle = kv.banks.maintain("notes", merge=False, rebuild=True)  # a job by design: wait gives the report
        report = handle.wait(poll_interval=0.05, timeout=60)
        assert handle.job.kind == "maintenance" and handle.job.status == "succeeded"
        assert isinstance(report, MaintenanceReport) and report.bank == "notes" and report.verify is not None


def test_job_progress_and_listing(make_store: Callable[..., BankStore]) -> None:
    with running(make_store(batch_job_threshold=2)) as server, KVRag(server.url) as kv:
        kv.banks.create("big")
        seen: list[Job] = []
        docs = [{"id": f"d{i}", "text": f"Document number {i} is about topic {i}."} for i in range(5)]
        results = kv.documents.put_many("big", docs, poll_interval=0.02, on_progress=seen.append)
        assert len(results) == 5 and all(r.created for r in results)
        assert seen and seen[-1].status == "succeeded" and seen[-1].done == seen[-1].total == 5
        assert [j.done for j in seen] == sorted(j.done or 0 for j in seen)  # progress only moves forward
        second = kv.documents.put_many("big", docs[:3], poll_interval=0.02)
        assert [r.created for r in second] == [False, False, False]
        jobs = list(kv.jobs.list("big", limit=1))  # one per page: the cursor is followed
        assert len(jobs) == 2 and jobs[0].total == 3 and jobs[1].total == 5  # newest first
        assert jobs[0].created_at is not None
        final = kv.jobs.wait(jobs[1].id, on_progress=seen.append)
        assert final.status == "succeeded" and seen[-1].id == jobs[1].id


def test_generated_sync_client_is_current() -> None:
    """The synchronous client is written from the async source; a stale generated file fails here."""
    script = ROOT / "client" / "scripts" / "unasync.py"
    check = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
