"""Crash safety: a real server under concurrent ingest and delete is SIGKILLed at random moments.

Each client thread owns a few documents and keeps, per document, the last state the server
acknowledged and the one operation that may be in doubt (sent, no answer: the server died). After
every restart the catalog, the blob files, FAISS and the HTTP answers are checked against that
record: every acknowledged write is there at its acknowledged version (an in-doubt one either fully
applied or not at all), nothing else exists, every live block's blob decodes, FAISS holds exactly
the live blocks, and documents are found by search and answered by a kv query. At the end, orphan
collection leaves exactly the referenced blobs on disk.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from kvstore.codec.format import decode_block
from kvstore.storage.catalog import BlockRow, make_engine
from tests.reliability.procs import ForkServer, record_figures

KILLS = int(os.environ.get("KVRAG_CRASH_KILLS", "20"))
CLIENTS = 4
DOCS_PER_CLIENT = 5
BANK = "crash"
WORDS = ("normans paris seine river light energy glucose raiders norway denmark capital city people region "
         "chemical stored north south harbour ledger archive memory agent").split()


@dataclass(frozen=True)
class DocState:
    """What a document should look like: its text (None: absent) and version."""

    text: str | None
    version: int = 0


@dataclass
class Ledger:
    """Acknowledged state and the in-doubt operation of every document one client owns."""

    acked: dict[str, DocState]
    pending: dict[str, DocState] = field(default_factory=dict)
    acked_writes: int = 0
    refused: int = 0


@dataclass
class Run:
    """Shared state of the clients and the killer."""

    url: str = ""
    generation: int = 0
    up: threading.Event = field(default_factory=threading.Event)
    stop: threading.Event = field(default_factory=threading.Event)
    parked: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(0))
    errors: list[str] = field(default_factory=list)


def _text(rng: random.Random, doc_id: str, revision: int) -> str:
    """A unique short document (one block) that search can find by its own text."""
    words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14)))
    return f"Record {doc_id} revision {revision}: {words}."


def _client(run: Run, ledger: Ledger, seed: int, key: str) -> None:
    """Put new text, re-put the same text, or delete, one owned document at a time, until stopped."""
    rng = random.Random(seed)
    revision = 0
    generation = 0  # the server life this client last worked against (lives start at 1)
    failed = True
    http: httpx.Client | None = None
    while not run.stop.is_set():
        if failed or not run.up.is_set():
            # Park until the next life: an in-doubt operation must be resolved before its document is touched.
            if http is not None:
                http.close()
            run.parked.release()
            while not (run.up.wait(0.05) and run.generation != generation):
                if run.stop.is_set():
                    return
            generation, failed = run.generation, False
            http = httpx.Client(base_url=run.url, timeout=60.0, headers={"Authorization": f"Bearer {key}"})
        assert http is not None
        doc_id = rng.choice(sorted(ledger.acked))
        acked = ledger.acked[doc_id]
        roll = rng.random()
        revision += 1
        if acked.text is not None and roll < 0.25:
            intended = DocState(None)
            request = ("DELETE", f"/v1/banks/{BANK}/documents/{doc_id}", None)
        elif acked.text is not None and roll < 0.35:
            intended = acked  # same text again: a no-op that must not bump the version
            request = ("PUT", f"/v1/banks/{BANK}/documents/{doc_id}", {"text": acked.text})
        else:
            text = _text(rng, doc_id, revision)
            intended = DocState(text, acked.version + 1 if acked.text is not None else 1)
            request = ("PUT", f"/v1/banks/{BANK}/documents/{doc_id}", {"text": text})
        ledger.pending[doc_id] = intended
        try:
            r = http.request(request[0], request[1], json=request[2])
        except httpx.TransportError:
            failed = True  # in doubt: the server died; resolved after the restart
            continue
        if r.status_code in (429, 503):
            ledger.pending.pop(doc_id)
            ledger.refused += 1
            time.sleep(0.05)
            continue
        if r.status_code not in (200, 201, 204):
            run.errors.append(f"{request[0]} {doc_id}: {r.status_code} {r.text[:200]}")
            ledger.pending.pop(doc_id)
            continue
        if request[0] == "PUT" and r.json()["document"]["version"] != intended.version:
            run.errors.append(f"PUT {doc_id}: version {r.json()['document']['version']} != {intended.version}")
        ledger.acked[doc_id] = intended
        ledger.pending.pop(doc_id)
        ledger.acked_writes += 1


def _observed(c: httpx.Client, doc_id: str) -> DocState:
    r = c.get(f"/v1/banks/{BANK}/documents/{doc_id}")
    if r.status_code == 404:
        return DocState(None)
    assert r.status_code == 200, r.text
    return DocState(r.json()["text"], r.json()["version"])


def _reconcile(c: httpx.Client, ledgers: list[Ledger], counts: dict[str, int]) -> None:
    """Every document is at its acknowledged state, or its in-doubt operation applied in full."""
    for ledger in ledgers:
        for doc_id, acked in ledger.acked.items():
            seen = _observed(c, doc_id)
            doubt = ledger.pending.pop(doc_id, None)
            if doubt is not None and doubt != acked:
                counts["in_doubt"] += 1
                if seen == doubt:
                    counts["in_doubt_applied"] += 1
                    ledger.acked[doc_id] = seen
                    continue
            assert seen == acked, f"{doc_id}: server has {seen}, last acknowledged {acked}, in doubt {doubt}"


def _check_server(c: httpx.Client, ledgers: list[Ledger], rng: random.Random) -> None:
    """No phantom or duplicate documents; FAISS holds exactly the live blocks; present documents are
    found by search and a kv query over them answers."""
    expected = {d for ledger in ledgers for d, st in ledger.acked.items() if st.text is not None}
    listed: list[str] = []
    cursor = None
    while True:
        page = c.get(f"/v1/banks/{BANK}/documents", params={"limit": 7, **({"cursor": cursor} if cursor else {})})
        listed += [d["doc_id"] for d in page.json()["documents"]]
        if not (cursor := page.json()["next_cursor"]):
            break
    assert len(listed) == len(set(listed)), f"duplicate documents: {listed}"
    assert set(listed) == expected, f"phantom {set(listed) - expected}, lost {expected - set(listed)}"
    stats = c.get(f"/v1/banks/{BANK}").json()
    assert stats["documents"] == len(expected)
    assert stats["index_entries"] == stats["blocks"], stats
    texts = {d: st.text for ledger in ledgers for d, st in ledger.acked.items() if st.text is not None}
    for doc_id in rng.sample(sorted(texts), min(3, len(texts))):
        hits = c.post(f"/v1/banks/{BANK}/search", json={"query": texts[doc_id], "k": 3}).json()["hits"]
        assert doc_id in [h["doc_id"] for h in hits], (doc_id, hits)
    if texts:
        r = c.post(f"/v1/banks/{BANK}/query", json={"question": "Which record mentions the harbour?", "k": 4,
                                                    "max_new_tokens": 1})
        assert r.status_code == 200, r.text


def _check_blobs(database_url: str, data_dir: Path, fingerprint: str) -> set[str]:
    """Every live block's blob exists and passes its checksum (read while no server runs)."""
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            blob_ids = set(conn.scalars(select(BlockRow.blob_id).where(BlockRow.blob_id.is_not(None))))
    finally:
        engine.dispose()
    for blob_id in blob_ids:
        path = data_dir / "blobs" / blob_id[:2] / blob_id[2:4] / blob_id
        decode_block(path.read_bytes(), fingerprint)
    return blob_ids


def _stored_blobs(data_dir: Path) -> set[str]:
    return {p.name for p in (data_dir / "blobs").glob("*/*/*") if not p.name.startswith(".")}


def _crash_run(fork_server: ForkServer, data_dir: Path, database_url: str | None, backend: str) -> None:
    url = database_url or f"sqlite:///{(data_dir / 'catalog.sqlite3').resolve()}"
    rng = random.Random(1234)
    life = fork_server.start(data_dir, database_url)
    with life.client() as c:
        assert c.post("/v1/banks", json={"name": BANK}).status_code == 201
        key = c.post("/v1/keys", json={"name": "crash", "agent": "crasher", "role": "write",
                                       "banks": [BANK]}).json()["key"]
    run = Run(url=life.url)
    ledgers = [Ledger(acked={f"c{i}-d{j}": DocState(None) for j in range(DOCS_PER_CLIENT)}) for i in range(CLIENTS)]
    threads = [threading.Thread(target=_client, args=(run, ledgers[i], 100 + i, key), daemon=True)
               for i in range(CLIENTS)]
    for t in threads:
        t.start()
    counts = {"in_doubt": 0, "in_doubt_applied": 0}
    started = time.monotonic()
    kills = 0
    try:
        for _ in range(KILLS):
            for _ in threads:  # every client has parked: no request of the last life is still open
                assert run.parked.acquire(timeout=120), "a client did not park"
            with life.client() as c:
                _reconcile(c, ledgers, counts)
                _check_server(c, ledgers, rng)
            run.generation += 1
            run.up.set()
            time.sleep(rng.uniform(0.2, 2.0))
            life.kill()
            run.up.clear()
            kills += 1
            _check_blobs(url, data_dir, fork_server.fingerprint)
            life = fork_server.start(data_dir, database_url)
            run.url = life.url
        for _ in threads:
            assert run.parked.acquire(timeout=120), "a client did not park"
        with life.client() as c:
            _reconcile(c, ledgers, counts)
            _check_server(c, ledgers, rng)
    finally:
        run.stop.set()
        for t in threads:
            t.join(timeout=60)
        if life.alive():
            life.signal(signal.SIGTERM)
            life.wait_dead()
    assert not run.errors, run.errors[:5]
    referenced = _check_blobs(url, data_dir, fork_server.fingerprint)
    orphans_before = len(_stored_blobs(data_dir) - referenced)
    report = fork_server.maintain(data_dir, BANK, database_url)
    assert _stored_blobs(data_dir) == referenced, "orphan blobs survived maintenance, or a referenced one went"
    assert report["orphan_blobs_removed"] == orphans_before
    acked = sum(ledger.acked_writes for ledger in ledgers)
    figures = {"kills": kills, "acknowledged_writes": acked, "documents_lost": 0,
               "in_doubt_operations": counts["in_doubt"], "in_doubt_applied": counts["in_doubt_applied"],
               "refused_busy": sum(ledger.refused for ledger in ledgers),
               "orphan_blobs_collected": orphans_before, "clients": CLIENTS,
               "seconds": round(time.monotonic() - started, 1)}
    print(f"\ncrash safety ({backend}): {figures}")
    record_figures(f"crash_{backend}", figures)
    assert kills >= KILLS and acked > 0


@pytest.mark.slow  # about two minutes per backend on a busy 2-core machine: 20 kills, each restarted and checked
def test_sigkill_under_concurrent_ingest_and_delete_sqlite(fork_server: ForkServer, tmp_path: Path) -> None:
    _crash_run(fork_server, tmp_path / "data", None, "sqlite")


@pytest.mark.slow
@pytest.mark.postgres
def test_sigkill_under_concurrent_ingest_and_delete_postgres(fork_server: ForkServer, tmp_path: Path,
                                                             postgres_url: str) -> None:
    _crash_run(fork_server, tmp_path / "data", postgres_url, "postgres")
