"""Maintenance of one bank: expiry, re-encoding, merging, eviction, orphan collection, integrity check.

It is long work whatever the bank's size (a re-encode after a model change touches every block), so it always
runs as a durable job: the request answers ``202`` with the job's id at once, and the job's result is the
report ``BankStore.maintain`` makes (server.jobs.maintenance).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, status
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse
from pydantic import Field
from starlette.concurrency import run_in_threadpool

from ..auth import Writer
from ..deps import Store
from ..jobs import maintenance
from ..jobs.submit import JOB_RESPONSES, submit
from ..schemas import JobAccepted, Request
from .common import ERRORS, IdempotencyKey, idempotent

router = APIRouter(prefix="/v1/banks/{bank}", tags=["maintenance"], responses=ERRORS)


class MaintenanceIn(Request):
    evict: bool = Field(default=True, description="Evict down the tiers until the bank fits its budget.")
    merge: bool = Field(default=True, description="Point blocks with identical tokens at one blob (dedup).")
    gc: bool = Field(default=True, description="Delete blob files no block references (after a grace period).")
    expire: bool = Field(default=True, description="Delete documents past their expires_at.")
    reencode: bool = Field(default=True, description="Re-encode after a model change; re-warm cold blocks.")
    rebuild: bool = Field(default=False, description="Check every block's checksum; rebuild damaged ones from text.")


@router.post("/maintenance", operation_id="maintain_bank", status_code=status.HTTP_202_ACCEPTED,
             response_model=JobAccepted, responses=JOB_RESPONSES)
async def maintain(bank: str, body: MaintenanceIn, request: HTTPRequest, store: Store, principal: Writer,
                   idempotency_key: IdempotencyKey = None) -> JSONResponse:
    """Queue maintenance as a job and answer ``202`` with its ``job_id`` at once; poll ``GET /v1/jobs/{job_id}``
    for progress (``done``/``total`` steps, ``step``) and the report (the job's ``result``). A retry with the
    same Idempotency-Key gets the same job."""
    await run_in_threadpool(store.get_bank, bank)  # 404 now rather than inside a job
    options = body.model_dump(mode="json")

    async def work() -> tuple[int, dict[str, Any]]:
        return status.HTTP_202_ACCEPTED, await submit(request, store, principal, kind=maintenance.KIND, bank=bank,
                                                      input={"options": options},
                                                      total=len(maintenance.plan(options)))

    code, out = await idempotent(request, store, bank, idempotency_key, options, work)
    return JSONResponse(out, status_code=code, headers={"Location": f"/v1/jobs/{out['job_id']}"})
