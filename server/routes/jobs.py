"""Jobs: a job's state, a bank's jobs (newest first), cancelling one. Jobs outside the key's scope are 404."""

from __future__ import annotations

from functools import partial
from typing import Annotated

from fastapi import APIRouter, Query
from starlette.concurrency import run_in_threadpool

from kvstore.errors import NotFound
from kvstore.storage import jobs

from ..auth import AnyKey, Reader, WriteRole, check_bank
from ..deps import Store, plain
from ..errors import redact
from ..schemas import JobOut, JobPage
from .common import ERRORS

router = APIRouter(tags=["jobs"], responses=ERRORS)


def job_out(job: jobs.JobInfo) -> JobOut:
    """A job as shown: its error redacted (it may quote a path or a URL with credentials)."""
    out = JobOut(**plain(job))
    out.error = redact(out.error) if out.error else out.error
    return out


@router.get("/v1/jobs/{job_id}", operation_id="get_job", response_model=JobOut)
def get_job(job_id: str, store: Store, principal: AnyKey) -> JobOut:
    """A job's status and progress (``done``/``total``, ``step``), its result or error (404 for a job on a bank
    outside the key's scope)."""
    job = jobs.get_job(store.sessions, job_id)
    if not principal.can_see(job.bank):
        raise NotFound(f"job {job_id!r} not found")
    return job_out(job)


@router.get("/v1/banks/{bank}/jobs", operation_id="list_jobs", response_model=JobPage)
def list_jobs(bank: str, store: Store, _reader: Reader,
              cursor: Annotated[str | None, Query(max_length=128)] = None,
              limit: Annotated[int, Query(ge=1, le=1000)] = 50) -> JobPage:
    """The bank's jobs, newest first, a page at a time; pass ``next_cursor`` back for the next."""
    store.get_bank(bank)  # 404 for a bank that does not exist, as every bank route answers
    page, next_cursor = jobs.list_jobs(store.sessions, bank, cursor=cursor, limit=limit)
    return JobPage(jobs=[job_out(j) for j in page], next_cursor=next_cursor)


@router.post("/v1/jobs/{job_id}/cancel", operation_id="cancel_job", response_model=JobOut)
async def cancel_job(job_id: str, store: Store, principal: WriteRole) -> JobOut:
    """Cancel a job (write role on its bank): a queued one at once, a running one at its next step (it then
    reads ``cancelled``; what its finished steps did stays done). Again on a cancelled job: the same answer;
    on a succeeded or failed one: 409."""
    job = await run_in_threadpool(partial(jobs.get_job, store.sessions, job_id))
    if not principal.can_see(job.bank):
        raise NotFound(f"job {job_id!r} not found")
    check_bank(principal, job.bank, "write")
    return job_out(await run_in_threadpool(partial(jobs.request_cancel, store.sessions, job_id)))
