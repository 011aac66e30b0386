"""Background jobs (large batch ingests): status and progress kept in the catalog's jobs table."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Literal

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


def _info(row: JobRow) -> JobInfo:
    return JobInfo(id=row.id, kind=row.kind, bank=row.bank, status=row.status, total=row.total, done=row.done,
                   result=dict(row.result or {}), error=row.error)


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
