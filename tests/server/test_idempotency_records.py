"""Idempotency records are bound to the key that made them and expire (issue 26, hole 10e): the same
Idempotency-Key sent by another key is another record (no replay of the first key's answer, no conflict
with it); a record older than KVRAG_IDEMPOTENCY_TTL_S is ignored, replaced, and purged by maintenance; the
migration carries old records over."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, inspect, select, text, update

from kvstore.storage.catalog import IdempotencyRow, upgrade, utcnow
from tests.server_harness import LiveServer, live_server, maintain, make_key

BANK = "idem"
T1 = "The harbour ledger is kept in the archive."
T2 = "The lighthouse keeper logs every ship that passes."
T3 = "The archive moved to the customs house in spring."


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, tiny_llm, embedder) -> Iterator[LiveServer]:
    with live_server("sqlite", tmp_path_factory.mktemp("idem"), tiny_llm, embedder) as server:
        with server.admin() as c:
            assert c.post("/v1/banks", json={"name": BANK}).status_code == 201
        yield server


@pytest.fixture(scope="module")
def keys(live: LiveServer) -> dict[str, str]:
    return {name: make_key(live, role="write", banks=[BANK], agent=name, name=name)["key"]
            for name in ("ann", "bob", "cat")}


def _put(live: LiveServer, key: str, doc: str, text_: str, idem: str) -> tuple[int, dict]:
    with live.client(key) as c:
        r = c.put(f"/v1/banks/{BANK}/documents/{doc}", json={"text": text_}, headers={"Idempotency-Key": idem})
    return r.status_code, r.json()


def _records(live: LiveServer, idem: str) -> int:
    with live.store.session() as s:
        return int(s.scalar(select(func.count()).select_from(IdempotencyRow).where(IdempotencyRow.key == idem)))


def test_another_key_neither_replays_nor_conflicts(live: LiveServer, keys: dict[str, str]) -> None:
    status, first = _put(live, keys["ann"], "d1", T1, "retry-1")
    assert status == 201 and first["document"]["agent"] == "ann"
    # A different request under Ann's Idempotency-Key from Bob is no conflict with her record.
    status, other = _put(live, keys["bob"], "d2", T2, "retry-1")
    assert status == 201 and other["document"]["agent"] == "bob", other
    # Cat sends Ann's very request under her Idempotency-Key: his own write runs (the text is already there:
    # a no-op), he does not get Ann's stored answer.
    status, cats = _put(live, keys["cat"], "d1", T1, "retry-1")
    assert status == 200 and cats["created"] is False, cats
    # Ann's own retry still replays her answer; her key on another request still conflicts.
    assert _put(live, keys["ann"], "d1", T1, "retry-1") == (201, first)
    status, clash = _put(live, keys["ann"], "d2", T2, "retry-1")
    assert status == 409 and clash["code"] == "conflict"
    assert _records(live, "retry-1") == 3


def test_expired_records_are_ignored_replaced_and_purged(live: LiveServer, keys: dict[str, str]) -> None:
    status, _ = _put(live, keys["ann"], "d3", T1, "retry-2")
    assert status == 201
    _age(live, "retry-2", live.settings.idempotency_ttl_s + 60)
    # Past its lifetime the record no longer answers: the same key on another request is a new write.
    status, out = _put(live, keys["ann"], "d3", T3, "retry-2")
    assert status == 200 and out["changed"] is True and out["document"]["version"] == 2, out
    assert _records(live, "retry-2") == 1
    status, _ = _put(live, keys["bob"], "d4", T2, "retry-3")
    assert status == 201
    _age(live, "retry-3", live.settings.idempotency_ttl_s + 60)
    with live.admin() as c:
        report = maintain(c, BANK, merge=False)
    assert report["idempotency_expired"] == 1
    assert _records(live, "retry-3") == 0 and _records(live, "retry-2") == 1


def _age(live: LiveServer, idem: str, seconds: float) -> None:
    with live.store.session() as s:
        s.execute(update(IdempotencyRow).where(IdempotencyRow.key == idem)
                  .values(created_at=utcnow() - timedelta(seconds=seconds)))
        s.commit()


def test_the_migration_keeps_old_records(tmp_path: Path) -> None:
    from alembic import command
    from alembic.config import Config

    url = f"sqlite:///{tmp_path / 'catalog.sqlite3'}"
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).resolve().parents[2] / "migrations"))
    cfg.set_main_option("sqlalchemy.url", url)
    command.upgrade(cfg, "0006")
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO banks (name, model_fingerprint, model_name, codec, block_tokens, eviction, "
                          "evictions, merges, created_at, updated_at) VALUES ('b', 'f', 'm', 'int8', 256, 'lru', "
                          "0, 0, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"))
        conn.execute(text("INSERT INTO idempotency_keys (bank_id, key, request_hash, status_code, response, "
                          "created_at) VALUES (1, 'old', 'h', 201, '{}', CURRENT_TIMESTAMP)"))
    upgrade(url)
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT bank_id, owner, key, status_code FROM idempotency_records")).all()
    assert rows == [(1, "", "old", 201)]
    assert inspect(engine).get_pk_constraint("idempotency_records")["constrained_columns"] == [
        "bank_id", "owner", "key"]
    engine.dispose()
