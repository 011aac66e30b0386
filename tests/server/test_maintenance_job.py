"""Maintenance of a bank of 1,000 documents is a job (issue 31): the request answers 202 at once, progress
moves while it runs, and the report equals what the synchronous maintenance returned before, computed by
the engine directly on an identical copy of the bank."""

from __future__ import annotations

import shutil
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import update

from kvstore.bank import BankStore
from kvstore.model.loader import Embedder, LoadedModel
from kvstore.storage import idempotency
from kvstore.storage.catalog import DocumentRow, utcnow
from server.settings import ServerSettings
from tests.server_harness import ADMIN_KEY, live_server

DOCS = 1000
BANK = "big"
OPTIONS = {"rebuild": True}  # every step: expire, idempotency, reencode, merge, evict, gc, rebuild


def _build(data_dir: Path, llm: LoadedModel, embedder: Embedder) -> None:
    """1,000 tiny documents; 25 past their expiry; most blocks evicted cold and then room made, so the
    re-encode step has real work; the store is closed so its directory can be copied."""
    store = BankStore(ServerSettings(data_dir=data_dir, admin_key=ADMIN_KEY), llm=llm, embedder=embedder)
    store.create_bank(BANK)
    for i in range(DOCS):
        store.put_document(BANK, f"d{i:04d}", f"Item {i} is {['red', 'blue', 'green', 'gold'][i % 4]}.")
    with store.session() as s:
        s.execute(update(DocumentRow).where(DocumentRow.doc_id.in_([f"d{i:04d}" for i in range(0, DOCS, 40)]))
                  .values(expires_at=utcnow() - timedelta(minutes=1)))
        s.commit()
    store.update_bank(BANK, max_blocks=200)  # evicts at once: 800 blocks go cold
    store.update_bank(BANK, max_blocks=600)  # room for maintenance to re-warm 400 of them
    store.close()


def _synchronous_report(store: BankStore) -> dict[str, Any]:
    """What ``POST /maintenance`` answered before it became a job (the old route's ``_maintain``)."""
    report = store.maintain(BANK)
    report["idempotency_expired"] = idempotency.purge_expired(store.sessions, BANK, store.settings.idempotency_ttl_s)
    report["verify"] = store.verify(BANK)
    return report


def test_maintenance_of_1000_documents_answers_at_once_moves_and_matches_the_synchronous_report(
        tmp_path: Path, tiny_llm: LoadedModel, embedder: Embedder) -> None:
    served, copy = tmp_path / "served", tmp_path / "copy"
    _build(served, tiny_llm, embedder)
    shutil.copytree(served, copy)

    with live_server("sqlite", served, tiny_llm, embedder, job_poll_s=0.05) as live, live.admin() as c:
        r = c.post(f"/v1/banks/{BANK}/maintenance", json=OPTIONS)
        assert r.status_code == 202, r.text
        # The answer came before the work was done (no timing: speed lives in benchmarks): the job it names is
        # still queued, and the first poll still finds steps left.
        accepted = r.json()
        assert accepted["status"] == "queued", accepted
        first = c.get(f"/v1/jobs/{accepted['job_id']}").json()
        assert first["status"] in ("queued", "running") and first["done"] < first["total"], first
        job_id = accepted["job_id"]
        seen: list[tuple[str, int, str | None]] = []
        deadline = time.monotonic() + 300
        while True:
            job = c.get(f"/v1/jobs/{job_id}").json()
            if not seen or seen[-1] != (job["status"], job["done"], job["step"]):
                seen.append((job["status"], job["done"], job["step"]))
            if job["status"] not in ("queued", "running"):
                break
            assert time.monotonic() < deadline, job
            time.sleep(0.005)
    assert job["status"] == "succeeded", job
    assert job["total"] == 7 and job["done"] == 7
    running = [(done, step) for status, done, step in seen if status == "running"]
    dones = [done for done, _ in running]
    assert dones == sorted(dones) and len(set(dones)) >= 2, seen  # progress moved while it ran
    assert {"reencode", "rebuild"} <= {step for _, step in running}, seen

    store = BankStore(ServerSettings(data_dir=copy, admin_key=ADMIN_KEY), llm=tiny_llm, embedder=embedder)
    try:
        expected = _synchronous_report(store)
    finally:
        store.close()
    assert job["result"] == expected
    assert len(expected["expired_documents"]) == 25 and expected["reencoded"] > 0  # the run did real work
    assert expected["verify"]["checked"] > 0
