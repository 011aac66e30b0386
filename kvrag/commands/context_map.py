"""``kvrag map``: show, edit, refresh a bank's context map, and pin or unpin its items."""

from __future__ import annotations

from typing import Annotated

import typer
from kvrag_client import ContextMap

from .common import DEFAULT_URL, ApiKey, Bank, JsonOut, Section, Url, bad_value, connect, fail, print_json

app = typer.Typer(help="Show, edit and refresh a bank's context map (what it holds, what earlier work found).",
                  no_args_is_help=True)
SECTIONS = tuple(s.value for s in Section)


def _print_map(cmap: ContextMap) -> None:
    typer.echo(f"version {cmap.version} | {cmap.tokens}/{cmap.budget_tokens} tokens"
               f"{' | frozen' if cmap.frozen else ''}")
    for section in SECTIONS:
        items = [i for i in cmap.items if i.section == section]
        if items:
            typer.echo(f"[{section}]")
        for item in items:
            typer.echo(f"  {item.id}  (+{item.helpful}/-{item.harmful}, score {item.score:.2f}"
                       f"{', stale' if item.stale else ''}{', pinned' if item.pinned else ''})  {item.content}")


def _pairs(values: list[str], option: str) -> list[tuple[str, str]]:
    """``KEY=TEXT`` option values split once at the first '='."""
    out = []
    for item in values:
        key, sep, text = item.partition("=")
        if not sep or not key or not text.strip():
            raise bad_value(f"takes KEY=TEXT, got {item!r}", option)
        out.append((key.strip(), text.strip()))
    return out


@app.command("show")
def map_show(bank: Bank, version: Annotated[int | None, typer.Option(min=0, help="An older version.")] = None,
             json_out: JsonOut = False, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Print the bank's context map (or an older version) by section, with ids, votes and scores."""
    with connect(url, api_key) as kv:
        cmap = kv.context_map.get(bank, version=version)
    if json_out:
        print_json(cmap.model_dump(mode="json"))
        return
    _print_map(cmap)


@app.command("edit")
def map_edit(bank: Bank,
             add: Annotated[list[str], typer.Option("--add", help="SECTION=TEXT (roadmap, understanding, "
                                                    "reusable_results); repeatable.")] = [],  # noqa: B006
             replace: Annotated[list[str], typer.Option("--replace", help="ID=TEXT; repeatable.")] = [],  # noqa: B006
             delete: Annotated[list[str], typer.Option("--delete", help="ID to delete; repeatable.")] = [],  # noqa: B006
             helpful: Annotated[list[str], typer.Option("--helpful", help="ID that helped.")] = [],  # noqa: B006
             harmful: Annotated[list[str], typer.Option("--harmful", help="ID that misled.")] = [],  # noqa: B006
             stale: Annotated[list[str], typer.Option("--stale", help="ID that is out of date.")] = [],  # noqa: B006
             base_version: Annotated[int | None, typer.Option(min=0, help="Refuse if items changed since this "
                                                              "version.")] = None,
             frozen: Annotated[bool | None, typer.Option("--freeze/--unfreeze", help="Stop or allow automatic "
                                                         "refresh and bootstrap.", show_default=False)] = None,
             budget: Annotated[int | None, typer.Option(min=16, help="New token budget (evicts at once).")] = None,
             json_out: JsonOut = False, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Edit the context map in one atomic version: add, replace and delete items, vote on them, freeze it
    or change its budget; prints what was applied and evicted."""
    for section, _ in _pairs(add, "--add"):
        if section not in SECTIONS:
            raise bad_value(f"section must be one of {', '.join(SECTIONS)}", "--add")
    edits = ([{"op": "add", "section": sec, "content": text} for sec, text in _pairs(add, "--add")]
             + [{"op": "replace", "id": item, "content": text} for item, text in _pairs(replace, "--replace")]
             + [{"op": "delete", "id": item} for item in delete])
    feedback = [{"id": item, "tag": tag} for tag, ids in (("helpful", helpful), ("harmful", harmful),
                                                          ("stale", stale)) for item in ids]
    if not edits and not feedback and frozen is None and budget is None:
        raise bad_value("nothing to do: give --add, --replace, --delete, a vote, --freeze/--unfreeze or --budget")
    with connect(url, api_key) as kv:
        result = None
        if edits or feedback:
            result = kv.context_map.edit(bank, edits, feedback=feedback, base_version=base_version)
        if frozen is not None or budget is not None:
            kv.context_map.update(bank, frozen=frozen, budget_tokens=budget)
        cmap = kv.context_map.get(bank)
    if json_out:
        print_json({"edit": result.model_dump(mode="json") if result else None, "map": cmap.model_dump(mode="json")})
        return
    if result is not None:
        applied = ", ".join(f"{a['op']} {a['id']}" + (f" {a['tag']}" if "tag" in a else "") for a in result.applied)
        typer.echo(f"applied: {applied or 'nothing'}")
        if result.evicted:
            typer.echo(f"evicted to fit the budget: {', '.join(result.evicted)}")
    _print_map(cmap)


@app.command("refresh")
def map_refresh(bank: Bank, json_out: JsonOut = False, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Distill the bank's recent queries into map edits with the server's map LLM and apply them."""
    with connect(url, api_key) as kv:
        report = kv.context_map.refresh(bank)
    if json_out:
        print_json(report.model_dump(mode="json"))
    else:
        typer.echo(f"{report.status}: version {report.version}, {report.tokens} tokens, {report.records} queries "
                   f"distilled by {report.llm}")
        for entry in report.applied:
            typer.echo(f"  applied {entry['op']} {entry['id']}")
        for entry in report.rejected:
            typer.echo(f"  rejected {entry}")
        if report.evicted:
            typer.echo(f"  evicted {', '.join(report.evicted)}")
    if report.status in ("unparseable", "llm_error"):
        raise fail(report.error or f"refresh {report.status}")


ItemId = Annotated[str, typer.Argument(help="The item: cr-N, cu-N or rr-N.", show_default=False)]


@app.command("pin")
def map_pin(bank: Bank, item_id: ItemId, json_out: JsonOut = False, url: Url = DEFAULT_URL,
            api_key: ApiKey = None) -> None:
    """Pin an item (owner key): no edit, refresh or eviction removes or replaces it until it is unpinned."""
    with connect(url, api_key) as kv:
        cmap = kv.context_map.pin(bank, item_id)
    print_json(cmap.model_dump(mode="json")) if json_out else _print_map(cmap)


@app.command("unpin")
def map_unpin(bank: Bank, item_id: ItemId, json_out: JsonOut = False, url: Url = DEFAULT_URL,
              api_key: ApiKey = None) -> None:
    """Unpin an item (owner key)."""
    with connect(url, api_key) as kv:
        cmap = kv.context_map.unpin(bank, item_id)
    print_json(cmap.model_dump(mode="json")) if json_out else _print_map(cmap)
