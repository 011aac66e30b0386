"""A SIGKILLed server keeps every acknowledged session append.

An orchestrator appends steps (a tool output and a note each) to one session of a real server process,
one request after another, and the server is SIGKILLed while it works: right after some appends were
acknowledged, with the next one usually in flight. After each restart the session holds exactly the
acknowledged steps, plus the in-doubt one either whole or not at all; its live tokens add up; every KV
page's blob is on disk and decodes; a brief over the whole session works and, once the run is over,
answers exactly like a session built by the same appends on a server that was never killed. Maintenance
then deletes exactly the blobs of the appends that died before their commit.
"""

from __future__ import annotations

import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from kvstore.codec.format import decode_block
from kvstore.storage.catalog import make_engine
from kvstore.storage.local import LocalBlobStore
from kvstore.storage.session_tables import SessionPageRow
from tests.reliability.procs import ForkServer, ServerLife

KILLS = 4
ACKS_BEFORE_KILL = 3  # acknowledged appends per life before the kill
BANK = "agents"
TASK = "Who were the Normans?"
FACTS = ("The Normans gave their name to Normandy.", "Rollo was the first ruler of Normandy.",
         "Norse raiders came from Denmark and Norway.", "Paris lies on the Seine.",
         "Photosynthesis stores light energy in glucose.", "The archive holds ledgers of the harbour.")


def _step(n: int) -> list[dict[str, str]]:
    """Step ``n`` of the trajectory: a tool output and a note (two segments, appended in one request)."""
    return [{"role": "tool", "text": f"Search result {n}: {FACTS[n % len(FACTS)]} (entry {n})"},
            {"role": "note", "text": f"Read result {n}."}]


@dataclass
class Orchestrator:
    """Appends steps until its server dies; keeps what was acknowledged and what is in doubt."""

    acked: list[int] = field(default_factory=list)  # step numbers, in order
    in_doubt: int | None = None
    errors: list[str] = field(default_factory=list)
    acks: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(0))

    def run(self, life: ServerLife, session_id: str, first_step: int) -> None:
        step = first_step
        with life.client(timeout=60.0) as c:
            while True:
                self.in_doubt = step
                try:
                    r = c.post(f"/v1/banks/{BANK}/sessions/{session_id}/append", json={"segments": _step(step)})
                except httpx.TransportError:
                    return  # the server died with this append in flight
                if r.status_code != 200:
                    self.errors.append(f"step {step}: {r.status_code} {r.text[:200]}")
                    return
                self.in_doubt = None
                self.acked.append(step)
                self.acks.release()
                step += 1


def _texts(steps: list[int]) -> list[str]:
    return [seg["text"] for n in steps for seg in _step(n)]


def _referenced(database_url: str) -> set[str]:
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            return set(conn.scalars(select(SessionPageRow.blob_id)))
    finally:
        engine.dispose()


def _check_pages(database_url: str, data_dir: Path, fingerprint: str) -> int:
    """Every KV page of every session has its blob on disk and it decodes (read while no server runs)."""
    blob_ids = _referenced(database_url)
    blobs = LocalBlobStore(data_dir / "session-blobs")
    for blob_id in blob_ids:
        decode_block(blobs.get(blob_id), fingerprint)
    return len(blob_ids)


def _crash_run(fork_server: ForkServer, data_dir: Path, database_url: str | None) -> None:
    url = database_url or f"sqlite:///{(data_dir / 'catalog.sqlite3').resolve()}"
    life = fork_server.start(data_dir, database_url)
    with life.client() as c:
        assert c.post("/v1/banks", json={"name": BANK}).status_code == 201
        assert c.post(f"/v1/banks/{BANK}/sessions", json={"session_id": "run"}).status_code == 201
    orch = Orchestrator()
    steps: list[int] = []  # what the session holds, as the client knows it
    try:
        for _ in range(KILLS):
            orch.acks = threading.Semaphore(0)  # count this life's acknowledgements only
            worker = threading.Thread(target=orch.run, args=(life, "run", len(steps) + 1), daemon=True)
            worker.start()
            for _ in range(ACKS_BEFORE_KILL):
                assert orch.acks.acquire(timeout=120), f"no acknowledgement: {orch.errors}"
            life.kill()  # right after the acknowledgements; the next append is usually in flight
            worker.join(timeout=60)
            assert not orch.errors, orch.errors
            assert _check_pages(url, data_dir, fork_server.fingerprint) > 0

            life = fork_server.start(data_dir, database_url)
            with life.client() as c:
                info = c.get(f"/v1/banks/{BANK}/sessions/run").json()
                texts = [g["text"] for g in info["segments"]]
                acked = steps + [n for n in orch.acked if n not in steps]
                applied = orch.in_doubt is not None and texts == _texts(acked + [orch.in_doubt])
                assert texts == _texts(acked) or applied, f"lost or partial appends: {texts} vs acked {acked}"
                steps = acked + ([orch.in_doubt] if applied and orch.in_doubt is not None else [])
                orch.acked, orch.in_doubt = list(steps), None
                assert info["tokens"] == info["total_tokens"] == sum(g["tokens"] for g in info["segments"])
                assert [g["id"] for g in info["segments"]] == list(range(2 * len(steps)))
                brief = c.post(f"/v1/banks/{BANK}/sessions/run/brief", json={"task": TASK, "max_new_tokens": 4})
                assert brief.status_code == 200, brief.text
                assert brief.json()["kept_tokens"] == brief.json()["session_tokens"] == info["tokens"]

        # A session built by the same appends on a life that is not killed answers the same: the KV survived.
        with life.client() as c:
            assert c.post(f"/v1/banks/{BANK}/sessions", json={"session_id": "replay"}).status_code == 201
            for n in steps:
                r = c.post(f"/v1/banks/{BANK}/sessions/replay/append", json={"segments": _step(n)})
                assert r.status_code == 200, r.text
            answers = [c.post(f"/v1/banks/{BANK}/sessions/{sid}/brief",
                              json={"task": TASK, "max_new_tokens": 6}).json() for sid in ("run", "replay")]
            assert answers[0]["session_tokens"] == answers[1]["session_tokens"]
            assert answers[0]["answer"] == answers[1]["answer"]
    finally:
        if life.alive():
            life.signal(signal.SIGTERM)
            life.wait_dead()
    assert len(steps) >= KILLS * ACKS_BEFORE_KILL
    # Appends killed before their commit left blobs no page names; maintenance collects exactly those.
    referenced = _referenced(url)
    stored = set(LocalBlobStore(data_dir / "session-blobs").ids())
    assert referenced <= stored
    report = fork_server.maintain(data_dir, BANK, database_url)
    assert report["session_orphan_blobs_removed"] == len(stored - referenced)
    assert set(LocalBlobStore(data_dir / "session-blobs").ids()) == referenced


@pytest.mark.slow  # a few kills and restarts of a real server process
def test_sigkill_keeps_every_acknowledged_session_append_sqlite(fork_server: ForkServer, tmp_path: Path) -> None:
    _crash_run(fork_server, tmp_path / "data", None)


@pytest.mark.slow
@pytest.mark.postgres
def test_sigkill_keeps_every_acknowledged_session_append_postgres(fork_server: ForkServer, tmp_path: Path,
                                                                  postgres_url: str) -> None:
    _crash_run(fork_server, tmp_path / "data", postgres_url)
