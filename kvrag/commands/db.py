"""``kvrag db``: bring the catalog to the newest schema, show where it stands, list the migrations (Alembic)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from .common import JsonOut, fail, print_json

if TYPE_CHECKING:
    from alembic.config import Config

    from kvstore.config import Settings

app = typer.Typer(help="Manage the catalog database.", no_args_is_help=True)
DataDir = Annotated[Path | None, typer.Option(help="Data directory holding the default SQLite catalog.",
                                              show_default=False)]


def _settings(data_dir: Path | None) -> Settings:
    from kvstore.config import Settings

    return Settings(data_dir=data_dir) if data_dir is not None else Settings()


def _shown(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _alembic(url: str) -> Config:
    from alembic.config import Config

    import migrations

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(migrations.__file__).resolve().parent))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def _current(url: str) -> list[str]:
    """The revisions the catalog is at; none for a catalog that does not exist yet (nothing is created)."""
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database and not Path(parsed.database).exists():
        return []
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return sorted(MigrationContext.configure(connection).get_current_heads())
    finally:
        engine.dispose()


@dataclass
class Revision:
    revision: str
    down_revision: str | None
    description: str
    applied: bool


@app.command("upgrade")
def db_upgrade(data_dir: DataDir = None, json_out: JsonOut = False) -> None:
    """Bring the catalog ($KVRAG_DATABASE_URL, or SQLite in the data dir) to the newest schema."""
    from kvstore.errors import KVRagError as EngineError
    from kvstore.storage.catalog import upgrade

    settings = _settings(data_dir)
    url = settings.resolved_database_url()
    try:
        upgrade(url, settings)
    except EngineError as exc:  # CatalogLocked: another process holds the schema; one line, not a traceback
        raise fail(str(exc)) from None
    if json_out:
        print_json({"url": _shown(url), "current": _current(url)})
        return
    typer.echo(f"catalog up to date: {_shown(url)}")


@app.command("current")
def db_current(data_dir: DataDir = None, json_out: JsonOut = False) -> None:
    """Show the catalog's schema revision and whether it is the newest."""
    from alembic.script import ScriptDirectory
    from sqlalchemy.exc import SQLAlchemyError

    url = _settings(data_dir).resolved_database_url()
    heads = sorted(ScriptDirectory.from_config(_alembic(url)).get_heads())
    try:
        current = _current(url)
    except SQLAlchemyError as exc:
        raise fail(f"cannot read the catalog at {_shown(url)}: {type(exc).__name__}") from None
    up_to_date = current == heads
    if json_out:
        print_json({"url": _shown(url), "current": current, "head": heads, "up_to_date": up_to_date})
        return
    state = "up to date" if up_to_date else ("not created" if not current else f"behind {', '.join(heads)}")
    typer.echo(f"{', '.join(current) or '-'} ({state}): {_shown(url)}")


@app.command("history")
def db_history(data_dir: DataDir = None, json_out: JsonOut = False) -> None:
    """List the schema migrations, newest first, marking those the catalog has applied."""
    from alembic.script import ScriptDirectory
    from sqlalchemy.exc import SQLAlchemyError

    url = _settings(data_dir).resolved_database_url()
    scripts = ScriptDirectory.from_config(_alembic(url))
    try:
        current = _current(url)
    except SQLAlchemyError:
        current = []  # the list of migrations does not need the database
    applied = {r.revision for r in scripts.iterate_revisions(tuple(current), "base")} if current else set()
    revisions = [Revision(revision=r.revision, down_revision=r.down_revision if isinstance(r.down_revision, str)
                          else None, description=(r.doc or "").strip(), applied=r.revision in applied)
                 for r in scripts.walk_revisions()]
    if json_out:
        print_json([asdict(r) for r in revisions])
        return
    for r in revisions:
        typer.echo(f"{'*' if r.applied else ' '} {r.revision}  {r.description}")
