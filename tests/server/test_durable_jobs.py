"""Durable jobs over HTTP on a real server: the job contract, cancelling, the per-key cap (429), retention,
jobs of a deleted bank, and scope (a key only sees and cancels jobs of its banks)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.server_harness import LiveServer, live_server, make_key, wait_job

CAP = 3


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, tiny_llm, embedder) -> Iterator[LiveServer]:
    with live_server("sqlite", tmp_path_factory.mktemp("jobs"), tiny_llm, embedder, batch_job_threshold=2,
                     jobs_per_key=CAP, job_poll_s=0.05) as server:
        yield server


def _docs(prefix: str, n: int) -> list[dict[str, Any]]:
    return [{"id": f"{prefix}-{i}", "text": f"Note {i} of {prefix}: the Normans came from Normandy in France. " * 3}
            for i in range(n)]


def _batch(c: httpx.Client, bank: str, prefix: str, n: int) -> str:
    r = c.post(f"/v1/banks/{bank}/documents", json={"documents": _docs(prefix, n)})
    assert r.status_code == 202, r.text
    assert r.headers["location"] == f"/v1/jobs/{r.json()['job_id']}"
    return r.json()["job_id"]


def _until(c: httpx.Client, job_id: str, check: Any, timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = c.get(f"/v1/jobs/{job_id}").json()
        if check(job):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.01)


def test_maintenance_is_a_job_with_steps_and_the_report_as_result(live: LiveServer) -> None:
    with live.admin() as c:
        assert c.post("/v1/banks", json={"name": "steps"}).status_code == 201
        assert c.put("/v1/banks/steps/documents/a", json={"text": "The Seine flows through Paris."}).status_code == 201
        r = c.post("/v1/banks/steps/maintenance", json={"merge": False, "rebuild": True})
        assert r.status_code == 202 and r.json()["status"] == "queued", r.text
        job = wait_job(c, r.json()["job_id"])
        assert job["status"] == "succeeded" and job["kind"] == "maintenance" and job["bank"] == "steps"
        # expire, idempotency, reencode, evict, gc, rebuild
        assert (job["done"], job["total"], job["attempts"]) == (6, 6, 1)
        assert job["result"]["bank"] == "steps" and job["result"]["verify"] == {"checked": 1, "rebuilt": 0}
        assert job["started_at"] and job["finished_at"] and job["error"] is None
        listed = c.get("/v1/banks/steps/jobs").json()["jobs"]
        assert [j["id"] for j in listed] == [job["id"]]


def test_cancel_a_running_and_a_queued_job(live: LiveServer) -> None:
    with live.admin() as c:
        assert c.post("/v1/banks", json={"name": "cancel"}).status_code == 201
        running = _batch(c, "cancel", "run", 200)
        queued = _batch(c, "cancel", "queued", 3)  # the runner takes one job at a time: this one waits
        _until(c, running, lambda j: j["status"] == "running" and j["done"] >= 1)
        r = c.post(f"/v1/jobs/{queued}/cancel")
        assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
        r = c.post(f"/v1/jobs/{running}/cancel")
        assert r.status_code == 200 and r.json()["cancel_requested"] is True, r.text
        stopped = wait_job(c, running)
        assert stopped["status"] == "cancelled" and stopped["done"] < 200, stopped
        assert 0 < len(stopped["result"]["results"]) < 200  # what it wrote before stopping is reported
        again = c.post(f"/v1/jobs/{running}/cancel")
        assert again.status_code == 200 and again.json()["status"] == "cancelled"  # cancelling twice: same answer
        time.sleep(0.3)
        assert c.get(f"/v1/jobs/{queued}").json()["status"] == "cancelled"  # never ran
        docs = c.get("/v1/banks/cancel/documents", params={"limit": 1000}).json()["documents"]
        assert not any(d["doc_id"].startswith("queued-") for d in docs)
        assert len(docs) <= 200
        done = c.post("/v1/banks/cancel/maintenance", json={"merge": False})
        finished = wait_job(c, done.json()["job_id"])
        r = c.post(f"/v1/jobs/{finished['id']}/cancel")
        assert r.status_code == 409 and r.json()["code"] == "conflict"
        assert c.post(f"/v1/jobs/{'f' * 32}/cancel").status_code == 404


def test_jobs_per_key_are_capped_with_429(live: LiveServer) -> None:
    with live.admin() as c:
        assert c.post("/v1/banks", json={"name": "capped"}).status_code == 201
    writer = make_key(live, role="write", banks=["capped"], name="capped-writer")["key"]
    other = make_key(live, role="write", banks=["capped"], name="capped-other")["key"]
    with live.client(writer) as w:
        ids = [_batch(w, "capped", "first", 200)]
        ids += [_batch(w, "capped", f"more{i}", 3) for i in range(CAP - 1)]
        refused = w.post("/v1/banks/capped/documents", json={"documents": _docs("over", 3)})
        assert refused.status_code == 429 and refused.json()["code"] == "rate_limited", refused.text
        assert "retry-after" in refused.headers
        maint = w.post("/v1/banks/capped/maintenance", json={})
        assert maint.status_code == 429  # maintenance counts against the same cap
        with live.client(other) as o:  # the cap is per key: another key still gets its job
            assert o.post("/v1/banks/capped/maintenance", json={"merge": False}).status_code == 202
        for job_id in ids:
            w.post(f"/v1/jobs/{job_id}/cancel")
        for job_id in ids:
            assert wait_job(w, job_id)["status"] == "cancelled"
        assert w.post("/v1/banks/capped/maintenance", json={"merge": False}).status_code == 202  # room again
    with live.store.session() as s:
        from sqlalchemy import select

        from kvstore.storage.catalog import JobRow
        rows = s.scalars(select(JobRow).where(JobRow.bank == "capped", JobRow.status == "cancelled")).all()
        assert rows and all(r.input is None for r in rows)  # a finished job keeps no input


def test_finished_jobs_are_purged_after_retention(tmp_path: Path, tiny_llm, embedder) -> None:
    with live_server("sqlite", tmp_path, tiny_llm, embedder, job_poll_s=0.05, job_retention_s=1.0) as live, \
            live.admin() as c:
        assert c.post("/v1/banks", json={"name": "purge"}).status_code == 201
        job = wait_job(c, c.post("/v1/banks/purge/maintenance", json={"merge": False}).json()["job_id"])
        assert job["status"] == "succeeded"
        assert c.get(f"/v1/jobs/{job['id']}").status_code == 200
        deadline = time.monotonic() + 30
        while c.get(f"/v1/jobs/{job['id']}").status_code == 200:
            assert time.monotonic() < deadline, "a finished job outlived its retention"
            time.sleep(0.1)
        assert c.get(f"/v1/jobs/{job['id']}").json()["code"] == "not_found"
        assert c.get("/v1/banks/purge/jobs").json()["jobs"] == []


def test_jobs_of_a_deleted_bank_are_cancelled(live: LiveServer) -> None:
    with live.admin() as c:
        for name in ("busy", "doomed"):
            assert c.post("/v1/banks", json={"name": name}).status_code == 201
        blocker = _batch(c, "busy", "block", 200)
        _until(c, blocker, lambda j: j["status"] == "running")
        doomed = _batch(c, "doomed", "late", 3)  # queued behind the blocker
        assert c.delete("/v1/banks/doomed").status_code == 204
        assert c.get(f"/v1/jobs/{doomed}").json()["status"] == "cancelled"
        assert c.post("/v1/banks", json={"name": "doomed"}).status_code == 201  # a new bank of the same name
        c.post(f"/v1/jobs/{blocker}/cancel")
        wait_job(c, blocker)
        time.sleep(0.3)
        assert c.get("/v1/banks/doomed/documents").json()["documents"] == []  # the old job never ran on it


def test_a_key_sees_and_cancels_only_jobs_of_its_banks(live: LiveServer) -> None:
    with live.admin() as c:
        for name in ("mine", "theirs"):
            assert c.post("/v1/banks", json={"name": name}).status_code == 201
        blocker = _batch(c, "theirs", "block", 200)
        _until(c, blocker, lambda j: j["status"] == "running")
    reader = make_key(live, role="read", banks=["mine", "theirs"], name="reader")["key"]
    outsider = make_key(live, role="write", banks=["mine"], name="outsider")["key"]
    with live.client(outsider) as o:
        assert o.get(f"/v1/jobs/{blocker}").status_code == 404
        r = o.post(f"/v1/jobs/{blocker}/cancel")
        assert r.status_code == 404 and r.json()["code"] == "not_found"
    with live.client(reader) as rd:
        assert rd.get(f"/v1/jobs/{blocker}").status_code == 200
        assert rd.post(f"/v1/jobs/{blocker}/cancel").status_code == 403
    with live.admin() as c:
        assert c.get(f"/v1/jobs/{blocker}").json()["cancel_requested"] is False  # refusals changed nothing
        c.post(f"/v1/jobs/{blocker}/cancel")
        assert wait_job(c, blocker)["status"] == "cancelled"


def test_the_sdk_maintenance_handle_waits_with_progress_and_cancels(live: LiveServer) -> None:
    from kvrag_client import JobCancelled, KVRag

    with live.admin() as c:
        assert c.post("/v1/banks", json={"name": "sdk"}).status_code == 201
    with KVRag(live.url, api_key=live.settings.admin_key) as kv:
        kv.documents.put("sdk", "a", "The Seine flows through Paris.")
        handle = kv.banks.maintain("sdk", merge=False)
        seen: list[tuple[str, int | None, str | None]] = []
        report = handle.wait(poll_interval=0.02, progress=lambda j: seen.append((j.status, j.done, j.step)))
        assert report.bank == "sdk" and handle.job.status == "succeeded" and seen[-1][:2] == ("succeeded", 5)
        assert [j.id for j in kv.jobs.list("sdk")] == [handle.id]
        with live.admin() as c:
            blocker = _batch(c, "sdk", "block", 200)
            _until(c, blocker, lambda j: j["status"] == "running")
        queued = kv.banks.maintain("sdk")  # waits behind the blocker
        assert queued.cancel().status == "cancelled"
        with pytest.raises(JobCancelled):
            queued.wait(poll_interval=0.02)
        assert kv.jobs.cancel(blocker).cancel_requested
        assert kv.jobs.wait(blocker, poll_interval=0.05).status == "cancelled"
