"""``kvrag blobs migrate --to s3://BUCKET/PREFIX``: move a data dir's local blobs into an object store.

Runs on the data dir itself (no server may run on it meanwhile: its lock is taken). Every blob is checked against
its SHA-256 before upload and the store verifies the upload's checksum; blobs already in the store are skipped,
so running it again resumes a stopped run. Then start the servers with ``KVRAG_BLOB_URL`` set to the same URL.
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from .common import JsonOut, bad_value, fail, print_json

app = typer.Typer(help="Manage where KV blocks are stored.", no_args_is_help=True)


@app.command("migrate")
def blobs_migrate(to: Annotated[str, typer.Option("--to", help="The object store: s3://BUCKET/PREFIX (configured by "
                                                               "AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...).")],
                  data_dir: Annotated[Path | None, typer.Option(help="Data directory whose blobs move (default: "
                                                                     "$KVRAG_DATA_DIR or ./kvrag-data).",
                                                                show_default=False)] = None,
                  delete_local: Annotated[bool, typer.Option(help="Delete each local blob once the store holds "
                                                                  "it.")] = False,
                  json_out: JsonOut = False) -> None:
    """Copy (or move, with --delete-local) every local blob into the object store; idempotent and resumable."""
    from kvstore.config import Settings
    from kvstore.errors import KVRagError as EngineError
    from kvstore.storage.migrate import count_local, migrate_blobs

    if not to.startswith("s3://"):
        raise bad_value("must be an s3://BUCKET/PREFIX URL", "--to")
    settings = Settings(data_dir=data_dir) if data_dir is not None else Settings()
    try:
        # The bar goes to stderr: stdout stays the summary (or the JSON report).
        with typer.progressbar(length=count_local(settings.data_dir), label="blobs", file=sys.stderr) as bar:
            report = migrate_blobs(settings.data_dir, to, delete_local=delete_local,
                                   allow_http=settings.blob_allow_http, progress=bar.update)
    except EngineError as exc:  # the data dir in use, the store unreachable: one line
        raise fail(exc.detail) from None
    if json_out:
        print_json(asdict(report))
    else:
        typer.echo(f"{report.copied} copied ({report.bytes_copied} bytes), {report.already_there} already in {to}, "
                   f"{len(report.damaged)} damaged (left in place), {report.deleted_local} local deleted")
    if report.damaged:  # exit 1: not everything moved
        raise typer.Exit(1)

