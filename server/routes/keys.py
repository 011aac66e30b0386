"""API key management (admin only). The secret appears once, in the create answer."""

from __future__ import annotations

from fastapi import APIRouter, Response, status

from kvstore.banks.service import validate_bank_name
from kvstore.storage import keys

from ..auth import ALL_BANKS, Admin
from ..deps import Store, plain
from ..schemas import KeyCreate, KeyCreated, KeyList, KeyOut
from .common import ERRORS

router = APIRouter(prefix="/v1/keys", tags=["keys"], responses=ERRORS)


@router.post("", operation_id="create_key", status_code=status.HTTP_201_CREATED, response_model=KeyCreated)
def create_key(body: KeyCreate, store: Store, _admin: Admin) -> KeyCreated:
    """Create a key scoped to banks (or ``["*"]``) with a role, naming the agent that holds it."""
    for bank in body.banks:
        if bank != ALL_BANKS:
            validate_bank_name(bank)
    info, secret = keys.create_key(store.sessions, name=body.name, agent=body.agent, role=body.role,
                                   banks=body.banks)
    return KeyCreated(**plain(info), key=secret)


@router.get("", operation_id="list_keys", response_model=KeyList)
def list_keys(store: Store, _admin: Admin) -> KeyList:
    """Live keys, without their secrets."""
    return KeyList(keys=[KeyOut(**plain(k)) for k in keys.list_keys(store.sessions)])


@router.delete("/{key_id}", operation_id="revoke_key", status_code=status.HTTP_204_NO_CONTENT,
               response_class=Response)
def revoke_key(key_id: str, store: Store, _admin: Admin) -> Response:
    """Revoke a key; it stops working at once."""
    keys.revoke_key(store.sessions, key_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
