"""Banks: create, list (only those the key may see), get with stats, update, delete."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response, status

from kvstore.bank import BankStore
from kvstore.errors import Forbidden
from kvstore.storage import jobs

from ..auth import AnyKey, Owner, OwnerRole, Reader
from ..deps import Store, Worker, plain
from ..schemas import BankCreate, BankDetail, BankList, BankOut, BankUpdate
from .common import ERRORS, IdempotencyKey, replayable

router = APIRouter(prefix="/v1/banks", tags=["banks"], responses=ERRORS)


def _detail(store: BankStore, bank: str) -> BankDetail:
    """Settings and statistics of a bank in one object."""
    return BankDetail(**{**plain(store.stats(bank)), **plain(store.get_bank(bank)),
                         "context_map_budget_tokens": store.context_map.get(bank).budget_tokens})


@router.post("", operation_id="create_bank", status_code=status.HTTP_201_CREATED, response_model=BankOut)
async def create_bank(body: BankCreate, request: Request, store: Store, worker: Worker, principal: OwnerRole,
                      idempotency_key: IdempotencyKey = None) -> Response:
    """Create an empty bank (an owner key whose scope names it, or an admin key); a duplicate name is 409, unless
    it is the resend of the request that created it (same Idempotency-Key), which gets the first answer.

    On the model worker, like every call that may run torch: choosing the codec reads the model's calibration
    into tensors, and a request thread that once runs torch keeps an OpenMP team whose helper threads slow every
    later query by ~1.4x on a 2-core box (issue 33; server.worker.ModelWorker)."""
    if not principal.can_see(body.name):
        raise Forbidden("creating this bank needs an owner key scoped to it, or an admin key")

    def create() -> BankOut:
        info = store.create_bank(body.name, codec=body.codec, budget_bytes=body.budget_bytes,
                                 max_blocks=body.max_blocks, eviction=body.eviction or "lru",
                                 context_map_budget_tokens=body.context_map_budget_tokens)
        return BankOut(**plain(info), context_map_budget_tokens=store.context_map.get(body.name).budget_tokens)

    async def work() -> BankOut:
        return await worker.run(create)

    return await replayable(request, store, body.name, idempotency_key, body.model_dump(mode="json"), work,
                            status.HTTP_201_CREATED)


@router.get("", operation_id="list_banks", response_model=BankList)
def list_banks(store: Store, principal: AnyKey) -> BankList:
    """The banks this key may see."""
    names = None if principal.all_banks else set(principal.banks)
    return BankList(banks=[BankOut(**plain(b)) for b in store.list_banks(names)])


@router.get("/{bank}", operation_id="get_bank", response_model=BankDetail)
def get_bank(bank: str, store: Store, _reader: Reader) -> BankDetail:
    """A bank's settings with its statistics (documents, blocks, tokens, bytes, compression, evictions)."""
    return _detail(store, bank)


@router.patch("/{bank}", operation_id="update_bank", response_model=BankDetail)
async def update_bank(bank: str, body: BankUpdate, request: Request, store: Store, worker: Worker, _owner: Owner,
                      idempotency_key: IdempotencyKey = None) -> Response:
    """Change a bank's defaults (owner); existing blocks keep the codec they were written with. On the model
    worker, as :func:`create_bank` (a new codec is resolved from the calibration)."""

    def update() -> BankDetail:
        store.update_bank(bank, codec=body.codec, budget_bytes=body.budget_bytes, max_blocks=body.max_blocks,
                          eviction=body.eviction, context_map_budget_tokens=body.context_map_budget_tokens)
        return _detail(store, bank)

    async def work() -> BankDetail:
        return await worker.run(update)

    return await replayable(request, store, bank, idempotency_key, body.model_dump(mode="json"), work)


@router.delete("/{bank}", operation_id="delete_bank", status_code=status.HTTP_204_NO_CONTENT,
               response_class=Response)
def delete_bank(bank: str, store: Store, _owner: Owner) -> Response:
    """Delete a bank with all its documents and blocks (owner). (No Idempotency-Key: its record would go with the
    bank.)"""
    store.get_bank(bank)  # 404 before touching its jobs
    jobs.cancel_bank_jobs(store.sessions, bank)  # a job queued for it must never run on a new bank of that name
    store.delete_bank(bank)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
