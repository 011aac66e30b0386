"""The ``kvrag`` command: run the server, migrate the catalog, and use a server through the SDK.

``serve`` and ``db`` load the engine; every other command only needs the light SDK, so they start fast.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, cast, get_args

import typer
from kvrag_client import APIError, Conflict, ContextMap, KVRag, KVRagError, QueryResult, Retrieval, TokenEvent
from tqdm import tqdm

app = typer.Typer(help="kvrag: a memory database for LLM agents that stores documents as their KV cache.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
db_app = typer.Typer(help="Manage the catalog database.", no_args_is_help=True)
banks_app = typer.Typer(help="List, create, inspect and delete banks (no subcommand: list).")
keys_app = typer.Typer(help="Create, list and revoke API keys (needs an admin key).", no_args_is_help=True)
map_app = typer.Typer(help="Show, edit and refresh a bank's context map (what it holds, what earlier work found).",
                      no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(banks_app, name="banks")
app.add_typer(keys_app, name="keys")
app.add_typer(map_app, name="map")
sessions_app = typer.Typer(help="Agent sessions: append to a trajectory kept as KV, brief a worker, prune.",
                           no_args_is_help=True)
app.add_typer(sessions_app, name="sessions")

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIX = ".jsonl"
DOC_ID_CHARS = re.compile(r"[^A-Za-z0-9._:-]")

Url = Annotated[str, typer.Option("--url", envvar="KVRAG_URL", help="The kvrag server.")]
ApiKey = Annotated[str | None, typer.Option("--api-key", envvar="KVRAG_API_KEY", show_default=False,
                                            help="API key (Authorization: Bearer).")]
Bank = Annotated[str, typer.Option("--bank", "-b", help="The bank to use.")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print the server's answer as JSON.")]
BudgetBytes = Annotated[int | None, typer.Option(min=1, help="Stored-bytes budget.")]
MaxBlocks = Annotated[int | None, typer.Option(min=1, help="Block-count budget.")]
Eviction = Annotated[str | None, typer.Option(help="lru | importance | hybrid.")]
RetrievalOpt = Annotated[str | None, typer.Option(show_default=False, help="How blocks are ranked: "
                                                  f"{' | '.join(get_args(Retrieval))} (default: the server's).")]
DEFAULT_URL = "http://127.0.0.1:8000"


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(1)


def _retrieval(value: str | None) -> Retrieval | None:
    """The --retrieval option checked against the modes the SDK knows."""
    if value is not None and value not in get_args(Retrieval):
        raise _fail(f"--retrieval must be one of {', '.join(get_args(Retrieval))}")
    return cast("Retrieval | None", value)


@contextmanager
def _connect(url: str, api_key: str | None) -> Iterator[KVRag]:
    """An SDK client; API and connection errors become one line on stderr and exit status 1."""
    try:
        with KVRag(url, api_key=api_key or "") as kv:
            yield kv
    except APIError as exc:
        raise _fail(f"{exc.status} {exc.code}: {exc.detail}") from None
    except KVRagError as exc:
        raise _fail(str(exc)) from None


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


# -- server and catalog -------------------------------------------------------------------------------


@app.command()
def serve(host: Annotated[str, typer.Option(help="Address to bind; not loopback needs KVRAG_ADMIN_KEY.")] = "127.0.0.1",
          port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
          data_dir: Annotated[Path | None, typer.Option(help="Data directory (default: $KVRAG_DATA_DIR or "
                                                        "./kvrag-data).", show_default=False)] = None) -> None:
    """Run the kvrag HTTP server (API, model worker, catalog, blobs and indexes in one process)."""
    from kvstore.config import Settings
    from server.app import run

    settings = Settings(data_dir=data_dir) if data_dir is not None else Settings()
    run(settings, host, port)


@db_app.command("upgrade")
def db_upgrade(data_dir: Annotated[Path | None, typer.Option(help="Data directory holding the default SQLite "
                                                             "catalog.", show_default=False)] = None) -> None:
    """Bring the catalog ($KVRAG_DATABASE_URL, or SQLite in the data dir) to the newest schema."""
    from sqlalchemy.engine import make_url

    from kvstore.catalog import upgrade
    from kvstore.config import Settings
    from kvstore.errors import KVRagError as EngineError

    settings = Settings(data_dir=data_dir) if data_dir is not None else Settings()
    url = settings.resolved_database_url()
    try:
        upgrade(url, settings)
    except EngineError as exc:  # CatalogLocked: another process holds the schema; one line, not a traceback
        raise _fail(str(exc)) from None
    typer.echo(f"catalog up to date: {make_url(url).render_as_string(hide_password=True)}")


# -- ingest -------------------------------------------------------------------------------------------


@dataclass
class Doc:
    """One document to ingest, and where it came from (for error messages)."""

    id: str
    text: str
    source: str
    extra: dict[str, Any] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        return {"id": self.id, "text": self.text, **self.extra}


def doc_id_for(relative: str) -> str:
    """A valid document id from a relative path: other characters become ``_``, at most 128 characters."""
    cleaned = DOC_ID_CHARS.sub("_", relative).lstrip("._:-")
    return cleaned[:128] or "doc"


def _read_jsonl(path: Path) -> Iterator[Doc]:
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise _fail(f"{where}: not JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("id"), str | int) or \
                not isinstance(record.get("text"), str):
            raise _fail(f"{where}: each line needs an \"id\" and a \"text\"")
        extra = {k: record[k] for k in ("metadata", "tags", "pinned") if record.get(k) is not None}
        yield Doc(str(record["id"]), record["text"], where, extra)


def _read_file(path: Path, relative: str) -> Iterator[Doc]:
    if path.suffix == JSONL_SUFFIX:
        yield from _read_jsonl(path)
    else:
        yield Doc(doc_id_for(relative), path.read_text(encoding="utf-8", errors="replace"), str(path))


def collect_documents(paths: Iterable[Path], pattern: str | None) -> list[Doc]:
    """Documents from files and folders: .txt/.md as one document each, .jsonl as one per line.

    In folders, ``pattern`` (a glob relative to the folder) picks the files; without it every
    .txt, .md and .jsonl file below the folder is taken.
    """
    docs: list[Doc] = []
    for path in paths:
        if path.is_dir():
            found = path.glob(pattern) if pattern else (
                p for p in path.rglob("*") if p.suffix in (*TEXT_SUFFIXES, JSONL_SUFFIX))
            for file in sorted(p for p in found if p.is_file()):
                docs.extend(_read_file(file, file.relative_to(path).as_posix()))
        elif path.is_file():
            docs.extend(_read_file(path, path.name))
        else:
            raise _fail(f"{path}: no such file or folder")
    return docs


def _batches(docs: list[Doc], size: int) -> Iterator[list[Doc]]:
    for start in range(0, len(docs), size):
        yield docs[start:start + size]


@app.command()
def ingest(paths: Annotated[list[Path], typer.Argument(help="Files and folders (.txt, .md, .jsonl).",
                                                       show_default=False)],
           bank: Bank,
           glob: Annotated[str | None, typer.Option("--glob", help="Files to take inside folders, e.g. "
                                                    "'**/*.md' (default: all .txt, .md, .jsonl).")] = None,
           create: Annotated[bool, typer.Option("--create", help="Create the bank if it does not exist.")] = False,
           batch_size: Annotated[int, typer.Option(min=1, help="Documents per request.")] = 16,
           url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Store files as documents: .txt/.md one each (id from the relative path), .jsonl one per line
    ({"id", "text", "metadata"?, "tags"?}). Shows documents/s and tokens/s."""
    docs = collect_documents(paths, glob)
    empty = [d for d in docs if not d.text.strip()]
    for doc in empty:
        typer.echo(f"skipped {doc.source}: empty", err=True)
    docs = [d for d in docs if d.text.strip()]
    with _connect(url, api_key) as kv:
        if create:
            try:
                kv.banks.create(bank)
            except Conflict:
                pass  # it already exists: that is what --create asks for
        created = changed = tokens = 0
        started = time.perf_counter()
        with tqdm(total=len(docs), unit="doc", desc=f"ingest {bank}", dynamic_ncols=True) as bar:
            for batch in _batches(docs, batch_size):
                for result in kv.documents.put_many(bank, [d.body() for d in batch]):
                    created += result.created
                    changed += result.changed and not result.created
                    tokens += result.document.tokens
                bar.update(len(batch))
                elapsed = max(time.perf_counter() - started, 1e-9)
                bar.set_postfix(tokens=tokens, tok_s=f"{tokens / elapsed:.0f}")
        elapsed = max(time.perf_counter() - started, 1e-9)
    typer.echo(f"{len(docs)} documents into {bank}: {created} new, {changed} updated, "
               f"{len(docs) - created - changed} unchanged; {tokens} tokens in {elapsed:.1f} s "
               f"({len(docs) / elapsed:.1f} docs/s, {tokens / elapsed:.0f} tokens/s)")


# -- retrieval ----------------------------------------------------------------------------------------


def _snippet(text: str, width: int = 80) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[:width - 1] + "…"


def _print_result(result: QueryResult) -> None:
    t = result.timings
    for hit in result.sources:
        typer.echo(f"  [{hit.score:.3f}] {hit.doc_id}#{hit.ordinal}: {_snippet(hit.text)}", err=True)
    typer.echo(f"  mode {result.mode} | ttft {t.ttft_ms:.0f} ms | total {t.total_ms:.0f} ms | "
               f"{result.usage.context_tokens} context tokens, {result.usage.generated_tokens} generated", err=True)


@app.command()
def query(question: Annotated[str, typer.Argument(help="The question.", show_default=False)], bank: Bank,
          mode: Annotated[str, typer.Option(help="kv: stored KV; text: re-read the passages (baseline).")] = "kv",
          k: Annotated[int, typer.Option("--k", "-k", min=1, help="Blocks to retrieve.")] = 5,
          max_new_tokens: Annotated[int, typer.Option(min=0, help="Tokens to generate at most.")] = 64,
          stream: Annotated[bool, typer.Option("--stream", help="Print tokens as they come.")] = False,
          context_map: Annotated[bool, typer.Option("--context-map", help="Put the bank's context map before "
                                                    "the passages.")] = False,
          retrieval: RetrievalOpt = None,
          recompute: Annotated[float | None, typer.Option(min=0.0, max=1.0, help="kv mode: share of context tokens "
                                                          "whose KV is recomputed with full attention "
                                                          "(default: the server's).")] = None,
          budget_tokens: Annotated[int | None, typer.Option(min=1, help="kv mode: compact the context to at most "
                                                            "this many tokens the question attends to.")] = None,
          tau: Annotated[float | None, typer.Option(help="kv mode: compact the context to tokens scoring above "
                                                    "median + tau * MAD.")] = None,
          json_out: JsonOut = False, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Answer a question from a bank; the answer goes to stdout, its sources and timings to stderr."""
    if mode not in ("kv", "text"):
        raise _fail("--mode must be kv or text")
    # Both may be given, as in the API: tokens above the threshold, at most the budget of them.
    compaction = {name: value for name, value in (("budget_tokens", budget_tokens), ("tau", tau))
                  if value is not None} or None
    ranking = _retrieval(retrieval)
    with _connect(url, api_key) as kv:
        if stream and not json_out:
            events = kv.query(bank, question, k=k, mode=mode, max_new_tokens=max_new_tokens, stream=True,
                              context_map=context_map, retrieval=ranking, recompute=recompute,
                              compaction=compaction)
            for event in events:
                if isinstance(event, TokenEvent):
                    typer.echo(event.text, nl=False)
            typer.echo()
            if events.result is not None:
                _print_result(events.result)
            return
        result = kv.query(bank, question, k=k, mode=mode, max_new_tokens=max_new_tokens, context_map=context_map,
                          retrieval=ranking, recompute=recompute, compaction=compaction)
    if json_out:
        _print_json(result.model_dump(mode="json"))
        return
    typer.echo(result.answer)
    _print_result(result)


@app.command()
def search(text: Annotated[str, typer.Argument(help="What to look for.", show_default=False)], bank: Bank,
           k: Annotated[int, typer.Option("--k", "-k", min=1, help="Blocks to return.")] = 5,
           retrieval: RetrievalOpt = None,
           json_out: JsonOut = False, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Show the blocks that best match TEXT (no generation)."""
    with _connect(url, api_key) as kv:
        hits = kv.search(bank, text, k=k, retrieval=_retrieval(retrieval))
    if json_out:
        _print_json([h.model_dump(mode="json") for h in hits])
        return
    for hit in hits:
        typer.echo(f"{hit.score:.3f}  {hit.doc_id}#{hit.ordinal}  {_snippet(hit.text)}")


# -- banks --------------------------------------------------------------------------------------------


@banks_app.callback(invoke_without_command=True)
def banks_default(ctx: typer.Context, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """List, create, inspect and delete banks (no subcommand: list)."""
    if ctx.invoked_subcommand is None:
        banks_list(url=url, api_key=api_key, json_out=False)


@banks_app.command("list")
def banks_list(url: Url = DEFAULT_URL, api_key: ApiKey = None, json_out: JsonOut = False) -> None:
    """List the banks this key can see."""
    with _connect(url, api_key) as kv:
        banks = kv.banks.list()
    if json_out:
        _print_json([b.model_dump(mode="json") for b in banks])
        return
    for b in banks:
        typer.echo(f"{b.name}\tcodec={b.codec}\teviction={b.eviction}\tmodel={b.model}")


@banks_app.command("create")
def banks_create(name: Annotated[str, typer.Argument(help="[a-z0-9][a-z0-9_-]{0,62}", show_default=False)],
                 codec: Annotated[str | None, typer.Option(help="KV codec preset (default: the server's).")] = None,
                 budget_bytes: BudgetBytes = None, max_blocks: MaxBlocks = None, eviction: Eviction = None,
                 url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Create a bank bound to the server's model."""
    with _connect(url, api_key) as kv:
        bank = kv.banks.create(name, codec=codec, budget_bytes=budget_bytes, max_blocks=max_blocks,
                               eviction=eviction)
    typer.echo(f"created bank {bank.name} (codec {bank.codec}, model {bank.model})")


@banks_app.command("get")
def banks_get(name: Annotated[str, typer.Argument(help="The bank.", show_default=False)],
              url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Show a bank's settings and statistics as JSON."""
    with _connect(url, api_key) as kv:
        bank = kv.banks.get(name)
    _print_json(bank.model_dump(mode="json"))


@banks_app.command("update")
def banks_update(name: Annotated[str, typer.Argument(help="The bank.", show_default=False)],
                 codec: Annotated[str | None, typer.Option(help="Codec preset of blocks written from now on.")] = None,
                 budget_bytes: BudgetBytes = None, max_blocks: MaxBlocks = None, eviction: Eviction = None,
                 url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Change a bank's codec, budgets or eviction policy; a smaller budget evicts at once. Prints the bank."""
    with _connect(url, api_key) as kv:
        bank = kv.banks.update(name, codec=codec, budget_bytes=budget_bytes, max_blocks=max_blocks,
                               eviction=eviction)
    _print_json(bank.model_dump(mode="json"))


@banks_app.command("maintain")
def banks_maintain(name: Annotated[str, typer.Argument(help="The bank.", show_default=False)],
                   evict: Annotated[bool, typer.Option(help="Evict down the tiers to the budget.")] = True,
                   merge: Annotated[bool, typer.Option(help="Merge near-duplicate blocks.")] = True,
                   gc: Annotated[bool, typer.Option(help="Delete blob files no block references.")] = True,
                   expire: Annotated[bool, typer.Option(help="Delete documents past their expires_at.")] = True,
                   reencode: Annotated[bool, typer.Option(help="Re-encode after a model change; re-warm.")] = True,
                   rebuild: Annotated[bool, typer.Option(help="Check every checksum; rebuild damaged blocks.")] = False,
                   url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Run a bank's maintenance now (it queues behind queries) and print its report as JSON."""
    with _connect(url, api_key) as kv:
        report = kv.banks.maintain(name, evict=evict, merge=merge, gc=gc, expire=expire, reencode=reencode,
                                   rebuild=rebuild)
    _print_json(report.model_dump(mode="json"))


@banks_app.command("delete")
def banks_delete(name: Annotated[str, typer.Argument(help="The bank.", show_default=False)],
                 yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
                 url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Delete a bank with all its documents and blocks."""
    if not yes:
        typer.confirm(f"Delete bank {name} and everything in it?", abort=True)
    with _connect(url, api_key) as kv:
        kv.banks.delete(name)
    typer.echo(f"deleted bank {name}")


# -- keys ---------------------------------------------------------------------------------------------


@keys_app.command("create")
def keys_create(name: Annotated[str, typer.Argument(help="A name for the key.", show_default=False)],
                role: Annotated[str, typer.Option(help="read | write | admin.")] = "read",
                bank: Annotated[list[str] | None, typer.Option("--bank", "-b", help="A bank the key may use "
                                                                "(repeat; default: all).")] = None,
                agent: Annotated[str | None, typer.Option(help="Agent its writes are attributed to "
                                                          "(default: the name).")] = None,
                json_out: JsonOut = False, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Create an API key; its secret is printed once and cannot be shown again."""
    with _connect(url, api_key) as kv:
        key = kv.keys.create(name, role=role, banks=bank or ["*"], agent=agent)
    if json_out:
        _print_json(key.model_dump(mode="json"))
        return
    typer.echo(key.key)
    typer.echo(f"key {key.id} ({key.role} on {', '.join(key.banks)}, agent {key.agent}); "
               "store the secret above now: it is not shown again", err=True)


@keys_app.command("list")
def keys_list(json_out: JsonOut = False, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """List keys (id, prefix, role, banks; never secrets)."""
    with _connect(url, api_key) as kv:
        keys = kv.keys.list()
    if json_out:
        _print_json([k.model_dump(mode="json") for k in keys])
        return
    for key in keys:
        typer.echo(f"{key.id}\t{key.prefix}\t{key.name}\t{key.role}\t{','.join(key.banks)}\tagent={key.agent}")


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="The key's id.", show_default=False)],
                url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Revoke a key; requests with it fail at once."""
    with _connect(url, api_key) as kv:
        kv.keys.delete(key_id)
    typer.echo(f"revoked key {key_id}")


# -- context map --------------------------------------------------------------------------------------

MAP_SECTIONS = ("roadmap", "understanding", "reusable_results")


def _print_map(cmap: ContextMap) -> None:
    typer.echo(f"version {cmap.version} | {cmap.tokens}/{cmap.budget_tokens} tokens"
               f"{' | frozen' if cmap.frozen else ''}")
    for section in MAP_SECTIONS:
        items = [i for i in cmap.items if i.section == section]
        if items:
            typer.echo(f"[{section}]")
        for item in items:
            typer.echo(f"  {item.id}  (+{item.helpful}/-{item.harmful}, score {item.score:.2f}"
                       f"{', stale' if item.stale else ''})  {item.content}")


def _pairs(values: list[str], option: str) -> list[tuple[str, str]]:
    """``KEY=TEXT`` option values split once at the first '='."""
    out = []
    for value in values:
        key, sep, text = value.partition("=")
        if not sep or not key or not text.strip():
            raise _fail(f"{option} takes KEY=TEXT, got {value!r}")
        out.append((key.strip(), text.strip()))
    return out


@map_app.command("show")
def map_show(bank: Bank, version: Annotated[int | None, typer.Option(min=0, help="An older version.")] = None,
             json_out: JsonOut = False, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Print the bank's context map (or an older version) by section, with ids, votes and scores."""
    with _connect(url, api_key) as kv:
        cmap = kv.context_map.get(bank, version=version)
    if json_out:
        _print_json(cmap.model_dump(mode="json"))
        return
    _print_map(cmap)


@map_app.command("edit")
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
        if section not in MAP_SECTIONS:
            raise _fail(f"--add: section must be one of {', '.join(MAP_SECTIONS)}")
    edits = ([{"op": "add", "section": sec, "content": text} for sec, text in _pairs(add, "--add")]
             + [{"op": "replace", "id": item, "content": text} for item, text in _pairs(replace, "--replace")]
             + [{"op": "delete", "id": item} for item in delete])
    feedback = [{"id": item, "tag": tag} for tag, ids in (("helpful", helpful), ("harmful", harmful),
                                                          ("stale", stale)) for item in ids]
    if not edits and not feedback and frozen is None and budget is None:
        raise _fail("nothing to do: give --add, --replace, --delete, a vote, --freeze/--unfreeze or --budget")
    with _connect(url, api_key) as kv:
        result = None
        if edits or feedback:
            result = kv.context_map.edit(bank, edits, feedback=feedback, base_version=base_version)
        if frozen is not None or budget is not None:
            kv.context_map.update(bank, frozen=frozen, budget_tokens=budget)
        cmap = kv.context_map.get(bank)
    if json_out:
        _print_json({"edit": result.model_dump(mode="json") if result else None, "map": cmap.model_dump(mode="json")})
        return
    if result is not None:
        applied = ", ".join(f"{a['op']} {a['id']}" + (f" {a['tag']}" if "tag" in a else "") for a in result.applied)
        typer.echo(f"applied: {applied or 'nothing'}")
        if result.evicted:
            typer.echo(f"evicted to fit the budget: {', '.join(result.evicted)}")
    _print_map(cmap)


@map_app.command("refresh")
def map_refresh(bank: Bank, json_out: JsonOut = False, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Distill the bank's recent queries into map edits with the server's map LLM and apply them."""
    with _connect(url, api_key) as kv:
        report = kv.context_map.refresh(bank)
    if json_out:
        _print_json(report.model_dump(mode="json"))
        return
    typer.echo(f"{report.status}: version {report.version}, {report.tokens} tokens, {report.records} queries "
               f"distilled by {report.llm}")
    for entry in report.applied:
        typer.echo(f"  applied {entry['op']} {entry['id']}")
    for entry in report.rejected:
        typer.echo(f"  rejected {entry}")
    if report.evicted:
        typer.echo(f"  evicted {', '.join(report.evicted)}")
    if report.error:
        typer.echo(f"  {report.error}", err=True)
    if report.status in ("unparseable", "llm_error"):
        raise typer.Exit(1)


# -- sessions -----------------------------------------------------------------------------------------

SessionId = Annotated[str, typer.Argument(help="The session.", show_default=False)]


@sessions_app.command("create")
def sessions_create(bank: Bank, session_id: Annotated[str | None, typer.Argument(
                        help="Default: a random id.", show_default=False)] = None,
                    url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Create an empty session; prints its id."""
    with _connect(url, api_key) as kv:
        typer.echo(kv.sessions.create(bank, session_id).session_id)


@sessions_app.command("append")
def sessions_append(bank: Bank, session_id: SessionId,
                    text: Annotated[str, typer.Argument(help="The segment's text ('-': read stdin).",
                                                        show_default=False)],
                    role: Annotated[str, typer.Option(help="orchestrator | tool | worker | note.")] = "note",
                    agent: Annotated[str | None, typer.Option(help="Default: the key's agent.")] = None,
                    url: Url = DEFAULT_URL, api_key: ApiKey = None, json_out: JsonOut = False) -> None:
    """Append one segment; only its tokens are prefilled."""
    body = typer.get_text_stream("stdin").read() if text == "-" else text
    with _connect(url, api_key) as kv:
        result = kv.sessions.append(bank, session_id, [{"role": role, "text": body, "agent": agent}])
    if json_out:
        _print_json(result.model_dump(mode="json"))
        return
    typer.echo(f"segment {result.segment_ids[0]}: {result.token_counts[0]} tokens; session holds {result.tokens}")


@sessions_app.command("brief")
def sessions_brief(bank: Bank, session_id: SessionId,
                   task: Annotated[str, typer.Argument(help="The worker's task.", show_default=False)],
                   budget_tokens: Annotated[int | None, typer.Option(min=0, help="Keep at most this many.")] = None,
                   tau: Annotated[float | None, typer.Option(help="Keep above median + tau * MAD.")] = None,
                   selection: Annotated[str | None, typer.Option(
                       help="segments (whole segments by attention density, then chunks) or tokens.")] = None,
                   include_documents: Annotated[int, typer.Option(min=0, help="Add the top-k bank blocks.")] = 0,
                   max_new_tokens: Annotated[int, typer.Option(min=0)] = 64,
                   url: Url = DEFAULT_URL, api_key: ApiKey = None, json_out: JsonOut = False) -> None:
    """Answer a task from the session compacted to what the task attends to."""
    with _connect(url, api_key) as kv:
        result = kv.sessions.brief(bank, session_id, task, budget_tokens=budget_tokens, tau=tau,
                                   include_documents=include_documents, max_new_tokens=max_new_tokens,
                                   selection=selection)
    if json_out:
        _print_json(result.model_dump(mode="json"))
        return
    typer.echo(result.answer)
    typer.echo(f"[{result.kept_tokens}/{result.session_tokens} session tokens, compaction "
               f"{result.compaction_ms:.0f} ms, ttft {result.timings.ttft_ms:.0f} ms]", err=True)


@sessions_app.command("prune")
def sessions_prune(bank: Bank, session_id: SessionId,
                   policy: Annotated[str, typer.Option(help="model | attention.")] = "model",
                   goal: Annotated[str | None, typer.Option(help="What the agent still has to do.")] = None,
                   url: Url = DEFAULT_URL, api_key: ApiKey = None, json_out: JsonOut = False) -> None:
    """Drop the KV of segments no longer needed (their text stays)."""
    with _connect(url, api_key) as kv:
        result = kv.sessions.prune(bank, session_id, policy=policy, goal=goal)
    if json_out:
        _print_json(result.model_dump(mode="json"))
        return
    typer.echo(f"pruned {result.pruned or 'nothing'}: {result.tokens_before} -> {result.tokens_after} tokens")
    if result.error:
        typer.echo(f"  {result.error}", err=True)


@sessions_app.command("get")
def sessions_get(bank: Bank, session_id: SessionId, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Show a session (segments, live tokens, stored bytes) as JSON."""
    with _connect(url, api_key) as kv:
        _print_json(kv.sessions.get(bank, session_id).model_dump(mode="json"))


@sessions_app.command("delete")
def sessions_delete(bank: Bank, session_id: SessionId, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Delete a session with its KV."""
    with _connect(url, api_key) as kv:
        kv.sessions.delete(bank, session_id)
    typer.echo(f"deleted session {session_id}")


# -- agents -------------------------------------------------------------------------------------------


@app.command("mcp")
def mcp_stdio(bank: Bank, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Serve MCP tools (remember, recall, ask, forget, context_map, context_map_edit) on one bank over
    stdio, for an agent that starts this command; every call goes to the kvrag server with this key."""
    from kvrag.mcp import run_stdio

    run_stdio(bank, url, api_key)


if __name__ == "__main__":
    app()
