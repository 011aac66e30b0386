"""Background jobs (large batch ingests): status and progress kept in the catalog's jobs table."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session, sessionmaker

from .catalog import JobRow, utcnow
from .errors import NotFound

JobStatus = Literal["queued", "running", "succeeded", "failed"]


@dataclass
class JobInfo:
    id: str
    kind: str
    bank: str
    status: str
    total: int
    done: int
    result: dict[str, Any]
    error: str | None
    created_at: datetime | None = None
    updated_at: datetime | None = None


def _info(row: JobRow) -> JobInfo:
    return JobInfo(id=row.id, kind=row.kind, bank=row.bank, status=row.status, total=row.total, done=row.done,
                   result=dict(row.result or {}), error=row.error, created_at=row.created_at,
                   updated_at=row.updated_at)


def create_job(sessions: sessionmaker[Session], *, kind: str, bank: str, total: int) -> JobInfo:
    """A new queued job."""
    now = utcnow()
    row = JobRow(id=uuid.uuid4().hex, kind=kind, bank=bank, status="queued", total=total, done=0, result={},
                 error=None, created_at=now, updated_at=now)
    with sessions() as s:
        s.add(row)
        s.commit()
        return _info(row)


def update_job(sessions: sessionmaker[Session], job_id: str, *, status: JobStatus | None = None,
               done: int | None = None, result: dict[str, Any] | None = None, error: str | None = None) -> None:
    """Record progress; only the given fields change."""
    with sessions() as s:
        row = s.get(JobRow, job_id)
        if row is None:
            raise NotFound(f"job {job_id!r} not found")
        if status is not None:
            row.status = status
        if done is not None:
            row.done = done
        if result is not None:
            row.result = result
        if error is not None:
            row.error = error
        row.updated_at = utcnow()
        s.commit()


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
