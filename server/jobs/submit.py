"""Queueing a job from a request: stored with its input (before the 202), capped per key, runner woken."""

from __future__ import annotations

from functools import partial
from typing import Any

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from kvstore.bank import BankStore
from kvstore.storage import jobs

from ..auth import Principal
from ..schemas import ErrorOut, JobAccepted

# The answers of a route that queues a job, for its OpenAPI responses.
JOB_RESPONSES: dict[int | str, dict[str, Any]] = {
    202: {"model": JobAccepted, "description": "Accepted as a durable job: poll GET /v1/jobs/{job_id}"},
    429: {"model": ErrorOut, "description": "The key already has KVRAG_JOBS_PER_KEY jobs queued or running"},
}


async def submit(request: Request, store: BankStore, principal: Principal, *, kind: str, bank: str,
                 input: dict[str, Any], total: int) -> dict[str, Any]:
    """Queue a job owned by the caller's key; the 202 answer's body (``job_id``, ``status``). ``RateLimited``
    (429) when the key already has ``jobs_per_key`` jobs queued or running."""
    job = await run_in_threadpool(partial(jobs.enqueue, store.sessions, kind=kind, bank=bank, input=input,
                                          total=total, owner=principal.key_id or "root",
                                          max_active=request.app.state.settings.jobs_per_key))
    runner = getattr(request.app.state, "jobs", None)
    if runner is not None:
        runner.wake()
    return JobAccepted(job_id=job.id, status=job.status).model_dump()
