"""The ORM models and the migrations describe the same schema: a catalog migrated to head with the project's
migrations is exactly what ``kvstore.storage.schema.metadata()`` declares (Alembic's autogenerate proposes no
change), on SQLite and on PostgreSQL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from kvstore.storage.catalog import make_engine, upgrade
from kvstore.storage.schema import metadata


def _proposed_changes(url: str) -> list[Any]:
    upgrade(url)  # the project's migrations, as a server's start runs them
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            # Column types and server defaults too: a default only the migration sets is a drift as well.
            context = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
            return list(compare_metadata(context, metadata()))
    finally:
        engine.dispose()


def test_the_schema_names_every_table() -> None:
    tables = set(metadata().tables)
    assert {"banks", "documents", "blocks", "jobs"} <= tables
    assert {"agent_sessions", "session_segments", "session_pages"} <= tables  # declared in kvstore.sessions.rows


def test_sqlite_migrations_match_the_models(tmp_path: Path) -> None:
    assert _proposed_changes(f"sqlite:///{tmp_path / 'catalog.sqlite3'}") == []


@pytest.mark.postgres
def test_postgres_migrations_match_the_models(postgres_url: str) -> None:
    assert _proposed_changes(postgres_url) == []
