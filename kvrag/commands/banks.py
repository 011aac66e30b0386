"""``kvrag banks``: list, create, get, update, maintain, delete."""

from __future__ import annotations

from typing import Annotated

import typer

from .common import (
    DEFAULT_URL,
    ApiKey,
    BudgetBytes,
    Codec,
    EvictionOpt,
    JsonOut,
    MaxBlocks,
    Url,
    connect,
    fail,
    print_json,
    value,
)
from .jobs import wait_with_bar

app = typer.Typer(help="List, create, inspect and delete banks (no subcommand: list).")
Name = Annotated[str, typer.Argument(help="The bank.", show_default=False)]
AlwaysJson = Annotated[bool, typer.Option("--json", help="Print JSON (this command always does).")]


@app.callback(invoke_without_command=True)
def banks_default(ctx: typer.Context, json_out: JsonOut = False, url: Url = DEFAULT_URL,
                  api_key: ApiKey = None) -> None:
    """List, create, inspect and delete banks (no subcommand: list)."""
    if ctx.invoked_subcommand is None:
        banks_list(url=url, api_key=api_key, json_out=json_out)


@app.command("list")
def banks_list(url: Url = DEFAULT_URL, api_key: ApiKey = None, json_out: JsonOut = False) -> None:
    """List the banks this key can see."""
    with connect(url, api_key) as kv:
        banks = kv.banks.list()
    if json_out:
        print_json([b.model_dump(mode="json") for b in banks])
        return
    for b in banks:
        typer.echo(f"{b.name}\tcodec={b.codec}\teviction={b.eviction}\tmodel={b.model}")


@app.command("create")
def banks_create(name: Annotated[str, typer.Argument(help="[a-z0-9][a-z0-9_-]{0,62}", show_default=False)],
                 codec: Annotated[Codec | None, typer.Option(help="KV codec preset (default: the server's).",
                                                             show_default=False)] = None,
                 budget_bytes: BudgetBytes = None, max_blocks: MaxBlocks = None, eviction: EvictionOpt = None,
                 json_out: JsonOut = False, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Create a bank bound to the server's model."""
    with connect(url, api_key) as kv:
        bank = kv.banks.create(name, codec=value(codec), budget_bytes=budget_bytes, max_blocks=max_blocks,
                               eviction=value(eviction))
    if json_out:
        print_json(bank.model_dump(mode="json"))
        return
    typer.echo(f"created bank {bank.name} (codec {bank.codec}, model {bank.model})")


@app.command("get")
def banks_get(name: Name, json_out: AlwaysJson = False, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Show a bank's settings and statistics as JSON."""
    with connect(url, api_key) as kv:
        bank = kv.banks.get(name)
    print_json(bank.model_dump(mode="json"))


@app.command("update")
def banks_update(name: Name,
                 codec: Annotated[Codec | None, typer.Option(help="Codec preset of blocks written from now on.",
                                                             show_default=False)] = None,
                 budget_bytes: BudgetBytes = None, max_blocks: MaxBlocks = None, eviction: EvictionOpt = None,
                 json_out: AlwaysJson = False, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Change a bank's codec, budgets or eviction policy; a smaller budget evicts at once. Prints the bank."""
    with connect(url, api_key) as kv:
        bank = kv.banks.update(name, codec=value(codec), budget_bytes=budget_bytes, max_blocks=max_blocks,
                               eviction=value(eviction))
    print_json(bank.model_dump(mode="json"))


@app.command("maintain")
def banks_maintain(name: Name,
                   evict: Annotated[bool, typer.Option(help="Evict down the tiers to the budget.")] = True,
                   merge: Annotated[bool, typer.Option(help="Point blocks with identical tokens at one blob.")] = True,
                   gc: Annotated[bool, typer.Option(help="Delete blob files no block references.")] = True,
                   expire: Annotated[bool, typer.Option(help="Delete documents past their expires_at.")] = True,
                   reencode: Annotated[bool, typer.Option(help="Re-encode after a model change; re-warm.")] = True,
                   rebuild: Annotated[bool, typer.Option(help="Check every checksum; rebuild damaged blocks.")] = False,
                   wait: Annotated[bool, typer.Option(help="Wait for the job (progress bar on stderr) and print "
                                                          "its report; --no-wait prints the job at once.")] = True,
                   json_out: AlwaysJson = False, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Run a bank's maintenance (a server-side job, queued behind queries) and print its report as JSON."""
    with connect(url, api_key) as kv:
        handle = kv.banks.maintain(name, evict=evict, merge=merge, gc=gc, expire=expire, reencode=reencode,
                                   rebuild=rebuild)
        if not wait:
            print_json({"job_id": handle.id, "status": handle.job.status})
            return
        job = wait_with_bar(kv, handle.id)
    if job.status != "succeeded":
        raise fail(f"maintenance job {job.id} {job.status}" + (f": {job.error}" if job.error else ""))
    print_json(job.result)


@app.command("delete")
def banks_delete(name: Name,
                 yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
                 json_out: JsonOut = False, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Delete a bank with all its documents and blocks."""
    if not yes:
        typer.confirm(f"Delete bank {name} and everything in it?", abort=True)
    with connect(url, api_key) as kv:
        kv.banks.delete(name)
    if json_out:
        print_json({"deleted": name})
        return
    typer.echo(f"deleted bank {name}")
