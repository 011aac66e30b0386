"""The durable job queue (kvstore.storage.jobs) on a real catalog: claims, leases, fencing, sweeping, retention; on
PostgreSQL two runners never take the same job and never wait on each other's locks (SKIP LOCKED)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, text, update
from sqlalchemy.orm import Session, sessionmaker

from kvstore.errors import Conflict, RateLimited
from kvstore.storage import jobs
from kvstore.storage.catalog import JobRow, make_engine, open_catalog, utcnow

KINDS = ("ingest", "maintenance")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def catalog_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "postgres":
        yield request.getfixturevalue("postgres_url")
    else:
        yield f"sqlite:///{tmp_path / 'catalog.sqlite3'}"


def _sessions(url: str, migrate: bool = False) -> sessionmaker[Session]:
    return open_catalog(url, migrate=migrate)


def _enqueue(sessions: sessionmaker[Session], n: int, owner: str = "k1", bank: str = "b") -> list[str]:
    return [jobs.enqueue(sessions, kind="maintenance", bank=bank, input={"options": {"n": i}}, total=1, owner=owner,
                         max_active=10_000).id for i in range(n)]


def test_claim_lease_checkpoint_finish(catalog_url: str) -> None:
    sessions = _sessions(catalog_url, migrate=True)
    [job_id] = _enqueue(sessions, 1)
    claimed = jobs.claim(sessions, "runner-a", 30.0, KINDS)
    assert claimed is not None and claimed.id == job_id and claimed.input == {"options": {"n": 0}}
    assert claimed.attempts == 1 and jobs.claim(sessions, "runner-b", 30.0, KINDS) is None  # nothing else queued
    assert jobs.checkpoint(sessions, job_id, "runner-a", done=1, step="gc", state={"done": 1}) == (True, False)
    assert jobs.renew(sessions, job_id, "runner-a", 30.0) == (True, False)
    info = jobs.get_job(sessions, job_id)
    assert (info.status, info.done, info.step) == ("running", 1, "gc")
    assert jobs.finish(sessions, job_id, "runner-a", "succeeded", result={"ok": True})
    info = jobs.get_job(sessions, job_id)
    assert info.status == "succeeded" and info.result == {"ok": True} and info.finished_at is not None
    with sessions() as s:
        row = s.get(JobRow, job_id)
        assert row is not None and row.input is None and row.state is None and row.lease_owner is None


def test_an_expired_lease_is_resumed_and_the_old_runner_is_fenced_off(catalog_url: str) -> None:
    sessions = _sessions(catalog_url, migrate=True)
    [job_id] = _enqueue(sessions, 1)
    assert jobs.claim(sessions, "dead", 1.0, KINDS) is not None
    assert jobs.checkpoint(sessions, job_id, "dead", done=3, state={"done": 3}) == (True, False)
    assert jobs.recover_expired(sessions, max_attempts=3) == {"resumed": 0, "failed": 0, "cancelled": 0}  # still held
    time.sleep(1.1)
    assert jobs.recover_expired(sessions, max_attempts=3) == {"resumed": 1, "failed": 0, "cancelled": 0}
    again = jobs.claim(sessions, "alive", 30.0, KINDS)
    assert again is not None and again.attempts == 2 and again.state == {"done": 3} and again.done == 3
    # The first runner wakes up: nothing it writes lands, and it learns it lost the job.
    assert jobs.checkpoint(sessions, job_id, "dead", done=9) == (False, False)
    assert not jobs.finish(sessions, job_id, "dead", "failed", error="late")
    assert jobs.renew(sessions, job_id, "dead", 30.0) == (False, False)
    assert jobs.finish(sessions, job_id, "alive", "succeeded", result={})
    assert jobs.get_job(sessions, job_id).status == "succeeded"


def test_a_job_whose_server_keeps_dying_fails_with_the_reason(catalog_url: str) -> None:
    sessions = _sessions(catalog_url, migrate=True)
    [job_id] = _enqueue(sessions, 1)
    for _ in range(2):
        assert jobs.claim(sessions, "crashy", 0.01, KINDS) is not None
        time.sleep(0.05)
        jobs.recover_expired(sessions, max_attempts=2)
    info = jobs.get_job(sessions, job_id)
    assert info.status == "failed" and info.attempts == 2 and "lease expired" in (info.error or "")


def test_cancel_of_a_running_job_whose_server_died_ends_cancelled(catalog_url: str) -> None:
    sessions = _sessions(catalog_url, migrate=True)
    [job_id] = _enqueue(sessions, 1)
    assert jobs.claim(sessions, "dead", 0.05, KINDS) is not None
    assert jobs.request_cancel(sessions, job_id).cancel_requested
    assert jobs.renew(sessions, job_id, "dead", 0.05) == (True, True)  # a live runner would see the request
    time.sleep(0.1)
    assert jobs.recover_expired(sessions, max_attempts=3)["cancelled"] == 1
    assert jobs.get_job(sessions, job_id).status == "cancelled"
    [done_id] = _enqueue(sessions, 1)
    claimed = jobs.claim(sessions, "r", 30.0, KINDS)
    assert claimed is not None and jobs.finish(sessions, done_id, "r", "succeeded", result={})
    with pytest.raises(Conflict):
        jobs.request_cancel(sessions, done_id)  # a finished job stays as it finished
    assert jobs.get_job(sessions, done_id).status == "succeeded"


def test_cap_per_owner_and_retention(catalog_url: str) -> None:
    sessions = _sessions(catalog_url, migrate=True)
    for _ in range(2):
        jobs.enqueue(sessions, kind="ingest", bank="b", input={}, total=1, owner="k1", max_active=2)
    with pytest.raises(RateLimited):
        jobs.enqueue(sessions, kind="ingest", bank="b", input={}, total=1, owner="k1", max_active=2)
    jobs.enqueue(sessions, kind="ingest", bank="b", input={}, total=1, owner="k2", max_active=2)  # another key
    claimed = jobs.claim(sessions, "r", 30.0, KINDS)
    assert claimed is not None and jobs.finish(sessions, claimed.id, "r", "succeeded", result={})
    jobs.enqueue(sessions, kind="ingest", bank="b", input={}, total=1, owner="k1", max_active=2)  # room again
    assert jobs.purge_finished(sessions, retention_s=3600) == 0
    with sessions() as s:
        s.execute(update(JobRow).where(JobRow.id == claimed.id).values(finished_at=utcnow() - timedelta(hours=2)))
        s.commit()
    assert jobs.purge_finished(sessions, retention_s=3600) == 1
    assert len(jobs.list_jobs(sessions, "b")[0]) == 3  # the unfinished ones stay, whatever their age


@pytest.mark.postgres
def test_two_runners_on_one_postgresql_never_run_the_same_job(postgres_url: str) -> None:
    setup = _sessions(postgres_url, migrate=True)
    queued = set(_enqueue(setup, 60))
    ran: dict[str, list[str]] = {"a": [], "b": []}

    def runner(name: str) -> None:
        sessions = _sessions(postgres_url)  # its own engine and connections, as another replica
        while (claimed := jobs.claim(sessions, name, 30.0, KINDS)) is not None:
            ran[name].append(claimed.id)
            time.sleep(0.002)
            assert jobs.finish(sessions, claimed.id, name, "succeeded", result={"by": name})
        sessions.kw["bind"].dispose()

    threads = [threading.Thread(target=runner, args=(name,)) for name in ran]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    a, b = set(ran["a"]), set(ran["b"])
    assert not a & b and a | b == queued and len(ran["a"]) + len(ran["b"]) == len(queued)
    assert ran["a"] and ran["b"]  # both took part
    for job_id in queued:
        info = jobs.get_job(setup, job_id)
        assert info.status == "succeeded" and info.attempts == 1


@pytest.mark.postgres
def test_a_claim_skips_a_row_another_replica_has_locked(postgres_url: str) -> None:
    sessions = _sessions(postgres_url, migrate=True)
    first, second = _enqueue(sessions, 2)
    engine = make_engine(postgres_url)
    with engine.connect() as holder:  # another replica, mid-claim, holding the oldest job's row lock
        holder.execute(text("BEGIN"))
        locked = holder.execute(select(JobRow.id).where(JobRow.id == first).with_for_update()).scalar_one()
        assert locked == first
        started = time.monotonic()
        claimed = jobs.claim(sessions, "other", 30.0, KINDS)
        assert claimed is not None and claimed.id == second  # skipped, not waited for
        assert time.monotonic() - started < 2.0
        holder.execute(text("ROLLBACK"))
    engine.dispose()
    again = jobs.claim(sessions, "other", 30.0, KINDS)
    assert again is not None and again.id == first


def test_the_migration_fails_jobs_the_old_runner_left_in_limbo(tmp_path: Path) -> None:
    from alembic import command
    from alembic.config import Config

    url = f"sqlite:///{tmp_path / 'old.sqlite3'}"
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).resolve().parents[3] / "migrations"))
    cfg.set_main_option("sqlalchemy.url", url)
    command.upgrade(cfg, "0008")
    engine = make_engine(url)
    with engine.begin() as conn:
        for job_id, status in (("a" * 32, "running"), ("b" * 32, "queued"), ("c" * 32, "succeeded")):
            conn.execute(text("INSERT INTO jobs (id, kind, bank, status, total, done, result, created_at, updated_at)"
                              " VALUES (:id, 'ingest', 'b', :status, 5, 2, '{}', '2026-01-01 00:00:00',"
                              " '2026-01-01 00:00:00')"), {"id": job_id, "status": status})
    engine.dispose()
    command.upgrade(cfg, "head")
    sessions = _sessions(url)
    assert [jobs.get_job(sessions, c * 32).status for c in "abc"] == ["failed", "failed", "succeeded"]
    assert "input was not kept" in (jobs.get_job(sessions, "a" * 32).error or "")
    assert jobs.claim(sessions, "r", 30.0, KINDS) is None  # nothing left to run, nothing in limbo
