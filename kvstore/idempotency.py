"""Idempotency keys: a retried write with the same key and body gets the first answer back.

A key is scoped to its bank; the stored request hash covers method, path and body, so reusing a key
for a different request is a conflict rather than a silent replay of the wrong answer.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from .catalog import BankRow, IdempotencyRow, utcnow
from .errors import Conflict, ValidationFailed

MAX_KEY_LENGTH = 200


@dataclass
class StoredResponse:
    status_code: int
    body: dict[str, Any]


def request_hash(method: str, path: str, body: Any) -> str:
    """A stable hash of a request: canonical JSON of the body, with the method and path."""
    canonical = json.dumps([method.upper(), path, body], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def check_key(key: str) -> None:
    """Reject keys the table cannot hold (a validation error, not a silent truncation)."""
    if not key or len(key) > MAX_KEY_LENGTH:
        raise ValidationFailed(f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} characters")


def _bank_id(s: Session, bank: str) -> int | None:
    return s.scalar(select(BankRow.id).where(BankRow.name == bank))


def lookup(sessions: sessionmaker[Session], bank: str, key: str, req_hash: str) -> StoredResponse | None:
    """The stored answer for this key, None when unseen; a different request under the key is a conflict."""
    check_key(key)
    with sessions() as s:
        bank_id = _bank_id(s, bank)
        if bank_id is None:
            return None
        row = s.get(IdempotencyRow, (bank_id, key))
        if row is None:
            return None
        if row.request_hash != req_hash:
            raise Conflict("Idempotency-Key was already used for a different request")
        return StoredResponse(status_code=row.status_code, body=dict(row.response))


def save(sessions: sessionmaker[Session], bank: str, key: str, req_hash: str, status_code: int,
         body: dict[str, Any]) -> None:
    """Remember a successful answer; a concurrent twin that saved first wins (both did the same write)."""
    with sessions() as s:
        bank_id = _bank_id(s, bank)
        if bank_id is None:
            return
        s.add(IdempotencyRow(bank_id=bank_id, key=key, request_hash=req_hash, status_code=status_code,
                             response=body, created_at=utcnow()))
        try:
            s.commit()
        except IntegrityError:
            s.rollback()
