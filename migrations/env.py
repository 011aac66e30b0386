"""Alembic environment: the URL comes from the caller (kvstore.catalog.upgrade) or KVRAG settings."""

from alembic import context

from kvstore.catalog import Base, make_engine
from kvstore.config import Settings

config = context.config
url = config.get_main_option("sqlalchemy.url") or Settings().resolved_database_url()


def run_migrations_offline() -> None:
    context.configure(url=url, target_metadata=Base.metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = make_engine(url)
    with engine.connect() as connection:
        lock_timeout_ms = config.attributes.get("lock_timeout_ms")
        if lock_timeout_ms and connection.dialect.name == "postgresql":
            # Session-wide on this connection: a lock the migration cannot get fails it instead of hanging.
            connection.exec_driver_sql(f"SET lock_timeout = {int(lock_timeout_ms)}")
            connection.commit()
        context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
