"""Banks: create, list (only those the key may see), get with stats, update, delete."""

from __future__ import annotations

from fastapi import APIRouter, Response, status

from kvstore.bank import BankStore
from kvstore.errors import Forbidden

from ..auth import CurrentPrincipal, Reader, Writer
from ..deps import Store, plain
from ..schemas import BankCreate, BankDetail, BankList, BankOut, BankUpdate
from .common import ERRORS

router = APIRouter(prefix="/v1/banks", tags=["banks"], responses=ERRORS)


def _detail(store: BankStore, bank: str) -> BankDetail:
    """Settings and statistics of a bank in one object."""
    return BankDetail(**{**plain(store.stats(bank)), **plain(store.get_bank(bank)),
                         "context_map_budget_tokens": store.context_map.get(bank).budget_tokens})


@router.post("", operation_id="create_bank", status_code=status.HTTP_201_CREATED, response_model=BankOut)
def create_bank(body: BankCreate, store: Store, principal: CurrentPrincipal) -> BankOut:
    """Create an empty bank (admin, or a write key whose scope names it); a duplicate name is 409."""
    if not (principal.has_role("write") and principal.can_see(body.name)):
        raise Forbidden("creating this bank needs a write key scoped to it, or an admin key")
    info = store.create_bank(body.name, codec=body.codec, budget_bytes=body.budget_bytes,
                             max_blocks=body.max_blocks, eviction=body.eviction or "lru",
                             context_map_budget_tokens=body.context_map_budget_tokens)
    return BankOut(**plain(info), context_map_budget_tokens=store.context_map.get(body.name).budget_tokens)


@router.get("", operation_id="list_banks", response_model=BankList)
def list_banks(store: Store, principal: CurrentPrincipal) -> BankList:
    """The banks this key may see."""
    names = None if principal.all_banks else set(principal.banks)
    return BankList(banks=[BankOut(**plain(b)) for b in store.list_banks(names)])


@router.get("/{bank}", operation_id="get_bank", response_model=BankDetail)
def get_bank(bank: str, store: Store, _reader: Reader) -> BankDetail:
    """A bank's settings with its statistics (documents, blocks, tokens, bytes, compression, evictions)."""
    return _detail(store, bank)


@router.patch("/{bank}", operation_id="update_bank", response_model=BankDetail)
def update_bank(bank: str, body: BankUpdate, store: Store, _writer: Writer) -> BankDetail:
    """Change a bank's defaults; existing blocks keep the codec they were written with."""
    store.update_bank(bank, codec=body.codec, budget_bytes=body.budget_bytes, max_blocks=body.max_blocks,
                      eviction=body.eviction, context_map_budget_tokens=body.context_map_budget_tokens)
    return _detail(store, bank)


@router.delete("/{bank}", operation_id="delete_bank", status_code=status.HTTP_204_NO_CONTENT,
               response_class=Response)
def delete_bank(bank: str, store: Store, _writer: Writer) -> Response:
    """Delete a bank with all its documents and blocks."""
    store.delete_bank(bank)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
