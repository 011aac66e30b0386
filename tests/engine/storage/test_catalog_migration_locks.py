"""Startup migrations on PostgreSQL wait a bounded time for locks another connection holds, and retry."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from kvstore.config import Settings
from kvstore.errors import CatalogLocked, Unavailable
from kvstore.storage import catalog

RELEASE_AFTER_S = 2.0


class _Holder:
    """Another connection holding a lock in an open transaction, as a killed server's backend can."""

    def __init__(self, url: str, sql: str) -> None:
        self.release = threading.Event()
        self._held = threading.Event()
        self._thread = threading.Thread(target=self._hold, args=(url, sql), daemon=True)
        self._thread.start()
        assert self._held.wait(10), "the holder did not take its lock"

    def _hold(self, url: str, sql: str) -> None:
        import psycopg

        with psycopg.connect(url.replace("+psycopg", "")) as conn:
            conn.execute(sql)
            self._held.set()
            self.release.wait(60)
            conn.rollback()

    def release_after(self, seconds: float) -> None:
        threading.Timer(seconds, self.release.set).start()

    def close(self) -> None:
        self.release.set()
        self._thread.join(10)


def _alembic(url: str) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(catalog.__file__).resolve().parents[2] / "migrations"))
    cfg.set_main_option("sqlalchemy.url", url)
    return cfg


def _upgrade_to(url: str, revision: str) -> None:
    """Bring a fresh catalog to an older revision, so a later upgrade has DDL to run."""
    from alembic import command

    command.upgrade(_alembic(url), revision)


def _head(url: str) -> str:
    from alembic.script import ScriptDirectory

    return str(ScriptDirectory.from_config(_alembic(url)).get_current_head())


def _retries(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == "migration_lock_timeout"]


@pytest.mark.postgres
def test_an_upgrade_at_head_behind_a_held_lock_retries_and_gets_through(
        postgres_url: str, caplog: pytest.LogCaptureFixture) -> None:
    catalog.upgrade(postgres_url)
    holder = _Holder(postgres_url, "LOCK TABLE alembic_version IN ACCESS EXCLUSIVE MODE")
    try:
        holder.release_after(RELEASE_AFTER_S)
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="kvstore.storage.catalog"):
            catalog.upgrade(postgres_url, Settings(migration_lock_timeout_s=0.3, migration_timeout_s=30))
        elapsed = time.monotonic() - started
    finally:
        holder.close()
    assert RELEASE_AFTER_S - 0.5 <= elapsed < RELEASE_AFTER_S + 5
    retries = _retries(caplog)
    assert retries and (retries[0].__dict__["attempt"], retries[0].__dict__["lock_timeout_ms"]) == (1, 300)


@pytest.mark.postgres
def test_a_migration_altering_a_table_another_transaction_reads_waits_for_it(
        postgres_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """The DDL of a pending revision needs an exclusive lock that even a reader's open transaction blocks."""
    _upgrade_to(postgres_url, "0005")
    holder = _Holder(postgres_url, "SELECT count(*) FROM blocks")
    try:
        holder.release_after(RELEASE_AFTER_S)
        with caplog.at_level(logging.WARNING, logger="kvstore.storage.catalog"):
            catalog.upgrade(postgres_url, Settings(migration_lock_timeout_s=0.3, migration_timeout_s=30))
    finally:
        holder.close()
    assert _retries(caplog)
    from sqlalchemy import inspect

    engine = catalog.make_engine(postgres_url)
    try:
        assert "kv_summary" in {c["name"] for c in inspect(engine).get_columns("blocks")}
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_a_lock_that_is_never_released_fails_startup_clearly_within_the_budget(postgres_url: str) -> None:
    catalog.upgrade(postgres_url)
    holder = _Holder(postgres_url, "LOCK TABLE alembic_version IN ACCESS EXCLUSIVE MODE")
    try:
        started = time.monotonic()
        with pytest.raises(CatalogLocked, match="could not take its locks in 1.5 s") as caught:
            catalog.upgrade(postgres_url, Settings(migration_lock_timeout_s=0.2, migration_timeout_s=1.5))
        elapsed = time.monotonic() - started
    finally:
        holder.close()
    assert 1.5 <= elapsed < 4
    assert isinstance(caught.value, Unavailable) and caught.value.code == "unavailable"


def test_sqlite_upgrades_once_without_any_postgres_setting(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'catalog.sqlite3'}"
    catalog.upgrade(url, Settings(migration_lock_timeout_s=0.001, migration_timeout_s=0.001))
    catalog.upgrade(url, Settings(migration_lock_timeout_s=0.001, migration_timeout_s=0.001))
    engine = catalog.make_engine(url)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar_one() == _head(url)
    finally:
        engine.dispose()


def test_the_migration_budget_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVRAG_MIGRATION_LOCK_TIMEOUT_S", "0.5")
    monkeypatch.setenv("KVRAG_MIGRATION_TIMEOUT_S", "12")
    settings = Settings()
    assert (settings.migration_lock_timeout_s, settings.migration_timeout_s) == (0.5, 12.0)


@pytest.mark.postgres
def test_kvrag_db_upgrade_behind_a_held_lock_exits_with_one_line_not_a_traceback(
        postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from kvrag.cli import app

    catalog.upgrade(postgres_url)
    monkeypatch.setenv("KVRAG_DATABASE_URL", postgres_url)
    monkeypatch.setenv("KVRAG_MIGRATION_LOCK_TIMEOUT_S", "0.2")
    monkeypatch.setenv("KVRAG_MIGRATION_TIMEOUT_S", "1")
    holder = _Holder(postgres_url, "LOCK TABLE alembic_version IN ACCESS EXCLUSIVE MODE")
    try:
        result = CliRunner().invoke(app, ["db", "upgrade"])
    finally:
        holder.close()
    assert result.exit_code == 1
    assert "error:" in result.output and "could not take its locks" in result.output
    assert "Traceback" not in result.output
