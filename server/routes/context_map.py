"""The context map of a bank (PEEK): read (any version), edit with feedback, refresh from recent queries, configure.

Reads and edits only tokenize and touch the catalog, so they run in the thread pool; a refresh by the
bank's local model is model work and goes through the worker, a refresh by ``KVRAG_MAP_LLM_URL`` waits
on the network and runs in the thread pool, so queries never queue behind someone else's endpoint.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from kvstore.contextmap.views import MapView

from ..auth import Owner, Principal, Reader, Writer
from ..deps import Store, Worker, plain
from ..errors import client_detail, redact, request_id_of
from ..schemas import ContextMapOut, MapEditsIn, MapEditsOut, MapRefreshOut, MapUpdate
from .common import ERRORS, IdempotencyKey, replayable

router = APIRouter(prefix="/v1/banks/{bank}/context-map", tags=["context map"], responses=ERRORS)


def _out(view: MapView) -> ContextMapOut:
    return ContextMapOut(**plain(view))


@router.get("", operation_id="get_context_map", response_model=ContextMapOut)
async def get_context_map(bank: str, store: Store, _reader: Reader,
                          version: Annotated[int | None, Query(ge=0, description="An older version.")] = None
                          ) -> ContextMapOut:
    """The bank's context map (items by section with stable ids, scores and authors), or an old version."""
    return _out(await run_in_threadpool(store.context_map.get, bank, version))


@router.post("/edits", operation_id="edit_context_map", response_model=MapEditsOut)
async def edit_context_map(bank: str, body: MapEditsIn, request: Request, store: Store, principal: Writer,
                           idempotency_key: IdempotencyKey = None) -> Response:
    """Apply edits and feedback as one new version, all or nothing; the map is evicted to its budget.
    A stale ``base_version`` is a 409 ``version_mismatch`` unless every item touched is unchanged since."""
    edits: list[dict[str, Any]] = [e.model_dump(exclude_none=True) for e in body.edits]
    feedback: list[dict[str, Any]] = [f.model_dump() for f in body.feedback]

    def run() -> Any:
        return store.context_map.edit(bank, edits, feedback, base_version=body.base_version, agent=principal.agent)

    async def work() -> MapEditsOut:
        return MapEditsOut(**plain(await run_in_threadpool(run)))

    return await replayable(request, store, bank, idempotency_key, body.model_dump(mode="json"), work)


@router.post("/refresh", operation_id="refresh_context_map", response_model=MapRefreshOut)
async def refresh_context_map(bank: str, request: Request, store: Store, worker: Worker, principal: Writer,
                              idempotency_key: IdempotencyKey = None) -> Response:
    """Distill recent queries into edits with the map LLM and apply them (scores decay by 0.85).
    Output that does not parse changes nothing; the report says so. A frozen map is a 409. The report names
    the map LLM's endpoint and its error without credentials (the server log has them in full)."""

    def run() -> Any:
        return store.context_map.refresh(bank, agent=principal.agent)

    async def work() -> MapRefreshOut:
        report = await run_in_threadpool(run) if store.settings.map_llm_url else await worker.run(run)
        if report.error:
            report.error = client_detail(report.error, request_id_of(request))
        report.llm = redact(report.llm)
        return MapRefreshOut(**plain(report))

    return await replayable(request, store, bank, idempotency_key, {}, work)


@router.patch("", operation_id="update_context_map", response_model=ContextMapOut)
async def update_context_map(bank: str, body: MapUpdate, request: Request, store: Store, principal: Owner,
                             idempotency_key: IdempotencyKey = None) -> Response:
    """Freeze or unfreeze the map (frozen: no refresh, no bootstrap) and change its token budget (owner: like the
    bank's own settings; a smaller budget evicts items)."""

    def run() -> MapView:
        return store.context_map.configure(bank, frozen=body.frozen, budget_tokens=body.budget_tokens,
                                           agent=principal.agent)

    async def work() -> ContextMapOut:
        return _out(await run_in_threadpool(run))

    return await replayable(request, store, bank, idempotency_key, body.model_dump(mode="json"), work)


ItemId = Annotated[str, Path(max_length=16, description="cr-N, cu-N or rr-N")]


async def _set_pin(bank: str, item_id: str, pinned: bool, request: Request, store: Store, principal: Principal,
                   idempotency_key: str | None) -> Response:
    def run() -> MapView:
        return store.context_map.pin(bank, item_id, pinned, agent=principal.agent)

    async def work() -> ContextMapOut:
        return _out(await run_in_threadpool(run))

    return await replayable(request, store, bank, idempotency_key, {"item": item_id, "pinned": pinned}, work)


@router.post("/items/{item_id}/pin", operation_id="pin_context_map_item", response_model=ContextMapOut)
async def pin_item(bank: str, item_id: ItemId, request: Request, store: Store, principal: Owner,
                   idempotency_key: IdempotencyKey = None) -> Response:
    """Pin an item (owner): until unpinned, no edit, refresh or eviction deletes or replaces it (edits naming it
    are a 409; a refresh's are refused and reported). Pinning a pinned item changes nothing."""
    return await _set_pin(bank, item_id, True, request, store, principal, idempotency_key)


@router.post("/items/{item_id}/unpin", operation_id="unpin_context_map_item", response_model=ContextMapOut)
async def unpin_item(bank: str, item_id: ItemId, request: Request, store: Store, principal: Owner,
                     idempotency_key: IdempotencyKey = None) -> Response:
    """Unpin an item (owner): it can be edited, refreshed and evicted again."""
    return await _set_pin(bank, item_id, False, request, store, principal, idempotency_key)
