"""Alembic environment: the URL comes from the caller (kvstore.storage.catalog.upgrade) or KVRAG settings."""

from alembic import context
from sqlalchemy.engine import Connection

from kvstore.config import Settings
from kvstore.storage.catalog import make_engine
from kvstore.storage.schema import metadata

config = context.config
url = config.get_main_option("sqlalchemy.url") or Settings().resolved_database_url()


def run_migrations_offline() -> None:
    context.configure(url=url, target_metadata=metadata(), literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def _run_on(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=metadata(), render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        # The caller's connection, already in a transaction it commits (kvstore.storage.catalog: PostgreSQL with
        # a bounded lock wait).
        _run_on(connection)
        return
    engine = make_engine(url)
    with engine.connect() as connection:
        _run_on(connection)
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
