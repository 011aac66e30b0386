"""Three ``kvrag serve`` replicas as real processes on one PostgreSQL and one SeaweedFS act as one service.

Writers spread over the replicas and a reader on each: every acknowledged document becomes searchable on every
replica within the staleness bound (deletes too); two concurrent If-Match writes on different replicas: exactly
one wins; an Idempotency-Key replayed on another replica gets the first answer; a replica killed with SIGKILL in
the middle of writes loses no acknowledged document, and comes back on its data dir at once.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.reliability.procs import ForkServer, ServerLife

pytestmark = pytest.mark.postgres

BANK = "team"
STALENESS_S = 1.0
REPLICAS = 3
WORDS = ("normans paris seine river light energy glucose raiders norway denmark capital city people region "
         "chemical stored north south harbour ledger archive memory agent").split()


@dataclass
class Acked:
    doc_id: str
    text: str
    at: float  # monotonic time of the acknowledgement


@dataclass
class Board:
    """What the writers had acknowledged, and when each reader first saw each document."""

    acked: list[Acked] = field(default_factory=list)
    lags: dict[int, dict[str, float]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    writing_done: threading.Event = field(default_factory=threading.Event)


def _text(rng: random.Random, doc_id: str) -> str:
    return f"Record {doc_id}: " + " ".join(rng.choice(WORDS) for _ in range(10)) + "."


def _found(c: httpx.Client, doc_id: str, text: str) -> bool:
    r = c.post(f"/v1/banks/{BANK}/search", json={"query": text, "k": 3, "retrieval": "embedding"})
    assert r.status_code == 200, r.text
    return doc_id in [h["doc_id"] for h in r.json()["hits"]]


@dataclass
class Cluster:
    """The replicas of one test; :meth:`start` (re)starts replica ``i`` on its own data dir."""

    fork_server: ForkServer
    database_url: str
    bucket: str
    env: dict[str, str]
    root: Path
    lives: list[ServerLife] = field(default_factory=list)

    def start(self, i: int) -> ServerLife:
        life = self.fork_server.start(self.root / f"replica-{i}", self.database_url, env=self.env,
                                      blob_url=f"s3://{self.bucket}/kv", replica_staleness_s=STALENESS_S)
        if i < len(self.lives):
            self.lives[i] = life
        else:
            self.lives.append(life)
        return life


@pytest.fixture
def cluster(fork_server: ForkServer, postgres_url: str, s3_bucket: str, s3_env: dict[str, str],
            tmp_path: Path) -> Iterator[Cluster]:
    cluster = Cluster(fork_server, postgres_url, s3_bucket, s3_env, tmp_path)
    try:
        for i in range(REPLICAS):
            cluster.start(i)
        yield cluster
    finally:
        for life in cluster.lives:
            if life.alive():
                life.kill()


def _writer(board: Board, clients: list[httpx.Client], w: int, n: int) -> None:
    rng = random.Random(w)
    for i in range(n):
        doc_id = f"w{w}-{i}"
        text = _text(rng, doc_id)
        r = clients[(w + i) % len(clients)].put(f"/v1/banks/{BANK}/documents/{doc_id}", json={"text": text})
        assert r.status_code == 201, r.text
        with board.lock:
            board.acked.append(Acked(doc_id, text, time.monotonic()))


def _reader(board: Board, c: httpx.Client, replica: int) -> None:
    """Watch this replica's index grow: once it holds k entries, the k-th acknowledged document (one block each)
    counts as arrived, at the end of the request that saw it (an upper bound on its lag). A bank's stats are
    read from the catalog and the index: milliseconds, where a search would add its embedding (up to a second on
    this busy box) to every measurement."""
    lags = board.lags.setdefault(replica, {})
    while True:
        done = board.writing_done.is_set()
        n = c.get(f"/v1/banks/{BANK}").json()["index_entries"]
        now = time.monotonic()
        with board.lock:
            for a in board.acked[:n]:
                lags.setdefault(a.doc_id, now - a.at)
            if done and len(lags) == len(board.acked):
                return
        time.sleep(0.005)


def _metrics(c: httpx.Client) -> dict[str, float]:
    r = c.get("/metrics")
    assert r.status_code == 200, r.text
    return {line.split()[0]: float(line.split()[1]) for line in r.text.splitlines()
            if line and not line.startswith("#") and "{" not in line.split()[0]}


def test_replicas_act_as_one_service(cluster: Cluster) -> None:
    lives = cluster.lives
    clients = [life.client() for life in lives]
    assert clients[0].post("/v1/banks", json={"name": BANK}).status_code == 201

    # -- writers spread over the replicas, a reader on each ------------------------------------------------------
    board = Board()
    readers = [threading.Thread(target=_reader, args=(board, lives[r].client(), r)) for r in range(REPLICAS)]
    writers = [threading.Thread(target=_writer, args=(board, clients, w, 6)) for w in range(REPLICAS)]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join()
    board.writing_done.set()
    for t in readers:
        t.join()
    lags = sorted(lag for per in board.lags.values() for lag in per.values())
    assert len(lags) == REPLICAS * len(board.acked) == REPLICAS * REPLICAS * 6
    assert lags[-1] <= STALENESS_S, f"slowest document reached a replica's index after {lags[-1]:.2f} s"
    for c in clients:  # and every one of them is found by search on every replica
        for a in board.acked:
            assert _found(c, a.doc_id, a.text), a.doc_id
    metrics = _metrics(clients[1])  # what an operator watches on each replica
    assert metrics["kvrag_replica_ops_applied_total"] >= 2 * 6  # the other two writers' documents at least
    assert metrics["kvrag_replica_catchup_age_seconds"] <= STALENESS_S
    assert "kvrag_blob_fetches_total" in metrics

    # -- deletes on one replica disappear from the others --------------------------------------------------------
    gone = board.acked[:3]
    for i, a in enumerate(gone):
        assert clients[i % REPLICAS].delete(f"/v1/banks/{BANK}/documents/{a.doc_id}").status_code == 204
    t0 = time.monotonic()
    for c in clients:
        while any(_found(c, a.doc_id, a.text) for a in gone):
            assert time.monotonic() - t0 < 10 * STALENESS_S, "a delete did not reach every replica"
            time.sleep(0.02)
    delete_lag = time.monotonic() - t0
    assert all(c.get(f"/v1/banks/{BANK}").json()["documents"] == len(board.acked) - 3 for c in clients)

    # -- two concurrent If-Match writes on different replicas: exactly one wins -----------------------------------
    assert clients[0].put(f"/v1/banks/{BANK}/documents/contested", json={"text": "Version one."}).status_code == 201
    for round_ in range(3):
        version = round_ + 1
        barrier = threading.Barrier(2)
        codes: dict[int, int] = {}

        def contend(r: int, version: int = version, barrier: threading.Barrier = barrier,
                    codes: dict[int, int] = codes, round_: int = round_) -> None:
            barrier.wait()
            codes[r] = clients[r].put(f"/v1/banks/{BANK}/documents/contested", headers={"If-Match": str(version)},
                                      json={"text": f"Round {round_} by replica {r}."}).status_code

        pair = [threading.Thread(target=contend, args=(r,)) for r in (1, 2)]
        for t in pair:
            t.start()
        for t in pair:
            t.join()
        assert sorted(codes.values()) == [200, 409], codes
        winner = next(r for r, code in codes.items() if code == 200)
        doc = clients[0].get(f"/v1/banks/{BANK}/documents/contested").json()
        assert (doc["version"], doc["text"]) == (version + 1, f"Round {round_} by replica {winner}.")

    # -- an Idempotency-Key holds across replicas ----------------------------------------------------------------
    first = clients[0].put(f"/v1/banks/{BANK}/documents/once", json={"text": "Written once."},
                           headers={"Idempotency-Key": "k-1"})
    replay = clients[1].put(f"/v1/banks/{BANK}/documents/once", json={"text": "Written once."},
                            headers={"Idempotency-Key": "k-1"})
    assert first.status_code == replay.status_code == 201 and replay.json() == first.json()
    misuse = clients[2].put(f"/v1/banks/{BANK}/documents/once", json={"text": "Something else."},
                            headers={"Idempotency-Key": "k-1"})
    assert misuse.status_code == 409
    assert clients[2].get(f"/v1/banks/{BANK}/documents/once").json()["version"] == 1

    # -- kill -9 of one replica during writes: nothing acknowledged is lost -----------------------------------------
    acked: list[Acked] = []
    stop = threading.Event()

    def keep_writing(w: int) -> None:
        rng = random.Random(100 + w)
        i = 0
        while not stop.is_set():
            doc_id, i = f"k{w}-{i}", i + 1
            text = _text(rng, doc_id)
            try:
                r = clients[(w + i) % REPLICAS].put(f"/v1/banks/{BANK}/documents/{doc_id}", json={"text": text})
            except httpx.TransportError:
                continue  # the killed replica: in doubt, never acknowledged
            if r.status_code == 201:
                acked.append(Acked(doc_id, text, time.monotonic()))

    killers = [threading.Thread(target=keep_writing, args=(w,)) for w in range(REPLICAS)]
    for t in killers:
        t.start()
    while len(acked) < 10:
        time.sleep(0.05)
    lives[2].kill()
    before_kill = len(acked)
    time.sleep(1.0)
    stop.set()
    for t in killers:
        t.join()
    assert len(acked) > before_kill, "the surviving replicas stopped acknowledging writes"
    survivors = clients[:2]
    for c in survivors:
        for a in acked:
            got = c.get(f"/v1/banks/{BANK}/documents/{a.doc_id}")
            assert got.status_code == 200 and got.json()["text"] == a.text, (a.doc_id, got.text)
    t0 = time.monotonic()
    for c in survivors:
        for a in acked:
            while not _found(c, a.doc_id, a.text):
                assert time.monotonic() - t0 < 10 * STALENESS_S, f"{a.doc_id} not searchable"
    # The killed replica comes back on its own data dir at once (its lock died with it) and serves everything.
    c = cluster.start(2).client()
    for a in acked + board.acked[3:]:
        assert _found(c, a.doc_id, a.text), a.doc_id
    print(f"replicas={REPLICAS} documents={len(board.acked)} visible p50={lags[len(lags) // 2]:.3f} s "
          f"max={lags[-1]:.3f} s delete={delete_lag:.3f} s acked around the kill={len(acked)} lost=0")
