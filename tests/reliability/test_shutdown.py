"""Graceful shutdown: SIGTERM drains the requests in flight, then snapshots every index, so the next
start replays nothing and loses nothing."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

from sqlalchemy import func, select

from kvstore.storage.catalog import OpLogRow, make_engine
from tests.reliability.procs import ForkServer
from tests.reliability.serve_tiny import ADMIN_KEY

IN_FLIGHT = 6


def test_sigterm_drains_in_flight_requests_and_restart_replays_nothing(fork_server: ForkServer,
                                                                       tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    life = fork_server.start(data_dir)
    with life.client() as c:
        assert c.post("/v1/banks", json={"name": "drain"}).status_code == 201
        key = c.post("/v1/keys", json={"name": "w", "agent": "writer", "role": "write",
                                       "banks": ["drain"]}).json()["key"]
        for i in range(3):
            assert c.put(f"/v1/banks/drain/documents/before-{i}", json={"text": f"Early note {i}."}).status_code == 201
    answers: dict[str, int] = {}

    def put(i: int) -> None:
        with life.client(key=key, timeout=60) as c:
            text = f"Note {i} written while the server was asked to stop. " * 20
            answers[f"late-{i}"] = c.put(f"/v1/banks/drain/documents/late-{i}", json={"text": text}).status_code

    threads = [threading.Thread(target=put, args=(i,)) for i in range(IN_FLIGHT)]
    for t in threads:
        t.start()
    with life.client(key=None) as c:  # wait until the model worker holds several of them
        deadline = time.monotonic() + 30
        while c.get("/readyz").json()["queue_depth"] < 3 and time.monotonic() < deadline:
            time.sleep(0.005)
    life.signal(signal.SIGTERM)
    for t in threads:
        t.join(timeout=90)
    life.wait_dead()
    log = life.log_text()
    assert answers and all(code == 201 for code in answers.values()), answers
    assert "store closed" in log
    assert ADMIN_KEY not in log and key not in log  # secrets are never logged, access log included

    engine = make_engine(f"sqlite:///{(data_dir / 'catalog.sqlite3').resolve()}")
    with engine.connect() as conn:
        last_seq = conn.scalar(select(func.max(OpLogRow.seq)))
    engine.dispose()
    snapshots = [json.loads(p.read_text()) for p in (data_dir / "indexes").glob("*.json")]
    assert len(snapshots) == 1 and snapshots[0]["seq"] == last_seq  # the snapshot includes every write

    life = fork_server.start(data_dir)
    try:
        with life.client() as c:
            assert c.get("/readyz").json()["integrity"] == {}
            docs = c.get("/v1/banks/drain/documents").json()["documents"]
            assert sorted(d["doc_id"] for d in docs) == sorted([f"before-{i}" for i in range(3)] + list(answers))
            assert all(d["version"] == 1 for d in docs)
            stats = c.get("/v1/banks/drain").json()
            assert stats["index_entries"] == stats["blocks"] == snapshots[0]["count"]
    finally:
        life.signal(signal.SIGTERM)
        life.wait_dead()
    assert "replayed" not in life.log_text() and "rebuilt from the catalog" not in life.log_text()

