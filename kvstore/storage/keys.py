"""API keys: created with a random secret, stored only as a prefix and a SHA-256 hash.

The secret carries 256 random bits, so a plain SHA-256 is enough (no slow KDF needed: there is
nothing to brute-force); verification looks the row up by prefix and compares hashes in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from kvstore.errors import NotFound, ValidationFailed
from kvstore.storage.catalog import ApiKeyRow, utcnow

Role = Literal["read", "write", "owner", "admin"]
ROLES: tuple[Role, ...] = ("read", "write", "owner", "admin")  # ordered: each one can do what those before can
SECRET_PREFIX = "kvr_"
_PREFIX_LEN = 12  # "kvr_" + 8 random characters: enough to find the row, useless to an attacker


@dataclass
class ApiKeyInfo:
    """A key as listed: everything but the secret."""

    id: str
    prefix: str
    name: str
    agent: str
    role: str
    banks: list[str]
    created_at: datetime
    revoked_at: datetime | None = None


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _info(row: ApiKeyRow) -> ApiKeyInfo:
    return ApiKeyInfo(id=row.id, prefix=row.prefix, name=row.name, agent=row.agent, role=row.role,
                      banks=list(row.banks or []), created_at=row.created_at, revoked_at=row.revoked_at)


def create_key(sessions: sessionmaker[Session], *, name: str, agent: str, role: str,
               banks: list[str]) -> tuple[ApiKeyInfo, str]:
    """Create a key; returns its info and the secret, which is never stored and cannot be shown again."""
    if role not in ROLES:
        raise ValidationFailed(f"role must be one of {ROLES}")
    if not banks:
        raise ValidationFailed('banks must list bank names or be ["*"]')
    secret = SECRET_PREFIX + secrets.token_urlsafe(32)
    row = ApiKeyRow(id=uuid.uuid4().hex, prefix=secret[:_PREFIX_LEN], key_hash=_hash(secret), name=name,
                    agent=agent, role=role, banks=list(banks), created_at=utcnow())
    with sessions() as s:
        s.add(row)
        s.commit()
        return _info(row), secret


def list_keys(sessions: sessionmaker[Session], *, include_revoked: bool = False) -> list[ApiKeyInfo]:
    """Keys ordered by creation; revoked keys only when asked."""
    with sessions() as s:
        q = select(ApiKeyRow).order_by(ApiKeyRow.created_at, ApiKeyRow.id)
        if not include_revoked:
            q = q.where(ApiKeyRow.revoked_at.is_(None))
        return [_info(r) for r in s.scalars(q)]


def revoke_key(sessions: sessionmaker[Session], key_id: str) -> None:
    """Revoke a key at once; an unknown or already revoked id is not found."""
    with sessions() as s:
        row = s.get(ApiKeyRow, key_id)
        if row is None or row.revoked_at is not None:
            raise NotFound(f"key {key_id!r} not found")
        row.revoked_at = utcnow()
        s.commit()


def verify_key(sessions: sessionmaker[Session], secret: str) -> ApiKeyInfo | None:
    """The live key whose secret this is, or None."""
    if not secret.startswith(SECRET_PREFIX) or len(secret) <= _PREFIX_LEN:
        return None
    digest = _hash(secret)
    with sessions() as s:
        rows = s.scalars(select(ApiKeyRow).where(ApiKeyRow.prefix == secret[:_PREFIX_LEN],
                                                 ApiKeyRow.revoked_at.is_(None))).all()
        for row in rows:
            if hmac.compare_digest(row.key_hash, digest):
                return _info(row)
    return None
