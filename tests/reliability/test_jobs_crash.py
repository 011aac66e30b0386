"""Accepted work survives the server (issue 26, hole 9): a 202-accepted job interrupted by SIGTERM or kill -9
is resumed by the next start and ends ``succeeded``, never left ``running``. Real server processes (the fork
server), real SQLite catalog on disk."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import httpx

from tests.reliability.procs import ForkServer, ServerLife

DOCS = 120
LEASE_S = 2.0  # short, so a killed server's job is resumed within seconds


def _start_batch(life: ServerLife, bank: str) -> str:
    with life.client() as c:
        assert c.post("/v1/banks", json={"name": bank}).status_code == 201
        docs = [{"id": f"d{i:03d}", "text": f"Note {i}: the Normans gave their name to Normandy in France. " * 2}
                for i in range(DOCS)]
        r = c.post(f"/v1/banks/{bank}/documents", json={"documents": docs})
        assert r.status_code == 202, r.text
        job_id: str = r.json()["job_id"]
        _poll(c, job_id, lambda j: j["status"] == "running" and 3 <= j["done"] < DOCS, 60.0)
    return job_id


def _poll(c: httpx.Client, job_id: str, check: Any, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = c.get(f"/v1/jobs/{job_id}").json()
        if check(job):
            return job
        assert time.monotonic() < deadline, f"job never got there: {job}"
        time.sleep(0.02)


def _resumed_to_the_end(life: ServerLife, bank: str, job_id: str) -> dict[str, Any]:
    with life.client() as c:
        job = _poll(c, job_id, lambda j: j["status"] not in ("queued", "running"), 90.0)
        assert job["status"] == "succeeded", job
        assert job["done"] == job["total"] == DOCS and len(job["result"]["results"]) == DOCS
        docs = c.get(f"/v1/banks/{bank}/documents", params={"limit": 1000}).json()["documents"]
        assert sorted(d["doc_id"] for d in docs) == [f"d{i:03d}" for i in range(DOCS)]
        assert all(d["version"] == 1 for d in docs)  # a document written twice across the stop is one version
    return job


def test_sigterm_during_a_job_then_restart_resumes_it_to_succeeded(fork_server: ForkServer, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    life = fork_server.start(data_dir, batch_job_threshold=4, job_lease_s=LEASE_S)
    job_id = _start_batch(life, "term")
    life.signal(signal.SIGTERM)
    life.wait_dead()
    stopped_log = life.log_text()

    life = fork_server.start(data_dir, batch_job_threshold=4, job_lease_s=LEASE_S)
    try:
        job = _resumed_to_the_end(life, "term", job_id)
        assert job["attempts"] == 2  # resumed, not restarted from scratch under a new id
        assert "handed back to the queue" in stopped_log  # at SIGTERM, not by a lease expiry
        assert "stopped renewing their lease" not in life.log_text()
    finally:
        life.signal(signal.SIGTERM)
        life.wait_dead()


def test_kill_9_during_a_job_lease_expiry_resumes_it(fork_server: ForkServer, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    life = fork_server.start(data_dir, batch_job_threshold=4, job_lease_s=LEASE_S)
    job_id = _start_batch(life, "killed")
    life.kill()

    life = fork_server.start(data_dir, batch_job_threshold=4, job_lease_s=LEASE_S)
    try:
        job = _resumed_to_the_end(life, "killed", job_id)
        assert job["attempts"] == 2
        assert "stopped renewing their lease" in life.log_text()
    finally:
        life.signal(signal.SIGTERM)
        life.wait_dead()
