"""A real uvicorn server on a free port, in a background thread, over a tiny-model BankStore."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from kvstore.bank import BankStore
from kvstore.model.loader import Embedder, LoadedModel
from server.app import create_app
from server.settings import ServerSettings
from server.testing import LiveServer, serve  # noqa: F401  (re-exported for tests)
from server.worker import released_turn

ADMIN_KEY = "test-admin-key-0123456789"
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


@contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh PostgreSQL database for a module, dropped afterwards; skips when the server is unreachable."""
    import psycopg

    name = f"kvrag_srv_{uuid.uuid4().hex[:10]}"
    try:
        with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=3) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL at 127.0.0.1:5432 is not reachable: {exc}")
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def live_server(backend: str, data_dir: Path, llm: LoadedModel, embedder: Embedder,
                **settings: Any) -> Iterator[LiveServer]:
    """A started server on SQLite or a throwaway PostgreSQL database."""
    settings.setdefault("admin_key", ADMIN_KEY)
    if backend == "postgres":
        with postgres_database() as url:
            with _serve_store(ServerSettings(data_dir=data_dir, database_url=url, **settings), llm, embedder) as live:
                yield live
    else:
        with _serve_store(ServerSettings(data_dir=data_dir, **settings), llm, embedder) as live:
            yield live


@contextmanager
def _serve_store(settings: ServerSettings, llm: LoadedModel, embedder: Embedder) -> Iterator[LiveServer]:
    store = BankStore(settings, llm=llm, embedder=embedder, while_waiting=released_turn)
    with serve(create_app(settings, store)) as live:
        yield live


BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


def make_key(live: LiveServer, *, role: str = "write", banks: list[str] | None = None, agent: str = "agent-a",
             name: str = "test") -> dict[str, Any]:
    """Create a key with the admin key; returns the create answer (with the secret)."""
    with live.admin() as c:
        r = c.post("/v1/keys", json={"name": name, "agent": agent, "role": role, "banks": banks or ["*"]})
    assert r.status_code == 201, r.text
    return r.json()


def sse_events(text: str) -> list[tuple[str, str]]:
    """(event, data) pairs of a text/event-stream body."""
    events = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        events.append((fields.get("event", "message"), fields.get("data", "")))
    return events


def wait_job(client: httpx.Client, job_id: str, timeout: float = 120.0) -> dict[str, Any]:
    """Poll ``GET /v1/jobs/{job_id}`` until the job is finished; returns its last state."""
    deadline = time.monotonic() + timeout
    while True:
        r = client.get(f"/v1/jobs/{job_id}")
        assert r.status_code == 200, r.text
        job = r.json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {job['status']} after {timeout} s: {job}")
        time.sleep(0.02)


def maintain(client: httpx.Client, bank: str, timeout: float = 120.0, **options: Any) -> dict[str, Any]:
    """Run maintenance over HTTP (a job: 202, then poll) and return its report."""
    r = client.post(f"/v1/banks/{bank}/maintenance", json=options)
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["job_id"], timeout)
    assert job["status"] == "succeeded", job
    return job["result"]
