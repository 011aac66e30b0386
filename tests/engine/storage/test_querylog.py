"""The engine reads behind the console: the query log (bounded, purged with its bank), block pages with tiers
and heat, context-map versions, session lists, and the migration that creates the log."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, inspect, select

from kvstore.sessions.values import SegmentInput
from kvstore.storage.catalog import QueryLogRow, upgrade
from kvstore.storage.querylog import PREVIEW_CHARS, preview

TEXTS = ["The Normans settled in Normandy in the tenth century.", "Paris is the capital of France.",
         "Photosynthesis stores light energy in glucose.", "The Seine flows through Paris."]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def open_store(request: pytest.FixtureRequest, make_store) -> Callable[..., object]:
    """``make_store`` on SQLite, or on a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return make_store
    url = request.getfixturevalue("postgres_url")
    return lambda **settings: make_store(database_url=url, **settings)


def _log_rows(store, bank_id: int | None = None) -> int:
    with store.sessions() as s:
        q = select(func.count()).select_from(QueryLogRow)
        if bank_id is not None:
            q = q.where(QueryLogRow.bank_id == bank_id)
        return int(s.scalar(q) or 0)


def test_query_log_keeps_the_newest_per_bank_and_goes_with_its_bank(open_store) -> None:
    store = open_store(query_log_keep=3)
    for bank in ("a", "b"):
        store.create_bank(bank)
        store.put_document(bank, "d1", TEXTS[0])
    result = store.query("a", "where did the Normans settle", k=1, max_new_tokens=2)
    for i in range(5):
        store.log_query("a", f"question {i}", result, k=1, agent="agent-a")
    store.log_query("b", "other bank", result, k=1, agent=None, door="openai")
    entries = store.recent_queries("a")
    assert [e.question_preview for e in entries] == ["question 2", "question 3", "question 4"]  # oldest first
    assert all(e.mode == "kv" and e.ttft_ms == result.timings.ttft_ms and e.k == 1 for e in entries)
    assert entries[-1].context_tokens == result.usage.context_tokens and entries[-1].agent == "agent-a"
    other = store.recent_queries("b")
    assert len(other) == 1 and other[0].door == "openai" and other[0].agent is None
    assert _log_rows(store) == 4
    store.delete_bank("a")
    assert _log_rows(store) == 1 and store.recent_queries("b")[0].question_preview == "other bank"


def test_question_preview_is_short_and_on_one_line() -> None:
    assert preview("  where   is\nParis ") == "where is Paris"
    long = preview("x" * 500)
    assert len(long) == PREVIEW_CHARS and long.endswith("…")


def test_list_blocks_pages_in_id_order_with_tier_codec_and_heat(open_store) -> None:
    store = open_store()
    store.create_bank("m")
    for i, text in enumerate(TEXTS):
        store.put_document("m", f"doc-{i}", text)
    seen, cursor = [], None
    while True:
        page, cursor = store.list_blocks("m", cursor=cursor, limit=3)
        seen += page
        if cursor is None:
            break
    assert [b.block_id for b in seen] == sorted(b.block_id for b in seen) and len(seen) == len(TEXTS)
    assert {b.doc_id for b in seen} == {f"doc-{i}" for i in range(len(TEXTS))}
    assert all(b.tier in ("hot", "warm") and b.stored_bytes > 0 and b.codec == store.get_bank("m").codec
               for b in seen)
    assert all(b.heat == 0 and b.access_count == 0 for b in seen)
    store.query("m", "Normans Normandy", k=1, max_new_tokens=1)
    used = [b for b in store.list_blocks("m")[0] if b.access_count]
    assert len(used) == 1 and used[0].heat > 0.9 and used[0].last_access_at is not None
    assert used[0].tier == "hot"  # the query decoded it into RAM
    one, _ = store.list_blocks("m", doc_id="doc-2")
    assert [b.doc_id for b in one] == ["doc-2"]
    store.update_bank("m", max_blocks=1)  # evicts all but one block to cold
    tiers = [b.tier for b in store.list_blocks("m")[0]]
    assert tiers.count("cold") == len(TEXTS) - 1
    assert all(b.stored_bytes == 0 for b in store.list_blocks("m")[0] if b.tier == "cold")


def test_context_map_versions_page_newest_first(make_store) -> None:
    store = make_store()
    store.create_bank("v")
    for i in range(3):
        store.context_map.edit("v", [{"op": "add", "section": "understanding", "content": f"fact {i}"}], agent="x")
    newest = store.context_map.versions("v", limit=2)
    assert [v.version for v in newest] == [3, 2] and newest[0].items == 3 and newest[0].agent == "x"
    older = store.context_map.versions("v", before=newest[-1].version, limit=2)
    assert [v.version for v in older] == [1, 0] and older[-1].change == "create"


def test_list_sessions_counts_kept_and_pruned_segments(open_store) -> None:
    store = open_store(session_prune_max_fraction=1.0)  # one prune may drop two of three segments
    store.create_bank("s")
    sessions = store.agent_sessions
    for sid in ("s-b", "s-a", "s-c"):
        sessions.create("s", sid, agent="agent-x")
    sessions.append("s", "s-a", [SegmentInput("orchestrator", "plan the day"), SegmentInput("tool", "it rains"),
                                 SegmentInput("worker", "took an umbrella")])
    sessions.prune("s", "s-a", policy="model", judge=lambda prompt, ids: '{"needed": [0]}')
    first, cursor = sessions.list_sessions("s", limit=2)
    rest, end = sessions.list_sessions("s", cursor=cursor, limit=2)
    assert [x.session_id for x in first + rest] == ["s-a", "s-b", "s-c"] and end is None
    a = first[0]
    assert (a.segments, a.pruned_segments) == (3, 2) and 0 < a.tokens < a.total_tokens
    assert (first[1].segments, first[1].tokens) == (0, 0)


def test_migration_creates_the_query_log_as_the_model_declares_it(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'c.sqlite3'}"
    upgrade(url)
    found = inspect(create_engine(url))
    assert {c["name"] for c in found.get_columns("query_log")} == set(QueryLogRow.__table__.columns.keys())
    assert any(ix["column_names"] == ["bank_id", "id"] for ix in found.get_indexes("query_log"))
    assert any(ix["column_names"] == ["bank_id", "id"] for ix in found.get_indexes("blocks"))
    assert found.get_foreign_keys("query_log")[0]["options"].get("ondelete") == "CASCADE"
