"""``kvrag ingest``: files and folders into a bank, with a progress bar and the throughput."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
from kvrag_client import Conflict
from tqdm import tqdm

from .common import DEFAULT_URL, ApiKey, Bank, JsonOut, Url, bad_value, connect, fail, print_json

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIX = ".jsonl"
DOC_ID_CHARS = re.compile(r"[^A-Za-z0-9._:-]")


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
            raise fail(f"{where}: not JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("id"), str | int) or \
                not isinstance(record.get("text"), str):
            raise fail(f"{where}: each line needs an \"id\" and a \"text\"")
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
            raise bad_value(f"{path}: no such file or folder", "PATHS")
    return docs


def _batches(docs: list[Doc], size: int) -> Iterator[list[Doc]]:
    for start in range(0, len(docs), size):
        yield docs[start:start + size]


def ingest(paths: Annotated[list[Path], typer.Argument(help="Files and folders (.txt, .md, .jsonl).",
                                                       show_default=False)],
           bank: Bank,
           glob: Annotated[str | None, typer.Option("--glob", help="Files to take inside folders, e.g. "
                                                    "'**/*.md' (default: all .txt, .md, .jsonl).")] = None,
           create: Annotated[bool, typer.Option("--create", help="Create the bank if it does not exist.")] = False,
           batch_size: Annotated[int, typer.Option(min=1, help="Documents per request.")] = 16,
           json_out: JsonOut = False, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Store files as documents: .txt/.md one each (id from the relative path), .jsonl one per line
    ({"id", "text", "metadata"?, "tags"?}). Shows documents/s and tokens/s."""
    docs = collect_documents(paths, glob)
    empty = [d for d in docs if not d.text.strip()]
    for doc in empty:
        typer.echo(f"skipped {doc.source}: empty", err=True)
    docs = [d for d in docs if d.text.strip()]
    with connect(url, api_key) as kv:
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
    unchanged = len(docs) - created - changed
    if json_out:
        print_json({"bank": bank, "documents": len(docs), "created": created, "updated": changed,
                    "unchanged": unchanged, "skipped": [d.source for d in empty], "tokens": tokens,
                    "seconds": round(elapsed, 3)})
        return
    typer.echo(f"{len(docs)} documents into {bank}: {created} new, {changed} updated, "
               f"{unchanged} unchanged; {tokens} tokens in {elapsed:.1f} s "
               f"({len(docs) / elapsed:.1f} docs/s, {tokens / elapsed:.0f} tokens/s)")
