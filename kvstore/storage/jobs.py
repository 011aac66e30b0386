"""Durable jobs in the catalog: long work (large batch ingests, maintenance) queued with its input, claimed by
any server, resumed after a crash.

A job's life: ``enqueue`` stores it ``queued`` with its input (before the 202 is sent, so accepted work is never
only in memory). A runner ``claim``s it (PostgreSQL: ``SELECT ... FOR UPDATE SKIP LOCKED``, so replicas never
take the same job and never wait on each other; SQLite: one writer at a time) and holds a *lease* it renews
while working; every write a runner makes is fenced on that lease, so a runner that lost it cannot overwrite
anything. A lease that expires (its server died) is swept by ``recover_expired``: the job goes back to
``queued`` and resumes from its checkpoint (``state``), or fails with the reason once it has been started
``max_attempts`` times, or ends ``cancelled`` when a cancel was asked for meanwhile. No job stays ``running``
without a live owner. Finished jobs drop their input and are purged after the retention period.
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from kvstore.errors import Conflict, NotFound, RateLimited
from kvstore.storage.catalog import JobRow, utcnow

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
ACTIVE = ("queued", "running")
FINISHED = ("succeeded", "failed", "cancelled")

# SQLite has one writer per database and no advisory locks: the per-key cap's count-then-insert is made atomic
# within the process (SQLite catalogs are single-process); PostgreSQL uses a transaction-scoped advisory lock.
_sqlite_cap_lock = threading.Lock()


@dataclass
class JobInfo:
    """What a job shows (its input, resume state and lease stay inside)."""

    id: str
    kind: str
    bank: str
    status: str
    total: int
    done: int
    result: dict[str, Any]
    error: str | None
    step: str | None = None
    attempts: int = 0
    cancel_requested: bool = False
    created_at: datetime | None = None
    updated_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None


@dataclass
class ClaimedJob:
    """A job a runner holds the lease of: what it needs to run (or resume) it."""

    id: str
    kind: str
    bank: str
    owner: str | None
    input: dict[str, Any]
    state: dict[str, Any] = field(default_factory=dict)
    total: int = 0
    done: int = 0
    attempts: int = 1


def _info(row: JobRow) -> JobInfo:
    return JobInfo(id=row.id, kind=row.kind, bank=row.bank, status=row.status, total=row.total, done=row.done,
                   result=dict(row.result or {}), error=row.error, step=row.step, attempts=row.attempts or 0,
                   cancel_requested=bool(row.cancel_requested), created_at=row.created_at,
                   updated_at=row.updated_at, started_at=row.started_at, finished_at=row.finished_at)


def _changed(s: Session, statement: Any) -> int:
    """Rows an UPDATE or DELETE changed (its session is not synchronized: callers read rows afresh)."""
    result: Any = s.execute(statement.execution_options(synchronize_session=False))
    return int(result.rowcount or 0)


def _is_postgres(s: Session) -> bool:
    return s.get_bind().dialect.name == "postgresql"


def enqueue(sessions: sessionmaker[Session], *, kind: str, bank: str, input: dict[str, Any], total: int,
            owner: str | None, max_active: int) -> JobInfo:
    """Store a new queued job with its input; ``RateLimited`` when ``owner`` already has ``max_active`` jobs
    queued or running (the count and the insert are one atomic step, so concurrent requests cannot overshoot)."""
    now = utcnow()
    row = JobRow(id=uuid.uuid4().hex, kind=kind, bank=bank, status="queued", total=total, done=0, result={},
                 error=None, created_at=now, updated_at=now, input=input, state={}, owner=owner, attempts=0,
                 cancel_requested=False)
    with sessions() as s:
        postgres = _is_postgres(s)
        if postgres:
            s.execute(select(func.pg_advisory_xact_lock(func.hashtext(f"kvrag-jobs:{owner}"))))
        elif not _sqlite_cap_lock.acquire(timeout=30):
            raise RateLimited("too many jobs are being created at once; retry shortly")
        try:
            active = s.scalar(select(func.count()).select_from(JobRow).where(
                JobRow.owner == owner, JobRow.status.in_(ACTIVE))) or 0
            if active >= max_active:
                raise RateLimited(f"this key already has {active} jobs queued or running (at most {max_active}); "
                                  "wait for one to finish or cancel one")
            s.add(row)
            s.commit()
        finally:
            if not postgres:
                _sqlite_cap_lock.release()
        return _info(row)


def get_job(sessions: sessionmaker[Session], job_id: str) -> JobInfo:
    """A job by id, or NotFound."""
    with sessions() as s:
        row = s.get(JobRow, job_id)
        if row is None:
            raise NotFound(f"job {job_id!r} not found")
        return _info(row)


def list_jobs(sessions: sessionmaker[Session], bank: str, *, cursor: str | None = None,
              limit: int = 50) -> tuple[list[JobInfo], str | None]:
    """A bank's jobs, newest first, a page at a time; the cursor is the last job's id (keyset paging on
    created_at then id, so jobs started meanwhile never shift a page). An unknown cursor is NotFound."""
    with sessions() as s:
        q = select(JobRow).where(JobRow.bank == bank)
        if cursor is not None:
            after = s.get(JobRow, cursor)
            if after is None or after.bank != bank:
                raise NotFound(f"job {cursor!r} not found")
            q = q.where(or_(JobRow.created_at < after.created_at,
                            and_(JobRow.created_at == after.created_at, JobRow.id < after.id)))
        rows = list(s.scalars(q.order_by(JobRow.created_at.desc(), JobRow.id.desc()).limit(limit + 1)))
        page = [_info(r) for r in rows[:limit]]
        return page, page[-1].id if len(rows) > limit else None


# -- the runner's side ------------------------------------------------------------------------------


def claim(sessions: sessionmaker[Session], runner: str, lease_s: float, kinds: tuple[str, ...]) -> ClaimedJob | None:
    """Take the oldest queued job of one of ``kinds`` and its lease, or None. The row is locked with SKIP LOCKED
    (PostgreSQL), and the update is a compare-and-set on (status, attempts), so even without row locks (SQLite)
    two runners can never both win it."""
    with sessions() as s:
        row = s.scalars(select(JobRow).where(JobRow.status == "queued", JobRow.kind.in_(kinds))
                        .order_by(JobRow.created_at, JobRow.id).limit(1)
                        .with_for_update(skip_locked=True)).first()
        if row is None:
            s.rollback()
            return None
        now = utcnow()
        won = _changed(s, update(JobRow).where(JobRow.id == row.id, JobRow.status == "queued",
                                               JobRow.attempts == row.attempts).values(
            status="running", attempts=row.attempts + 1, lease_owner=runner,
            lease_expires_at=now + timedelta(seconds=lease_s), heartbeat_at=now, updated_at=now,
            started_at=func.coalesce(JobRow.started_at, now)))
        s.commit()
        if won != 1:
            return None
        return ClaimedJob(id=row.id, kind=row.kind, bank=row.bank, owner=row.owner, input=dict(row.input or {}),
                          state=dict(row.state or {}), total=row.total, done=row.done, attempts=row.attempts + 1)


def _mine(job_id: str, runner: str) -> Any:
    return and_(JobRow.id == job_id, JobRow.status == "running", JobRow.lease_owner == runner)


def renew(sessions: sessionmaker[Session], job_id: str, runner: str, lease_s: float) -> tuple[bool, bool]:
    """Extend the lease; returns (still held, cancel requested). Not held: the job was taken from this runner
    (its lease expired and was swept), so the runner must stop without writing anything more."""
    now = utcnow()
    with sessions() as s:
        held = _changed(s, update(JobRow).where(_mine(job_id, runner)).values(
            lease_expires_at=now + timedelta(seconds=lease_s), heartbeat_at=now)) == 1
        s.commit()
        cancel = bool(s.scalar(select(JobRow.cancel_requested).where(JobRow.id == job_id)))
        return held, cancel


def checkpoint(sessions: sessionmaker[Session], job_id: str, runner: str, *, done: int | None = None,
               total: int | None = None, step: str | None = None,
               state: dict[str, Any] | None = None) -> tuple[bool, bool]:
    """Record progress and the resume state together (fenced on the lease); returns (still held, cancel
    requested), so a cancel is seen at the next checkpoint rather than the next lease renewal."""
    values: dict[str, Any] = {"updated_at": utcnow()}
    for name, value in (("done", done), ("total", total), ("step", step), ("state", state)):
        if value is not None:
            values[name] = value
    with sessions() as s:
        held = _changed(s, update(JobRow).where(_mine(job_id, runner)).values(**values)) == 1
        s.commit()
        cancel = bool(s.scalar(select(JobRow.cancel_requested).where(JobRow.id == job_id)))
        return held, cancel


def finish(sessions: sessionmaker[Session], job_id: str, runner: str, status: JobStatus, *,
           result: dict[str, Any] | None = None, error: str | None = None, done: int | None = None) -> bool:
    """End a held job (succeeded, failed or cancelled); its input and resume state are dropped."""
    now = utcnow()
    values: dict[str, Any] = {"status": status, "finished_at": now, "updated_at": now, "lease_owner": None,
                              "lease_expires_at": None, "input": None, "state": None}
    if result is not None:
        values["result"] = result
    if error is not None:
        values["error"] = error
    if done is not None:
        values["done"] = done
    with sessions() as s:
        held = _changed(s, update(JobRow).where(_mine(job_id, runner)).values(**values)) == 1
        s.commit()
        return held


def release(sessions: sessionmaker[Session], job_id: str, runner: str) -> bool:
    """Hand a held job back to the queue (shutdown): it resumes from its last checkpoint on the next claim."""
    with sessions() as s:
        held = _changed(s, update(JobRow).where(_mine(job_id, runner)).values(
            status="queued", lease_owner=None, lease_expires_at=None, updated_at=utcnow())) == 1
        s.commit()
        return held


def recover_expired(sessions: sessionmaker[Session], max_attempts: int) -> dict[str, int]:
    """Every running job whose lease expired (its server died or hung): back to ``queued`` to resume, or
    ``failed`` with the reason after ``max_attempts`` starts, or ``cancelled`` if a cancel was asked for."""
    counts = {"resumed": 0, "failed": 0, "cancelled": 0}
    now = utcnow()
    with sessions() as s:
        rows = list(s.scalars(select(JobRow).where(JobRow.status == "running", JobRow.lease_expires_at < now)
                              .with_for_update(skip_locked=True)))
        for row in rows:
            row.lease_owner, row.lease_expires_at, row.updated_at = None, None, now
            if row.cancel_requested:
                row.status, row.finished_at, row.input, row.state = "cancelled", now, None, None
                counts["cancelled"] += 1
            elif row.attempts >= max_attempts:
                row.status, row.finished_at, row.input, row.state = "failed", now, None, None
                row.error = (f"abandoned: the server running it stopped (lease expired) {row.attempts} times; "
                             "not retried again")
                counts["failed"] += 1
            else:
                row.status = "queued"
                counts["resumed"] += 1
        s.commit()
    return counts


# -- cancelling and retention -----------------------------------------------------------------------


def request_cancel(sessions: sessionmaker[Session], job_id: str) -> JobInfo:
    """Cancel a job: a queued one at once, a running one at its next step (its runner sees the flag with its
    next lease renewal). Cancelling a cancelled job is a no-op; a finished one is a Conflict."""
    now = utcnow()
    with sessions() as s:
        row = s.scalars(select(JobRow).where(JobRow.id == job_id).with_for_update()).first()
        if row is None:
            raise NotFound(f"job {job_id!r} not found")
        if row.status in ("succeeded", "failed"):
            raise Conflict(f"job {job_id!r} already {row.status}")
        if row.status == "queued":
            row.status, row.finished_at, row.input, row.state = "cancelled", now, None, None
        if row.status != "cancelled":
            row.cancel_requested = True
        row.updated_at = now
        s.commit()
        return _info(row)


def cancel_bank_jobs(sessions: sessionmaker[Session], bank: str) -> int:
    """Cancel every unfinished job of a bank (it is being deleted): a job queued for a deleted bank must not
    run against a new bank of the same name."""
    now = utcnow()
    with sessions() as s:
        queued = _changed(s, update(JobRow).where(JobRow.bank == bank, JobRow.status == "queued").values(
            status="cancelled", cancel_requested=True, finished_at=now, updated_at=now, input=None, state=None))
        running = _changed(s, update(JobRow).where(JobRow.bank == bank, JobRow.status == "running").values(
            cancel_requested=True, updated_at=now))
        s.commit()
        return queued + running


def purge_finished(sessions: sessionmaker[Session], retention_s: float) -> int:
    """Delete jobs finished more than ``retention_s`` ago; returns how many."""
    cutoff = utcnow() - timedelta(seconds=retention_s)
    with sessions() as s:
        gone = _changed(s, delete(JobRow).where(JobRow.status.in_(FINISHED), JobRow.finished_at < cutoff))
        s.commit()
        return gone
