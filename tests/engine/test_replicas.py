"""Replicas on one PostgreSQL catalog and one object store (issue 28), in one process: two ``BankStore``s, each
with its own data dir, as two ``kvrag serve`` replicas have. The multi-process version with real servers is
tests/reliability/test_replicas_procs.py."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, text, update

from kvstore.bank import BankStore
from kvstore.config import Settings
from kvstore.errors import VersionMismatch
from kvstore.model.loader import Embedder, LoadedModel
from kvstore.storage import idempotency
from kvstore.storage.catalog import BlockRow, DocumentRow, ReplicaRow, make_engine, upgrade, utcnow
from kvstore.storage.replication import ReplicaRefused, blob_gc_lock, claim_version

pytestmark = pytest.mark.postgres

ROOT = Path(__file__).resolve().parents[2]
STALENESS_S = 1.0


@pytest.fixture
def replicas(tmp_path: Path, tiny_llm: LoadedModel, embedder: Embedder, postgres_url: str, s3_bucket: str,
             s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., BankStore]]:
    """``open(name)``: a replica with data dir ``name`` on the test's PostgreSQL database and bucket."""
    for key, value in s3_env.items():
        monkeypatch.setenv(key, value)
    opened: list[BankStore] = []

    def open_replica(name: str, llm: LoadedModel | None = None, **settings: object) -> BankStore:
        store = BankStore(Settings(data_dir=tmp_path / name, database_url=postgres_url,
                                   blob_url=f"s3://{s3_bucket}/kv", replica_staleness_s=STALENESS_S, **settings),
                          llm=llm or tiny_llm, embedder=embedder)
        opened.append(store)
        return store

    yield open_replica
    for store in opened:
        store.close()


def _until(check: Callable[[], bool], timeout_s: float) -> float:
    """Seconds until ``check()`` held; fails the test past ``timeout_s``."""
    t0 = time.monotonic()
    while not check():
        if time.monotonic() - t0 > timeout_s:
            pytest.fail(f"not true within {timeout_s} s")
        time.sleep(0.01)
    return time.monotonic() - t0


def test_writes_updates_and_deletes_reach_the_other_replica_within_the_bound(
        replicas: Callable[..., BankStore]) -> None:
    a, b = replicas("a"), replicas("b")
    a.create_bank("shared")
    b.search("shared", "warm the index up", k=1)  # b has the bank's index loaded: only the op log can change it
    a.put_document("shared", "normans", "The Normans gave their name to Normandy, a region in France.")
    # Timed on b's index (a search here takes up to a second on a busy 2-core box, which would hide the lag).
    seen = _until(lambda: b.stats("shared").index_entries == 1, 10 * STALENESS_S)
    assert seen <= STALENESS_S, f"a write took {seen:.2f} s to reach the other replica"
    assert [h.doc_id for h in b.search("shared", "Normandy", k=1)] == ["normans"]
    # The reader answers from the writer's blocks in the shared object store.
    assert b.query("shared", "Where is Normandy?", k=1, max_new_tokens=2).sources[0].doc_id == "normans"

    a.put_document("shared", "normans", "Photosynthesis converts light energy into chemical energy.")
    _until(lambda: "Photosynthesis" in b.search("shared", "light energy", k=1)[0].text, 10 * STALENESS_S)
    assert b.stats("shared").index_entries == 1  # the old version's block left b's index too

    b.put_document("shared", "paris", "Paris is the capital of France.")
    a.delete_document("shared", "normans")
    _until(lambda: [h.doc_id for h in b.search("shared", "energy", k=5)] == ["paris"], 10 * STALENESS_S)
    _until(lambda: [h.doc_id for h in a.search("shared", "capital", k=5)] == ["paris"], 10 * STALENESS_S)


def test_concurrent_if_match_writes_on_two_replicas_exactly_one_wins(replicas: Callable[..., BankStore]) -> None:
    a, b = replicas("a"), replicas("b")
    a.create_bank("race")
    a.put_document("race", "doc", "The first version of the document.")
    for round_ in range(4):
        version = a.get_document("race", "doc").version
        barrier = threading.Barrier(2)
        outcome: dict[str, str] = {}

        def write(store: BankStore, name: str, version: int = version, barrier: threading.Barrier = barrier,
                  outcome: dict[str, str] = outcome, round_: int = round_) -> None:
            barrier.wait()
            try:
                store.put_document("race", "doc", f"Round {round_}: written by replica {name}.", if_match=version)
                outcome[name] = "won"
            except VersionMismatch:
                outcome[name] = "lost"

        threads = [threading.Thread(target=write, args=(s, n)) for s, n in ((a, "a"), (b, "b"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(outcome.values()) == ["lost", "won"], outcome
        winner = next(n for n, o in outcome.items() if o == "won")
        doc = b.get_document("race", "doc")
        assert doc.version == version + 1 and doc.text == f"Round {round_}: written by replica {winner}."
        with a.session() as s:  # the loser left nothing behind: one version's blocks
            assert s.scalar(select(func.count()).select_from(BlockRow).join(
                DocumentRow, DocumentRow.id == BlockRow.document_id).where(DocumentRow.doc_id == "doc")) == doc.blocks


def test_claim_version_is_a_conditional_update_the_database_enforces(replicas: Callable[..., BankStore]) -> None:
    a = replicas("a")
    a.create_bank("cas")
    a.put_document("cas", "doc", "Some text.")
    first, second = a.sessions(), a.sessions()
    doc1 = first.scalar(select(DocumentRow).where(DocumentRow.doc_id == "doc"))
    doc2 = second.scalar(select(DocumentRow).where(DocumentRow.doc_id == "doc"))
    assert doc1 is not None and doc2 is not None and doc1.version == doc2.version == 1
    assert claim_version(first, doc1, 1)
    result: list[bool] = []
    waiter = threading.Thread(target=lambda: result.append(claim_version(second, doc2, 1)))
    waiter.start()
    time.sleep(0.3)
    assert waiter.is_alive(), "the second conditional write did not wait for the first's row lock"
    first.commit()
    waiter.join(10)
    assert result == [False]  # it re-checked the version after the first committed
    second.rollback()
    first.close()
    second.close()
    assert a.get_document("cas", "doc").version == 2


def test_orphan_collection_never_deletes_a_blob_another_replica_is_about_to_reference(
        replicas: Callable[..., BankStore]) -> None:
    a, b = replicas("a"), replicas("b")
    a.create_bank("gc")
    a.put_document("gc", "doc", "A document whose block another writer will rewrite.")
    a.memory.config.orphan_grace_s = 0.0  # no grace: only the collection lock protects the blob
    fresh = os.urandom(4096)
    with b.session() as writer:
        blob_gc_lock(writer, exclusive=False)  # what put_document does before its (re)puts
        blob_id = b.blobs.put(fresh)
        writer.execute(update(BlockRow).values(blob_id=blob_id))  # referenced once this commits
        time.sleep(1.5)  # both blobs older than the store's 1 s timestamp resolution: collectable but for the lock
        collected: list[int] = []
        gc = threading.Thread(target=lambda: collected.append(a.memory.collect_orphans()))
        gc.start()
        time.sleep(0.5)
        assert gc.is_alive(), "collection did not wait for the writer's transaction"
        writer.commit()
    gc.join(30)
    assert a.blobs.exists(blob_id) and a.blobs.get(blob_id) == fresh
    assert collected == [1]  # the block's previous blob, unreferenced once the writer committed


def test_an_in_flight_blob_younger_than_the_grace_period_survives(replicas: Callable[..., BankStore]) -> None:
    a, b = replicas("a"), replicas("b")
    a.create_bank("grace")
    in_flight = b.blobs.put(os.urandom(2048))  # an ingest on b wrote its blob and has not committed yet
    assert a.memory.collect_orphans() == 0 and a.blobs.exists(in_flight)


def test_a_replica_with_another_model_is_refused_at_start(replicas: Callable[..., BankStore], postgres_url: str,
                                                          tiny_llm: LoadedModel) -> None:
    a = replicas("a")
    engine = make_engine(postgres_url)
    with engine.begin() as conn:  # a live replica on another machine, serving another model
        conn.execute(ReplicaRow.__table__.insert().values(
            id="other", host="gpu-box-7", pid=4242, model_fingerprint="f" * 64, model_name="another-model",
            blob_url=a.settings.blob_url, started_at=utcnow(), heartbeat_at=utcnow()))
    with pytest.raises(ReplicaRefused, match=r"gpu-box-7:4242 serves this catalog with model 'another-model'"):
        replicas("b")
    with engine.begin() as conn:  # the same replica, silent for longer than 3 heartbeats: gone
        conn.execute(update(ReplicaRow).where(ReplicaRow.id == "other").values(
            heartbeat_at=utcnow() - timedelta(minutes=5)))
    replicas("c")
    with engine.begin() as conn:  # a replica on this host whose process is gone (kill -9) does not count either
        conn.execute(ReplicaRow.__table__.insert().values(
            id="killed", host=socket.gethostname(), pid=_dead_pid(), model_fingerprint="e" * 64, model_name="x",
            blob_url=a.settings.blob_url, started_at=utcnow(), heartbeat_at=utcnow()))
    replicas("d")
    with engine.begin() as conn:  # another blob store is refused like another model
        conn.execute(ReplicaRow.__table__.insert().values(
            id="elsewhere", host="gpu-box-8", pid=1, model_fingerprint=tiny_llm.fingerprint, model_name="tiny",
            blob_url="s3://another-bucket/kv", started_at=utcnow(), heartbeat_at=utcnow()))
    with pytest.raises(ReplicaRefused, match="replicas share one blob store"):
        replicas("e")
    engine.dispose()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_replicas_starting_together_migrate_once(postgres_url: str) -> None:
    errors: list[BaseException] = []

    def migrate() -> None:
        try:
            upgrade(postgres_url)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=migrate) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    engine = make_engine(postgres_url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 1
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0011_replicas"
    engine.dispose()


def test_an_idempotency_key_keeps_the_first_answer_across_replicas(replicas: Callable[..., BankStore]) -> None:
    a, b = replicas("a"), replicas("b")
    a.create_bank("idem")
    ttl = 86400.0  # the server's default KVRAG_IDEMPOTENCY_TTL_S
    h = idempotency.request_hash("PUT", "/v1/banks/idem/documents/d", {"text": "x"})
    # Two twins of one request ran on two replicas at once; the one that saves second gets the first's answer.
    first = idempotency.save(a.sessions, "idem", "root", "key-1", h, 201, {"document": {"version": 1}}, ttl)
    second = idempotency.save(b.sessions, "idem", "root", "key-1", h, 200, {"document": {"version": 1}, "n": 2}, ttl)
    assert (first.status_code, first.body) == (second.status_code, second.body) == (201, {"document": {"version": 1}})
    replay = idempotency.lookup(b.sessions, "idem", "root", "key-1", h, ttl)
    assert replay is not None and (replay.status_code, replay.body) == (201, {"document": {"version": 1}})
