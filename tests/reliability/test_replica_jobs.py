"""A replica killed while it runs a job: another replica on the same PostgreSQL resumes the job once its lease
expires, and it ends ``succeeded`` with every document written once (issue 28; jobs are claimed with
``FOR UPDATE SKIP LOCKED``, kvstore/storage/jobs.py). Real server processes, PostgreSQL and SeaweedFS."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, select

from kvstore.storage.catalog import JobRow
from tests.reliability.procs import ForkServer, ServerLife
from tests.reliability.test_jobs_crash import DOCS, _poll, _resumed_to_the_end

pytestmark = pytest.mark.postgres

LEASE_S = 2.0


def _runner_pid(database_url: str, job_id: str) -> int:
    """The pid of the replica holding the job's lease (lease_owner is host:pid:nonce)."""
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            owner = conn.execute(select(JobRow.lease_owner).where(JobRow.id == job_id)).scalar()
    finally:
        engine.dispose()
    assert owner, "the running job names no lease owner"
    return int(owner.split(":")[-2])


def test_a_killed_replicas_job_is_resumed_by_another(fork_server: ForkServer, postgres_url: str, s3_bucket: str,
                                                     s3_env: dict[str, str], tmp_path: Path) -> None:
    lives: list[ServerLife] = []
    try:
        for i in range(2):
            lives.append(fork_server.start(tmp_path / f"replica-{i}", postgres_url, env=s3_env,
                                           blob_url=f"s3://{s3_bucket}/kv", batch_job_threshold=4,
                                           job_lease_s=LEASE_S, replica_staleness_s=1.0))
        with lives[0].client() as c:
            assert c.post("/v1/banks", json={"name": "team"}).status_code == 201
            docs = [{"id": f"d{i:03d}", "text": f"Note {i}: the Normans gave their name to Normandy in France. " * 2}
                    for i in range(DOCS)]
            r = c.post("/v1/banks/team/documents", json={"documents": docs})
            assert r.status_code == 202, r.text
            job_id: str = r.json()["job_id"]
            _poll(c, job_id, lambda j: j["status"] == "running" and 3 <= j["done"] < DOCS, 60.0)
        pid = _runner_pid(postgres_url, job_id)
        runner = next(life for life in lives if life.pid == pid)
        survivor = next(life for life in lives if life.pid != pid)
        runner.kill()  # SIGKILL: no hand-back, the lease just stops being renewed

        time.sleep(LEASE_S)
        job = _resumed_to_the_end(survivor, "team", job_id)
        assert job["attempts"] == 2  # the same job resumed, not a new one
        assert "stopped renewing their lease" in survivor.log_text()  # the survivor's sweep took it back
    finally:
        for life in lives:
            if life.alive():
                life.kill()
