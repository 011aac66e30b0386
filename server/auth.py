"""Authentication and scopes, as FastAPI dependencies.

A request is made by a ``Principal``: the root (``KVRAG_ADMIN_KEY``), an API key, or, when no admin
key is configured (loopback only), an anonymous root. Roles are ordered read < write < admin; a
key's ``banks`` list (or ``["*"]``) bounds what it can see: another bank is answered 404, exactly
as if it did not exist, so a key learns nothing about banks outside its scope.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from kvstore.errors import Forbidden, NotFound, Unauthorized
from kvstore.keys import verify_key

from .deps import Store

ROLE_RANK = {"read": 0, "write": 1, "admin": 2}
ALL_BANKS = "*"

# auto_error=False: a missing credential is our own 401 JSON, not the framework's 403.
_bearer = HTTPBearer(auto_error=False, description="An API key as a bearer token.")
_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="An API key.")


@dataclass(frozen=True)
class Principal:
    """Who is asking: role, bank scope and the agent their writes are attributed to."""

    key_id: str | None
    name: str
    agent: str | None
    role: str
    banks: tuple[str, ...]

    @property
    def all_banks(self) -> bool:
        return ALL_BANKS in self.banks

    def can_see(self, bank: str) -> bool:
        """Whether ``bank`` is within this principal's scope."""
        return self.all_banks or bank in self.banks

    def has_role(self, role: str) -> bool:
        return ROLE_RANK[self.role] >= ROLE_RANK[role]


ROOT = Principal(key_id=None, name="root", agent=None, role="admin", banks=(ALL_BANKS,))


def get_principal(request: Request, store: Store,
                  bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
                  api_key: Annotated[str | None, Depends(_api_key_header)]) -> Principal:
    """Resolve the caller from ``Authorization: Bearer`` or ``X-API-Key``."""
    admin_key: str | None = request.app.state.settings.admin_key
    if admin_key is None:
        return ROOT  # no admin key: the server only listens on loopback (see server.app.run)
    secret = bearer.credentials if bearer is not None else api_key
    if not secret:
        raise Unauthorized("an API key is required (Authorization: Bearer <key> or X-API-Key)")
    if hmac.compare_digest(secret.encode(), admin_key.encode()):
        return ROOT
    info = verify_key(store.sessions, secret)
    if info is None:
        raise Unauthorized("invalid or revoked API key")
    return Principal(key_id=info.id, name=info.name, agent=info.agent, role=info.role, banks=tuple(info.banks))


CurrentPrincipal = Annotated[Principal, Depends(get_principal)]


def require_admin(principal: CurrentPrincipal) -> Principal:
    """Admin role over every bank (key management, metrics)."""
    if not (principal.has_role("admin") and principal.all_banks):
        raise Forbidden("this needs an admin key for all banks")
    return principal


def check_bank(principal: Principal, bank: str, role: str) -> None:
    """404 for a bank outside the scope (indistinguishable from a missing one), then 403 on role."""
    if not principal.can_see(bank):
        raise NotFound(f"bank {bank!r} not found")
    if not principal.has_role(role):
        raise Forbidden(f"this needs a {role} key")


def bank_reader(bank: str, principal: CurrentPrincipal) -> Principal:
    check_bank(principal, bank, "read")
    return principal


def bank_writer(bank: str, principal: CurrentPrincipal) -> Principal:
    check_bank(principal, bank, "write")
    return principal


Admin = Annotated[Principal, Depends(require_admin)]
Reader = Annotated[Principal, Depends(bank_reader)]
Writer = Annotated[Principal, Depends(bank_writer)]
