"""The ``kvrag`` command: run the server, migrate the catalog, and use a server through the SDK.

``serve``, ``db`` and ``blobs`` load the engine; every other command only needs the light SDK, so they start fast.
Each group lives in ``kvrag.commands``; exit codes and error lines are ``kvrag.commands.common``'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import kvrag_client
import typer

from . import __version__
from .commands import banks, blobs, context_map, db, documents, jobs, keys, sessions
from .commands.common import DEFAULT_URL, ApiKey, Bank, ErrorLineGroup, Url, fail
from .commands.ingest import Doc, collect_documents, doc_id_for, ingest
from .commands.retrieval import query, search

__all__ = ["app", "Doc", "collect_documents", "doc_id_for"]

app = typer.Typer(cls=ErrorLineGroup, rich_markup_mode=None, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="kvrag: a memory database for LLM agents that stores documents as their KV cache.")
for group, name in ((db.app, "db"), (blobs.app, "blobs"), (banks.app, "banks"), (documents.app, "documents"),
                    (jobs.app, "jobs"), (keys.app, "keys"), (context_map.app, "map"), (sessions.app, "sessions")):
    app.add_typer(group, name=name)
app.command()(ingest)
app.command()(query)
app.command()(search)


def _show_version(show: bool) -> None:
    if show:
        typer.echo(f"kvrag {__version__} (kvrag-client {kvrag_client.__version__})")
        raise typer.Exit()


@app.callback()
def main(version: Annotated[bool, typer.Option("--version", callback=_show_version, is_eager=True,
                                               help="Print the version and exit.")] = False) -> None:
    """kvrag: a memory database for LLM agents that stores documents as their KV cache."""


@app.command()
def serve(host: Annotated[str, typer.Option(help="Address to bind; not loopback needs KVRAG_ADMIN_KEY.")] = "127.0.0.1",
          port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8000,
          data_dir: Annotated[Path | None, typer.Option(help="Data directory (default: $KVRAG_DATA_DIR or "
                                                        "./kvrag-data).", show_default=False)] = None) -> None:
    """Run the kvrag HTTP server (API, model worker, catalog, blobs and indexes in one process)."""
    from kvstore.storage import lock
    from server.settings import ServerSettings

    settings = ServerSettings(data_dir=data_dir) if data_dir is not None else ServerSettings()
    try:  # before the web stack and torch load: a second server on this data dir stops at once, in one line
        held = lock.acquire(settings.data_dir)
    except lock.DataDirInUse as exc:
        raise fail(exc.detail) from None
    from server.app import run

    try:
        run(settings, host, port)
    finally:
        held.release()


@app.command("mcp")
def mcp_stdio(bank: Bank, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Serve MCP tools (remember, recall, ask, forget, context_map, context_map_edit, session_append,
    session_brief) on one bank over stdio, for an agent that starts this command; every call goes to the
    kvrag server with this key."""
    from kvrag_client.mcp import run_stdio

    run_stdio(bank, url, api_key)


if __name__ == "__main__":
    app()
