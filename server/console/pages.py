"""The console's pages: read-only views of what the key may see, every one a GET, every list a page.

Each page checks the bank against the viewer's scope first (a bank outside it is a 404, as in the API) and
reads through the engine's public methods; lists are cursor pages (one query per page, never per row).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from kvstore.storage.querylog import QueryLogEntry

from ..auth import Principal, check_bank
from ..deps import Store
from .charts import summarize, ttft_chart
from .logins import COOKIE_PATH, Viewer
from .mapdiff import diff_maps
from .render import ConsoleRoute, page

router = APIRouter(prefix=COOKIE_PATH, route_class=ConsoleRoute, include_in_schema=False)

BANKS_PER_PAGE = 25
VERSIONS_PER_PAGE = 20
RECENT_QUERIES = 200

Cursor = Annotated[str | None, Query(max_length=128)]
Limit = Annotated[int, Query(ge=1, le=200)]


def _see(viewer: Principal, bank: str) -> None:
    """404 for a bank outside the viewer's scope, exactly as for a missing one."""
    check_bank(viewer, bank, "read")


def question_shown(viewer: Principal, entry: QueryLogEntry) -> bool:
    """A question's preview is the asker's: shown to keys of the agent who asked and to admins over every
    bank; another agent's read key sees that a query ran, its timings and who ran it, not what was asked."""
    if viewer.all_banks and viewer.has_role("admin"):
        return True
    return entry.agent is not None and entry.agent == viewer.agent


@router.get("")
def banks(request: Request, store: Store, viewer: Viewer,
          after: Annotated[str | None, Query(max_length=63)] = None) -> Response:
    """The banks this key may see, a page at a time, with their tiers, bytes, codec and budget."""
    infos = store.list_banks(None if viewer.all_banks else set(viewer.banks))
    if after:
        infos = [b for b in infos if b.name > after]
    shown = infos[:BANKS_PER_PAGE]
    rows = [(info, store.stats(info.name)) for info in shown]
    return page(request, "banks.html", rows=rows, next_after=shown[-1].name if len(infos) > len(shown) else None)


@router.get("/banks/{bank}")
def bank(request: Request, bank: str, store: Store, viewer: Viewer) -> Response:
    """One bank: settings, statistics per tier, its context map's size and its queries' timings."""
    _see(viewer, bank)
    info = store.get_bank(bank)
    entries = store.recent_queries(bank, limit=RECENT_QUERIES)
    return page(request, "bank.html", bank=info, stats=store.stats(bank), cmap=store.context_map.get(bank),
                summary=summarize(entries), chart=ttft_chart(entries) if entries else None)


@router.get("/banks/{bank}/documents")
def documents(request: Request, bank: str, store: Store, viewer: Viewer, cursor: Cursor = None,
              limit: Limit = 50) -> Response:
    """A bank's documents ordered by id, a page at a time."""
    _see(viewer, bank)
    docs, next_cursor = store.list_documents(bank, cursor=cursor, limit=limit)
    return page(request, "documents.html", bank=bank, docs=docs, cursor=cursor, next_cursor=next_cursor,
                limit=limit)


@router.get("/banks/{bank}/documents/{doc_id}")
def document(request: Request, bank: str, doc_id: str, store: Store, viewer: Viewer,
             cursor: Annotated[int | None, Query(ge=0)] = None) -> Response:
    """One document: its text, metadata and blocks."""
    _see(viewer, bank)
    doc = store.get_document(bank, doc_id)
    blocks, next_cursor = store.list_blocks(bank, doc_id=doc_id, cursor=cursor, limit=100)
    return page(request, "document.html", bank=bank, doc=doc, blocks=blocks, next_cursor=next_cursor)


@router.get("/banks/{bank}/blocks")
def blocks(request: Request, bank: str, store: Store, viewer: Viewer,
           cursor: Annotated[int | None, Query(ge=0)] = None, limit: Limit = 100) -> Response:
    """A bank's blocks in id order: tier, codec, stored bytes, heat."""
    _see(viewer, bank)
    rows, next_cursor = store.list_blocks(bank, cursor=cursor, limit=limit)
    return page(request, "blocks.html", bank=bank, blocks=rows, cursor=cursor, next_cursor=next_cursor, limit=limit)


@router.get("/banks/{bank}/context-map")
def context_map(request: Request, bank: str, store: Store, viewer: Viewer,
                version: Annotated[int | None, Query(ge=0)] = None,
                before: Annotated[int | None, Query(ge=0)] = None) -> Response:
    """The context map (current or an old version) by section, and its versions."""
    _see(viewer, bank)
    current = store.context_map.get(bank)
    shown = current if version is None else store.context_map.get(bank, version)
    versions = store.context_map.versions(bank, before=before, limit=VERSIONS_PER_PAGE)
    older = versions[-1].version if len(versions) == VERSIONS_PER_PAGE and versions[-1].version > 0 else None
    return page(request, "context_map.html", bank=bank, cmap=shown, current=current, versions=versions,
                older=older)


@router.get("/banks/{bank}/context-map/diff")
def context_map_diff(request: Request, bank: str, store: Store, viewer: Viewer,
                     a: Annotated[int, Query(ge=0)], b: Annotated[int, Query(ge=0)]) -> Response:
    """What changed in the map from version ``a`` to version ``b``."""
    _see(viewer, bank)
    diff = diff_maps(store.context_map.get(bank, a), store.context_map.get(bank, b))
    return page(request, "map_diff.html", bank=bank, diff=diff)


@router.get("/banks/{bank}/sessions")
def sessions(request: Request, bank: str, store: Store, viewer: Viewer, cursor: Cursor = None,
             limit: Limit = 50) -> Response:
    """A bank's agent sessions with their kept and pruned segment counts."""
    _see(viewer, bank)
    rows, next_cursor = store.agent_sessions.list_sessions(bank, cursor=cursor, limit=limit)
    return page(request, "sessions.html", bank=bank, sessions=rows, cursor=cursor, next_cursor=next_cursor)


@router.get("/banks/{bank}/sessions/{session_id}")
def session(request: Request, bank: str, session_id: str, store: Store, viewer: Viewer) -> Response:
    """One session's segments, kept and pruned (pruned ones keep their text)."""
    _see(viewer, bank)
    return page(request, "session.html", bank=bank, session=store.agent_sessions.get(bank, session_id))


@router.get("/banks/{bank}/queries")
def queries(request: Request, bank: str, store: Store, viewer: Viewer) -> Response:
    """Recent queries with their timings, kv against text, as a chart and a table."""
    _see(viewer, bank)
    entries = store.recent_queries(bank, limit=RECENT_QUERIES)
    rows = [(e, question_shown(viewer, e)) for e in reversed(entries)]
    return page(request, "queries.html", bank=bank, chart=ttft_chart(entries), summary=summarize(entries),
                rows=rows)
