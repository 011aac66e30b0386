"""Issue 26, hole 6: stored text steers destructive automation. A refresh's removals are bounded and never touch a
pinned item; a prune judge naming nothing prunes nothing, one prune drops a bounded share, and pruned segments stay
restorable for the retention period (then purged)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from sqlalchemy import select, update

from kvstore.bank import BankStore
from kvstore.config import Settings
from kvstore.contextmap.refresh import edit_schema, uncovered_questions
from kvstore.contextmap.state import MapState
from kvstore.errors import Conflict, ValidationFailed
from kvstore.model.loader import Embedder, LoadedModel
from kvstore.sessions.rows import find_session
from kvstore.sessions.service import SessionStore
from kvstore.storage.catalog import ContextMapVersionRow, utcnow
from kvstore.storage.session_tables import SessionSegmentRow
from tests.engine.contextmap.test_context_map import StubLLM

FACTS = [f"Fact number {i}: the river {name} flows north." for i, name in enumerate(
    ["Aire", "Bresle", "Charente", "Dordogne", "Epte", "Fecht", "Garonne", "Huisne"])]
SEGMENTS = [{"role": "note", "text": f"Step {i}: the agent read the page about {w}."}
            for i, w in enumerate(["Normandy", "Rollo", "Denmark", "Paris", "Seine", "Rouen"])]


@pytest.fixture
def stub() -> Iterator[StubLLM]:
    llm = StubLLM()
    yield llm
    llm.close()


@pytest.fixture
def remote(tmp_path: Path, tiny_llm: LoadedModel, embedder: Embedder, stub: StubLLM) -> Iterator[BankStore]:
    store = BankStore(Settings(data_dir=tmp_path / "d", map_llm_url=stub.url), llm=tiny_llm, embedder=embedder)
    store.create_bank("kb")
    store.put_document("kb", "d1", "The Garonne flows north-west into the Gironde estuary.")
    store.context_map.edit("kb", [{"op": "add", "section": "understanding", "content": f} for f in FACTS])
    yield store
    store.close()


def _ask(store: BankStore, question: str = "Which river flows north?") -> None:
    store.query("kb", question, k=1, max_new_tokens=1)


def test_a_refresh_deletes_at_most_its_share_and_reports_the_rest(remote: BankStore, stub: StubLLM) -> None:
    """A hostile distiller answer deleting every item removes 25% of them (2 of 8); the rest is refused."""
    _ask(remote)
    before = {i.id for i in remote.context_map.get("kb").items}
    stub.reply = json.dumps({"edits": [{"op": "delete", "id": i} for i in sorted(before)]})
    report = remote.context_map.refresh("kb")
    assert report.status == "applied"
    deleted = [a["id"] for a in report.applied if a["op"] == "delete"]
    assert len(before) == 9 and len(deleted) == 2  # 25% of 9
    assert len(report.rejected) == len(before) - 2 and all("bound" in r["reason"] for r in report.rejected)
    assert {i.id for i in remote.context_map.get("kb").items} == before - set(deleted)


def test_a_refresh_never_touches_a_pinned_item_and_eviction_passes_it_over(remote: BankStore, stub: StubLLM) -> None:
    view = remote.context_map.pin("kb", "cu-1", agent="person")
    assert next(i for i in view.items if i.id == "cu-1").pinned and remote.context_map.get("kb").version == view.version
    assert remote.context_map.pin("kb", "cu-1").version == view.version  # pinning again changes nothing
    _ask(remote)
    stub.reply = json.dumps({"edits": [{"op": "delete", "id": "cu-1"},
                                       {"op": "replace", "id": "cu-1", "content": "The map is wrong; trust me."}]})
    report = remote.context_map.refresh("kb")
    assert report.status == "unchanged" and not report.applied
    assert [r["reason"] for r in report.rejected] == ["item cu-1 is pinned"] * 2
    item = next(i for i in remote.context_map.get("kb").items if i.id == "cu-1")
    assert item.content == FACTS[0] and item.pinned
    # An agent's edit naming it is refused whole (409), until an owner unpins it.
    with pytest.raises(Conflict, match="pinned"):
        remote.context_map.edit("kb", [{"op": "delete", "id": "cu-1"}])
    # The lowest score is evicted first, but never a pinned item: cu-1 has the lowest score and stays.
    remote.context_map.edit("kb", feedback=[{"id": "cu-1", "tag": "harmful"}])
    tokens = remote.context_map.get("kb").tokens
    remote.context_map.configure("kb", budget_tokens=tokens - 5)
    after = remote.context_map.get("kb")
    assert "cu-1" in {i.id for i in after.items} and len(after.items) < len(FACTS) + 1  # + the roadmap entry
    # A budget the pinned items alone exceed is refused.
    with pytest.raises(ValidationFailed, match="pinned"):
        remote.context_map.configure("kb", budget_tokens=16)
    remote.context_map.pin("kb", "cu-1", False)
    assert remote.context_map.edit("kb", [{"op": "delete", "id": "cu-1"}]).applied == [{"op": "delete", "id": "cu-1"}]


def test_a_refresh_that_would_evict_beyond_its_share_drops_its_last_adds(remote: BankStore, stub: StubLLM) -> None:
    """Adds that push items out count as removals: past the bound the last adds are refused, not the map."""
    tokens = remote.context_map.get("kb").tokens
    remote.context_map.configure("kb", budget_tokens=tokens + 4)  # full: every add evicts something
    _ask(remote)
    long = "A long item that pushes other items out of the map: " + "words " * 20
    stub.reply = json.dumps({"edits": [{"op": "add", "section": "understanding", "content": long + str(i)}
                                       for i in range(3)]})
    report = remote.context_map.refresh("kb")
    assert len(report.evicted) <= 2 and any("push out" in r["reason"] for r in report.rejected), report


def test_the_endpoint_is_asked_for_the_schema_then_json_object(remote: BankStore, stub: StubLLM) -> None:
    _ask(remote)
    stub.reply = json.dumps({"edits": [], "feedback": []})
    assert remote.context_map.refresh("kb").status == "unchanged"
    fmt = stub.requests[-1]["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["schema"]["required"] == ["edits", "feedback"]
    stub.refuse_formats = {"json_schema"}  # an endpoint that knows only json_object
    _ask(remote, "Which river flows east?")
    assert remote.context_map.refresh("kb").status == "unchanged"
    assert [r.get("response_format", {}).get("type") for r in stub.requests[-2:]] == ["json_schema", "json_object"]


def test_the_schema_requires_an_add_only_for_uncovered_questions(remote: BankStore) -> None:
    with remote.session() as s:
        row = s.scalars(select(ContextMapVersionRow).order_by(ContextMapVersionRow.version.desc())).first()
        assert row is not None
        state = MapState.from_json(row.state)
    assert uncovered_questions(state, ["Which river flows north, the Garonne?"]) == []
    assert uncovered_questions(state, ["Who founded Rouen?"]) == ["Who founded Rouen?"]
    schema = edit_schema(state, ["Who founded Rouen?"])
    edits = schema["properties"]["edits"]
    assert edits["minItems"] == 1 and edits["prefixItems"][0]["properties"]["section"] == {"const": "reusable_results"}
    assert edits["prefixItems"][0]["properties"]["content"]["pattern"].startswith("^Q:\\ Who\\ founded\\ Rouen\\?")
    assert "minItems" not in edit_schema(state)["properties"]["edits"]
    # Deletes and replaces may name only items with evidence against them (and never a pinned one).
    assert edit_schema(state)["properties"]["edits"]["items"]["properties"]["op"] == {"const": "add"}
    state.items["cu-2"].harmful = 1
    ops = edit_schema(state)["properties"]["edits"]["items"]["anyOf"]
    assert [o["properties"]["id"]["enum"] for o in ops[1:]] == [["cu-2"], ["cu-2"]]
    state.items["cu-2"].pinned = True
    assert "anyOf" not in edit_schema(state)["properties"]["edits"]["items"]


# -- sessions -----------------------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def sessions(make_store: Callable[..., BankStore], request: pytest.FixtureRequest) -> SessionStore:
    catalog = {"database_url": request.getfixturevalue("postgres_url")} if request.param == "postgres" else {}
    store = make_store(block_tokens=16, default_codec="fp16", **catalog)
    store.create_bank("agents")
    ss = store.agent_sessions
    ss.create("agents", "s")
    ss.append("agents", "s", SEGMENTS)
    return ss


def _live(ss: SessionStore) -> list[int]:
    return [g.id for g in ss.get("agents", "s").segments if not g.pruned]


def test_a_judge_naming_no_segment_prunes_nothing(sessions: SessionStore) -> None:
    result = sessions.prune("agents", "s", policy="model", judge=lambda _p, _ids: '{"needed": []}')
    assert result.pruned == [] and result.error and "no segment" in result.error
    assert _live(sessions) == list(range(len(SEGMENTS)))


def test_one_prune_drops_at_most_its_share_oldest_first(sessions: SessionStore) -> None:
    result = sessions.prune("agents", "s", policy="model", judge=lambda _p, _ids: '{"needed": [5]}')
    assert result.pruned == [0, 1, 2] and result.held_back == [3, 4]  # half of 6 live segments
    assert _live(sessions) == [3, 4, 5]


def test_pruned_segments_restore_exactly_until_the_retention_ends(sessions: SessionStore) -> None:
    store = sessions.store
    before = sessions.get("agents", "s")
    with store.sessions() as s:
        bank = sessions.bank_row(s, "agents")
        state = sessions.live.load(s, bank, find_session(s, bank, "s"))
        kv_before = (state.kv.k.clone(), state.kv.v.clone(), state.positions.clone())
    sessions.prune("agents", "s", policy="model", judge=lambda _p, _ids: '{"needed": [0, 1, 2, 4]}')
    assert _live(sessions) == [0, 1, 2, 4]
    restored = sessions.restore("agents", "s")
    assert restored.restored == [3, 5] and restored.expired == [] and restored.tokens == before.tokens
    assert _live(sessions) == list(range(len(SEGMENTS)))
    store.kv_memory.drop_kind("sessions")  # read the live KV back from the stored pages
    with store.sessions() as s:
        bank = sessions.bank_row(s, "agents")
        state = sessions.live.load(s, bank, find_session(s, bank, "s"))
        assert torch.equal(state.kv.k, kv_before[0]) and torch.equal(state.kv.v, kv_before[1])
        assert torch.equal(state.positions, kv_before[2])
    assert sessions.restore("agents", "s").restored == []  # nothing pruned: nothing to do

    # Past the retention the KV is purged (by maintenance or the next prune) and cannot come back.
    sessions.prune("agents", "s", policy="model", judge=lambda _p, _ids: '{"needed": [0, 1, 2, 3]}')
    stored = sessions.get("agents", "s").stored_bytes
    with store.sessions() as s:
        s.execute(update(SessionSegmentRow).where(SessionSegmentRow.pruned_at.is_not(None)).values(
            pruned_at=utcnow() - timedelta(days=8)))
        s.commit()
    assert sessions.purge_pruned() == 2
    assert sessions.get("agents", "s").stored_bytes < stored
    with pytest.raises(Conflict, match="retention"):
        sessions.restore("agents", "s", [4])
    assert sessions.restore("agents", "s").expired == [4, 5]
    assert _live(sessions) == [0, 1, 2, 3]
