"""Maintenance of one bank: expiry, re-encoding, merging, eviction, orphan collection, integrity check."""

from __future__ import annotations

from functools import partial
from typing import Any

from fastapi import APIRouter, Response
from fastapi import Request as HTTPRequest
from pydantic import BaseModel, ConfigDict, Field

from kvstore import idempotency
from kvstore.bank import BankStore

from ..auth import Writer
from ..deps import Store, Worker
from ..schemas import Request
from .common import ERRORS, IdempotencyKey, replayable

router = APIRouter(prefix="/v1/banks/{bank}", tags=["maintenance"], responses=ERRORS)


class MaintenanceIn(Request):
    evict: bool = Field(default=True, description="Evict down the tiers until the bank fits its budget.")
    merge: bool = Field(default=True, description="Point blocks with identical tokens at one blob (dedup).")
    gc: bool = Field(default=True, description="Delete blob files no block references (after a grace period).")
    expire: bool = Field(default=True, description="Delete documents past their expires_at.")
    reencode: bool = Field(default=True, description="Re-encode after a model change; re-warm cold blocks.")
    rebuild: bool = Field(default=False, description="Check every block's checksum; rebuild damaged ones from text.")


def _maintain(store: BankStore, bank: str, body: MaintenanceIn) -> dict[str, Any]:
    report = store.maintain(bank, evict=body.evict, merge=body.merge, gc=body.gc, expire=body.expire,
                            reencode=body.reencode)
    if body.expire:
        report["idempotency_expired"] = idempotency.purge_expired(store.sessions, bank,
                                                                  store.settings.idempotency_ttl_s)
    if body.rebuild:
        report["verify"] = store.verify(bank)
    return report


class MaintenanceOut(BaseModel):
    """The report of one run (its fields are the engine's; see ``BankStore.maintain``)."""

    model_config = ConfigDict(extra="allow")


@router.post("/maintenance", operation_id="maintain_bank", response_model=dict[str, Any])
async def maintain(bank: str, body: MaintenanceIn, request: HTTPRequest, store: Store, worker: Worker, _writer: Writer,
                   idempotency_key: IdempotencyKey = None) -> Response:
    """Run maintenance now (it uses the model, so it queues behind queries) and return its report."""

    async def work() -> MaintenanceOut:
        return MaintenanceOut(**await worker.run(partial(_maintain, store, bank, body)))

    return await replayable(request, store, bank, idempotency_key, body.model_dump(mode="json"), work)
