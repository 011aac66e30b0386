"""Startup migrations on PostgreSQL wait a bounded time for locks another connection holds, and retry."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from kvstore import catalog
from kvstore.errors import Unavailable

pytestmark = pytest.mark.postgres


def _hold_lock(url: str, release: threading.Event, held: threading.Event) -> None:
    """Hold an exclusive lock on the schema version table (what a killed server's backend can leave behind)."""
    import psycopg

    with psycopg.connect(url.replace("+psycopg", "")) as conn:
        conn.execute("LOCK TABLE alembic_version IN ACCESS EXCLUSIVE MODE")
        held.set()
        release.wait(30)
        conn.rollback()


def _locked(url: str) -> tuple[threading.Event, threading.Thread]:
    release, held = threading.Event(), threading.Event()
    holder = threading.Thread(target=_hold_lock, args=(url, release, held), daemon=True)
    holder.start()
    assert held.wait(10)
    return release, holder


def test_a_migration_behind_a_held_lock_retries_and_gets_through(
        postgres_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    catalog.upgrade(postgres_url)
    monkeypatch.setattr(catalog, "MIGRATION_BACKOFF_S", 0.1)
    release, holder = _locked(postgres_url)
    threading.Timer(1.5, release.set).start()
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="kvstore.catalog"):
        catalog.upgrade(postgres_url, attempts=20, lock_timeout_ms=200)
    assert time.monotonic() - started >= 1.0
    assert any("waited 200 ms for a lock" in r.getMessage() for r in caplog.records)
    holder.join(10)


def test_a_lock_that_is_never_released_fails_startup_clearly(postgres_url: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    catalog.upgrade(postgres_url)
    monkeypatch.setattr(catalog, "MIGRATION_BACKOFF_S", 0.05)
    release, holder = _locked(postgres_url)
    try:
        started = time.monotonic()
        with pytest.raises(Unavailable, match="could not take its locks"):
            catalog.upgrade(postgres_url, attempts=3, lock_timeout_ms=150)
        assert time.monotonic() - started < 10
    finally:
        release.set()
        holder.join(10)
