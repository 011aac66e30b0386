"""``kvrag keys``: create, list, revoke (an admin key)."""

from __future__ import annotations

from typing import Annotated

import typer

from .common import DEFAULT_URL, ApiKey, JsonOut, Role, Url, connect, print_json

app = typer.Typer(help="Create, list and revoke API keys (needs an admin key).", no_args_is_help=True)


@app.command("create")
def keys_create(name: Annotated[str, typer.Argument(help="A name for the key.", show_default=False)],
                role: Annotated[Role, typer.Option(help="What the key may do.")] = Role.read,
                bank: Annotated[list[str] | None, typer.Option("--bank", "-b", help="A bank the key may use "
                                                                "(repeat; default: all).")] = None,
                agent: Annotated[str | None, typer.Option(help="Agent its writes are attributed to "
                                                          "(default: the name).")] = None,
                json_out: JsonOut = False, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Create an API key; its secret is printed once and cannot be shown again."""
    with connect(url, api_key) as kv:
        key = kv.keys.create(name, role=role.value, banks=bank or ["*"], agent=agent)
    if json_out:
        print_json(key.model_dump(mode="json"))
        return
    typer.echo(key.key)
    typer.echo(f"key {key.id} ({key.role} on {', '.join(key.banks)}, agent {key.agent}); "
               "store the secret above now: it is not shown again", err=True)


@app.command("list")
def keys_list(json_out: JsonOut = False, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """List keys (id, prefix, role, banks; never secrets)."""
    with connect(url, api_key) as kv:
        keys = kv.keys.list()
    if json_out:
        print_json([k.model_dump(mode="json") for k in keys])
        return
    for key in keys:
        typer.echo(f"{key.id}\t{key.prefix}\t{key.name}\t{key.role}\t{','.join(key.banks)}\tagent={key.agent}")


@app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="The key's id.", show_default=False)],
                json_out: JsonOut = False, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Revoke a key; requests with it fail at once."""
    with connect(url, api_key) as kv:
        kv.keys.delete(key_id)
    if json_out:
        print_json({"revoked": key_id})
        return
    typer.echo(f"revoked key {key_id}")
