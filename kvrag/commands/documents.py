"""``kvrag documents``: ls, get, rm."""

from __future__ import annotations

from typing import Annotated

import typer

from .common import DEFAULT_URL, ApiKey, Bank, JsonOut, Url, connect, print_json

app = typer.Typer(help="List, show and delete a bank's documents.", no_args_is_help=True)
DocId = Annotated[str, typer.Argument(help="The document's id.", show_default=False)]


@app.command("ls")
def documents_ls(bank: Bank,
                 limit: Annotated[int | None, typer.Option(min=1, max=1000, help="Documents fetched per request "
                                                           "(all are listed).", show_default=False)] = None,
                 json_out: JsonOut = False, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """List every document of a bank by id: version, blocks, tokens, tags."""
    with connect(url, api_key) as kv:
        docs = list(kv.documents.list(bank, limit=limit))
    if json_out:
        print_json([d.model_dump(mode="json") for d in docs])
        return
    for doc in docs:
        pinned = "\tpinned" if doc.pinned else ""
        typer.echo(f"{doc.doc_id}\tv{doc.version}\t{doc.blocks} blocks\t{doc.tokens} tokens\t"
                   f"tags={','.join(doc.tags)}{pinned}")


@app.command("get")
def documents_get(doc_id: DocId, bank: Bank, json_out: JsonOut = False, url: Url = DEFAULT_URL,
                  api_key: ApiKey = None) -> None:
    """Print a document's text (its version and metadata on stderr)."""
    with connect(url, api_key) as kv:
        doc = kv.documents.get(bank, doc_id)
    if json_out:
        print_json(doc.model_dump(mode="json"))
        return
    typer.echo(doc.text or "")
    typer.echo(f"[{doc.doc_id} v{doc.version}, {doc.tokens} tokens, tags={','.join(doc.tags)}, "
               f"metadata={doc.metadata}]", err=True)


@app.command("rm")
def documents_rm(doc_id: DocId, bank: Bank,
                 if_match: Annotated[int | None, typer.Option(min=1, help="Delete only if this is still the "
                                                              "stored version.", show_default=False)] = None,
                 yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
                 json_out: JsonOut = False, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Delete a document and its blocks."""
    if not yes:
        typer.confirm(f"Delete document {doc_id} from {bank}?", abort=True)
    with connect(url, api_key) as kv:
        kv.documents.delete(bank, doc_id, if_match=if_match)
    if json_out:
        print_json({"deleted": doc_id, "bank": bank})
        return
    typer.echo(f"deleted document {doc_id} from {bank}")
