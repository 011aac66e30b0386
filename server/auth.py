"""Authentication and scopes, as FastAPI dependencies.

A request is made by a ``Principal``: the root (``KVRAG_ADMIN_KEY``), an API key, or, when no admin
key is configured (loopback only), an anonymous root. Roles are ordered read < write < owner < admin:
``write`` writes documents, sessions and the context map and runs maintenance; ``owner`` also creates,
reconfigures and deletes the banks in its scope and manages every agent's sessions (a team owns its banks
without being server admin); ``admin`` with every bank manages keys and reads metrics. A key's ``banks``
list (or ``["*"]``) bounds what it can see: another bank is answered 404, exactly as if it did not exist,
so a key learns nothing about banks outside its scope.

Every route states its role through one of the dependencies below; ``route_role`` reads it back from the
route's dependency tree, and the app publishes it in OpenAPI as ``x-kvrag-role`` (the role table of
docs/RELIABILITY.md is checked against it, so a route without a role fails the tests).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from kvstore.bank import BankStore
from kvstore.errors import Forbidden, NotFound, Unauthorized
from kvstore.storage.keys import verify_key

from .deps import Store

ROLE_RANK = {"read": 0, "write": 1, "owner": 2, "admin": 3}
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
    return principal_for(request, store, bearer.credentials if bearer is not None else api_key)


def principal_for(request: Request, store: BankStore, secret: str | None) -> Principal:
    """The caller holding ``secret`` (the admin key or an API key); the console resolves its logins here too,
    so a revoked key stops working there at once."""
    admin_key: str | None = request.app.state.settings.admin_key
    if admin_key is None:
        return ROOT  # no admin key: the server only listens on loopback (see server.app.run)
    if not secret:
        raise Unauthorized("an API key is required (Authorization: Bearer <key> or X-API-Key)")
    if hmac.compare_digest(secret.encode(), admin_key.encode()):
        return ROOT
    info = verify_key(store.sessions, secret)
    if info is None:
        raise Unauthorized("invalid or revoked API key")
    return Principal(key_id=info.id, name=info.name, agent=info.agent, role=info.role, banks=tuple(info.banks))


def resolve_principal(request: Request, store: Store,
                      bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
                      api_key: Annotated[str | None, Depends(_api_key_header)]) -> Principal:
    """``get_principal``, remembered on the request (what it wrote is bound to the key: idempotency records)."""
    principal = get_principal(request, store, bearer, api_key)
    request.state.principal = principal
    return principal


CurrentPrincipal = Annotated[Principal, Depends(resolve_principal)]


def require_admin(principal: CurrentPrincipal) -> Principal:
    """Admin role over every bank (key management, metrics)."""
    if not (principal.has_role("admin") and principal.all_banks):
        raise Forbidden("this needs an admin key for all banks")
    return principal


def any_key(principal: CurrentPrincipal) -> Principal:
    """Any valid key (read role); the route bounds what it shows by the key's scope."""
    return principal


def require_writer(principal: CurrentPrincipal) -> Principal:
    """The write role; the route checks the bank it acts on (e.g. a job's) against the key's scope."""
    if not principal.has_role("write"):
        raise Forbidden("this needs a write key")
    return principal


def require_owner(principal: CurrentPrincipal) -> Principal:
    """The owner role; the route checks the bank named in the body against the key's scope."""
    if not principal.has_role("owner"):
        raise Forbidden("this needs an owner key")
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


def bank_owner(bank: str, principal: CurrentPrincipal) -> Principal:
    check_bank(principal, bank, "owner")
    return principal


Admin = Annotated[Principal, Depends(require_admin)]
AnyKey = Annotated[Principal, Depends(any_key)]
OwnerRole = Annotated[Principal, Depends(require_owner)]
WriteRole = Annotated[Principal, Depends(require_writer)]
Reader = Annotated[Principal, Depends(bank_reader)]
Writer = Annotated[Principal, Depends(bank_writer)]
Owner = Annotated[Principal, Depends(bank_owner)]

# The dependencies that state a route's role. ``resolve_principal`` alone is not one: a route that only
# authenticates has no role, and the role check in tests/server/test_roles.py fails for it.
ROLE_OF: dict[Callable[..., Any], str] = {any_key: "read", bank_reader: "read", bank_writer: "write",
                                          require_writer: "write", require_owner: "owner", bank_owner: "owner",
                                          require_admin: "admin"}
NO_ROLE = "none"  # a route with no principal at all (health, readiness)


def _dependency_calls(dependant: Dependant) -> list[Any]:
    calls, stack = [], list(dependant.dependencies)
    while stack:
        dep = stack.pop()
        calls.append(dep.call)
        stack.extend(dep.dependencies)
    return calls


def route_role(route: APIRoute) -> str | None:
    """The strongest role a route's dependencies require; ``none`` when it asks for no principal at all,
    None when it authenticates without stating a role."""
    calls = _dependency_calls(route.dependant)
    roles = [ROLE_OF[c] for c in calls if c in ROLE_OF]
    if roles:
        return max(roles, key=ROLE_RANK.__getitem__)
    return None if resolve_principal in calls else NO_ROLE
