"""Idempotency keys: a retried write with the same key and body gets the first answer back.

A record belongs to its bank and to the API key that made it (``owner``: the key id, ``root`` for the admin
key): the same Idempotency-Key sent by another key is another record, so no key is ever answered with
another key's stored answer, nor blocked by it. The stored request hash covers method, path and body, so
reusing a key for a different request is a conflict rather than a silent replay of the wrong answer.
Records expire after ``ttl_s`` (KVRAG_IDEMPOTENCY_TTL_S, 24 h): an older one answers nothing, is replaced by
the next save under its key, and is purged by that bank's next save or maintenance.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from kvstore.errors import Conflict, ValidationFailed
from kvstore.storage.catalog import BankRow, IdempotencyRow, utcnow

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


def _cutoff(ttl_s: float) -> datetime:
    return utcnow() - timedelta(seconds=ttl_s)


def lookup(sessions: sessionmaker[Session], bank: str, owner: str, key: str, req_hash: str,
           ttl_s: float) -> StoredResponse | None:
    """``owner``'s live answer under this key, None when unseen or expired; a different request under the key
    is a conflict."""
    check_key(key)
    with sessions() as s:
        bank_id = _bank_id(s, bank)
        if bank_id is None:
            return None
        row = s.scalar(select(IdempotencyRow).where(
            IdempotencyRow.bank_id == bank_id, IdempotencyRow.owner == owner, IdempotencyRow.key == key,
            IdempotencyRow.created_at > _cutoff(ttl_s)))
        if row is None:
            return None
        if row.request_hash != req_hash:
            raise Conflict("Idempotency-Key was already used for a different request")
        return StoredResponse(status_code=row.status_code, body=dict(row.response))


def save(sessions: sessionmaker[Session], bank: str, owner: str, key: str, req_hash: str, status_code: int,
         body: dict[str, Any], ttl_s: float) -> StoredResponse:
    """Remember a successful answer (purging the bank's expired records first) and return the answer the key
    keeps: a concurrent twin (on this replica or another) that saved first wins the primary key, and its answer
    is returned here too, so both callers get the same one (both did the same write)."""
    mine = StoredResponse(status_code=status_code, body=body)
    with sessions() as s:
        bank_id = _bank_id(s, bank)
        if bank_id is None:
            return mine
        s.execute(delete(IdempotencyRow).where(IdempotencyRow.bank_id == bank_id,
                                               IdempotencyRow.created_at <= _cutoff(ttl_s)))
        s.add(IdempotencyRow(bank_id=bank_id, owner=owner, key=key, request_hash=req_hash, status_code=status_code,
                             response=body, created_at=utcnow()))
        try:
            s.commit()
            return mine
        except IntegrityError:
            s.rollback()
    try:
        first = lookup(sessions, bank, owner, key, req_hash, ttl_s)
    except Conflict:  # a different request won the key meanwhile: this write is done, answer as it went
        return mine
    return first if first is not None else mine


def purge_expired(sessions: sessionmaker[Session], bank: str, ttl_s: float) -> int:
    """Delete the bank's records older than ``ttl_s``; how many there were."""
    with sessions() as s:
        bank_id = _bank_id(s, bank)
        if bank_id is None:
            return 0
        gone = s.execute(delete(IdempotencyRow).where(IdempotencyRow.bank_id == bank_id,
                                                      IdempotencyRow.created_at <= _cutoff(ttl_s)))
        s.commit()
        return int(gone.rowcount)  # type: ignore[attr-defined]
