"""The context map engine (kvstore.contextmap) on a real SQLite catalog with the tiny model's tokenizer."""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch
from alembic.config import Config
from alembic.script import ScriptDirectory
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from kvstore.bank import BankStore
from kvstore.config import Settings
from kvstore.contextmap.state import (
    SECTIONS,
    Edit,
    Feedback,
    MapState,
    apply_changes,
    parse_distilled,
    render,
    roadmap_entry,
)
from kvstore.errors import Conflict, NotFound, ValidationFailed, VersionMismatch
from kvstore.model.loader import Embedder, LoadedModel
from kvstore.storage.catalog import ContextMapQueryRow, ContextMapRow, ContextMapVersionRow
from kvstore.types import Context

NORMANS = ("The Normans were the people who in the 10th and 11th centuries gave their name to Normandy. "
           "They were descended from Norse raiders and pirates from Denmark, Iceland and Norway.")
PARIS = "Paris is the capital and most populous city of France. The Seine flows through it."
PHOTO = "Photosynthesis converts light energy into chemical energy stored in glucose."
WORDS = ["normans", "paris", "seine", "glucose", "light", "who", "when", "where", "10th", "France", "rivers",
         "xylophone", "quartz"]
_names = itertools.count()


def new_bank(store: BankStore, **options: Any) -> str:
    name = f"m{next(_names)}"
    store.create_bank(name, **options)
    return name


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, tiny_llm: LoadedModel, embedder: Embedder) -> Iterator[BankStore]:
    s = BankStore(Settings(data_dir=tmp_path_factory.mktemp("cmap")), llm=tiny_llm, embedder=embedder)
    yield s
    s.sessions.kw["bind"].dispose()


def test_single_alembic_head() -> None:
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).resolve().parents[3] / "migrations"))
    heads = ScriptDirectory.from_config(cfg).get_heads()
    assert len(heads) == 1, heads


# -- pure state ---------------------------------------------------------------------------------------


def test_render_orders_sections_and_ids() -> None:
    state = MapState()
    from datetime import UTC, datetime

    now = datetime.now(UTC)
    edits = [Edit(op="add", section="reusable_results", content="answer A"),
             Edit(op="add", section="roadmap", content="docs about X"),
             Edit(op="add", section="roadmap", content="docs about Y")]
    out = apply_changes(state, edits, [], version=1, current_version=0, base_version=None, agent="a", now=now,
                        count_tokens=lambda t: len(t.split()))
    text = render(out.state)
    assert text.index("[roadmap]") < text.index("cr-1: docs about X") < text.index("cr-2") < text.index("rr-1")
    assert render(MapState()) == ""
    assert [a["id"] for a in out.applied] == ["rr-1", "cr-1", "cr-2"]


def test_edit_and_feedback_validation() -> None:
    for bad in ({"op": "add", "content": "x"}, {"op": "add", "section": "roadmap", "content": "x", "id": "cr-1"},
                {"op": "replace", "id": "cr-1"}, {"op": "delete"}, {"op": "delete", "id": "cr-1", "content": "x"},
                {"op": "add", "section": "nope", "content": "x"}, {"op": "add", "section": "roadmap", "content": " "},
                {"op": "move", "id": "cr-1"}):
        with pytest.raises(ValueError):
            Edit.model_validate(bad)
    with pytest.raises(ValueError):
        Feedback.model_validate({"id": "cr-1", "tag": "great"})


def test_parse_distilled_is_strict() -> None:
    good = parse_distilled('{"edits": [{"op": "add", "section": "understanding", "content": "x"}]}')
    assert good.edits[0].section == "understanding" and good.feedback == []
    fenced = parse_distilled('```json\n[{"op": "delete", "id": "cu-2"}]\n```')
    assert fenced.edits[0].op == "delete"
    for garbage in ("", "Sure! Here are the edits: []", '{"edits": [{"op": "add"}]}', '{"edit": []}',
                    '[{"op": "add", "section": "roadmap", "content": 3}]', "```\n[]\n``` and more", "null"):
        with pytest.raises(ValueError):
            parse_distilled(garbage)


def test_roadmap_entry_is_first_sentence_and_doc_id() -> None:
    assert roadmap_entry("p1", NORMANS) == ("The Normans were the people who in the 10th and 11th centuries gave "
                                            "their name to Normandy. (doc p1)")
    long = roadmap_entry("p2", "word " * 100)
    assert long.endswith("... (doc p2)") and len(long) < 180


# -- properties through the store ---------------------------------------------------------------------

contents = st.lists(st.sampled_from(WORDS), min_size=1, max_size=12).map(" ".join)
steps = st.lists(st.one_of(
    st.tuples(st.just("add"), st.sampled_from(list(SECTIONS)), contents),
    st.tuples(st.just("replace"), st.integers(0, 30), contents),
    st.tuples(st.just("delete"), st.integers(0, 30)),
    st.tuples(st.just("feedback"), st.integers(0, 30), st.sampled_from(["helpful", "harmful", "neutral", "stale"])),
    st.tuples(st.just("budget"), st.integers(40, 400)),
), min_size=1, max_size=25)


def _target(ids: list[str], index: int) -> str:
    """An existing id most of the time, else an id that does not exist."""
    return ids[index % len(ids)] if ids and index < 25 else f"cu-{900 + index}"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(budget=st.integers(40, 400), ops=steps)
def test_any_edit_sequence_keeps_budget_ids_and_versions(store: BankStore, budget: int,
                                                          ops: list[tuple[Any, ...]]) -> None:
    bank = new_bank(store, context_map_budget_tokens=budget)
    cmap = store.context_map
    seen: set[str] = set()
    version = cmap.get(bank).version  # setting the budget at creation is a change like any other
    history: dict[int, list[tuple[str, str]]] = {version: []}
    for op in ops:
        ids = [i.id for i in cmap.get(bank).items]
        try:
            if op[0] == "add":
                result = cmap.edit(bank, [{"op": "add", "section": op[1], "content": op[2]}], agent="prop")
                new_id = result.applied[0]["id"]
                assert new_id not in seen, "an id was reused"
                seen.add(new_id)
            elif op[0] == "replace":
                result = cmap.edit(bank, [{"op": "replace", "id": _target(ids, op[1]), "content": op[2]}])
            elif op[0] == "delete":
                result = cmap.edit(bank, [{"op": "delete", "id": _target(ids, op[1])}])
            elif op[0] == "feedback":
                result = cmap.edit(bank, feedback=[{"id": _target(ids, op[1]), "tag": op[2]}])
            else:
                cmap.configure(bank, budget_tokens=op[1])
                result = None
        except (NotFound, ValidationFailed):
            assert cmap.get(bank).version == version, "a refused edit changed the map"
            continue
        view = cmap.get(bank)
        assert view.version >= version and (result is None or result.version == view.version > version)
        version = view.version
        rendered = render(MapState.from_json({"items": [
            {**vars(i), "created_at": i.created_at.isoformat(), "updated_at": i.updated_at.isoformat(), "rev": 0}
            for i in view.items]}))
        assert view.tokens == cmap.count_tokens(rendered) <= view.budget_tokens
        assert len({i.id for i in view.items}) == len(view.items)
        assert {i.id for i in view.items} <= seen
        if result is not None:
            assert not set(result.evicted) & {i.id for i in view.items}
        history[version] = [(i.id, i.content) for i in view.items]
    for old, items in history.items():  # every version stays readable as it was
        assert [(i.id, i.content) for i in cmap.get(bank, version=old).items] == items


# -- semantics ------------------------------------------------------------------------------------------


def test_base_version_conflicts_only_for_changed_items(store: BankStore) -> None:
    bank = new_bank(store)
    cmap = store.context_map
    v1 = cmap.edit(bank, [{"op": "add", "section": "understanding", "content": "alpha"},
                          {"op": "add", "section": "understanding", "content": "beta"}]).version
    v2 = cmap.edit(bank, [{"op": "replace", "id": "cu-2", "content": "beta two"}], base_version=v1).version
    # cu-1 is unchanged since v1: a stale base still applies cleanly; cu-2 changed after v1: refused.
    v3 = cmap.edit(bank, [{"op": "replace", "id": "cu-1", "content": "alpha two"}], base_version=v1).version
    assert v3 == v2 + 1
    with pytest.raises(VersionMismatch):
        cmap.edit(bank, [{"op": "delete", "id": "cu-2"}], base_version=v1)
    with pytest.raises(VersionMismatch):
        cmap.edit(bank, feedback=[{"id": "cu-2", "tag": "helpful"}], base_version=v1)
    with pytest.raises(VersionMismatch):
        cmap.edit(bank, [{"op": "add", "section": "roadmap", "content": "x"}], base_version=v3 + 5)
    assert cmap.edit(bank, [{"op": "add", "section": "roadmap", "content": "gamma"}], base_version=0).version == v3 + 1
    with pytest.raises(NotFound):
        cmap.edit(bank, [{"op": "delete", "id": "rr-7"}])
    with pytest.raises(ValidationFailed):
        cmap.edit(bank, [{"op": "replace", "id": "cu-1", "section": "roadmap", "content": "moved"}])
    with pytest.raises(ValidationFailed):  # all or nothing: the good first edit is not applied either
        cmap.edit(bank, [{"op": "add", "section": "roadmap", "content": "ok"}, {"op": "delete", "id": "bad"}])
    assert cmap.get(bank).version == v3 + 1
    assert [i.content for i in cmap.get(bank, version=v1).items] == ["alpha", "beta"]


def test_eviction_is_lowest_score_then_oldest(store: BankStore) -> None:
    bank = new_bank(store, context_map_budget_tokens=400)
    cmap = store.context_map
    cmap.edit(bank, [{"op": "add", "section": "understanding", "content": f"fact {w} " * 4} for w in WORDS[:6]])
    cmap.edit(bank, feedback=[{"id": "cu-1", "tag": "helpful"}, {"id": "cu-3", "tag": "harmful"}])
    tokens = cmap.get(bank).tokens
    view = cmap.configure(bank, budget_tokens=tokens * 2 // 3)
    kept = [i.id for i in view.items]
    assert "cu-3" not in kept and "cu-1" in kept  # harmful first, then the oldest; the helpful one stays
    assert "cu-2" not in kept and view.tokens <= view.budget_tokens
    version = view.version
    assert cmap.configure(bank, budget_tokens=view.budget_tokens).version == version  # no change, no version
    assert cmap.configure(bank, frozen=True).frozen


def test_concurrent_editors_lose_no_acknowledged_edit(store: BankStore) -> None:
    bank = new_bank(store, context_map_budget_tokens=32768)
    cmap = store.context_map
    acked: list[tuple[str, str]] = []
    lock = threading.Lock()
    start = cmap.get(bank).version

    def writer(n: int) -> None:
        for j in range(8):
            content = f"writer {n} note {j}"
            result = cmap.edit(bank, [{"op": "add", "section": "understanding", "content": content}],
                               agent=f"w{n}")
            with lock:
                acked.append((result.applied[0]["id"], content))

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    view = cmap.get(bank)
    assert sorted((i.id, i.content) for i in view.items) == sorted(acked) and view.version == start + 32
    assert len({i for i, _ in acked}) == 32

    # Racing replaces of one item from the same base: one wins, the others are told (409), none vanishes.
    outcomes: list[tuple[str, int | None]] = []

    def replacer(n: int, base: int) -> None:
        try:
            result = cmap.edit(bank, [{"op": "replace", "id": "cu-1", "content": f"winner {n}"}], base_version=base)
            outcomes.append((f"winner {n}", result.version))
        except VersionMismatch:
            outcomes.append((f"winner {n}", None))

    base = view.version
    threads = [threading.Thread(target=replacer, args=(n, base)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [(c, v) for c, v in outcomes if v is not None]
    assert len(won) == 1 and next(i.content for i in cmap.get(bank).items if i.id == "cu-1") == won[0][0]

    # Feedback from a stale base on an unchanged item commutes: every acknowledged vote counts.
    base = cmap.get(bank).version
    threads = [threading.Thread(target=lambda: cmap.edit(bank, feedback=[{"id": "cu-2", "tag": "helpful"}],
                                                         base_version=base)) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert next(i.helpful for i in cmap.get(bank).items if i.id == "cu-2") == 5


def test_concurrent_stores_on_one_catalog_lose_nothing(tmp_path: Path, tiny_llm: LoadedModel,
                                                       embedder: Embedder) -> None:
    """Two processes' worth of stores (no shared lock): the catalog's version check alone keeps every edit."""
    settings_ = Settings(data_dir=tmp_path / "d")
    stores = [BankStore(settings_, llm=tiny_llm, embedder=embedder) for _ in range(2)]
    stores[0].create_bank("shared")
    acked: list[str] = []

    def writer(st_: BankStore, n: int) -> None:
        for j in range(6):
            acked.append(st_.context_map.edit("shared", [{"op": "add", "section": "roadmap",
                                                          "content": f"s{n} {j}"}]).applied[0]["id"])

    threads = [threading.Thread(target=writer, args=(stores[n % 2], n)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    view = stores[1].context_map.get("shared")
    assert sorted(i.id for i in view.items) == sorted(acked) and view.version == 24
    for st_ in stores:
        st_.sessions.kw["bind"].dispose()


# -- bootstrap, query, records ---------------------------------------------------------------------------


def test_bootstrap_adds_roadmap_entries_until_the_budget_says_no(store: BankStore) -> None:
    bank = new_bank(store)
    store.put_document(bank, "normans", NORMANS, agent="alice")
    store.put_document(bank, "paris", PARIS)
    items = store.context_map.get(bank).items
    assert [(i.id, i.section, i.agent) for i in items] == [("cr-1", "roadmap", "alice"), ("cr-2", "roadmap", None)]
    assert items[0].content.endswith("(doc normans)") and items[0].content.startswith("The Normans were")
    version = store.context_map.get(bank).version
    store.put_document(bank, "paris", PARIS + " It is old.")  # same first sentence: the entry stays as it is
    assert store.context_map.get(bank).version == version
    store.put_document(bank, "paris", "Paris has many bridges. " + PARIS)
    assert store.context_map.get(bank).items[1].content == "Paris has many bridges. (doc paris)"

    small = new_bank(store, context_map_budget_tokens=16 + store.context_map.count_tokens(
        render(MapState.from_json({"items": [{"id": "cr-1", "section": "roadmap", "content": roadmap_entry(
            "normans", NORMANS), "agent": None, "created_at": "", "updated_at": "", "rev": 0}]}))))
    for doc_id, text in (("normans", NORMANS), ("paris", PARIS), ("photo", PHOTO)):
        store.put_document(small, doc_id, text)
    assert [i.content.endswith("(doc normans)") for i in store.context_map.get(small).items] == [True]

    frozen = new_bank(store)
    store.context_map.configure(frozen, frozen=True)
    store.put_document(frozen, "photo", PHOTO)
    assert store.context_map.get(frozen).items == []


def test_query_with_the_map_reuses_its_cached_kv(store: BankStore) -> None:
    bank = new_bank(store)
    for doc_id, text in (("normans", NORMANS), ("paris", PARIS), ("photo", PHOTO)):
        store.put_document(bank, doc_id, text)
    map_tokens = store.context_map.get(bank).tokens
    plain = store.query(bank, "Who were the Normans?", k=2, max_new_tokens=2)
    first = store.query(bank, "Who were the Normans?", k=2, max_new_tokens=2, context_map=True)
    second = store.query(bank, "Where is the Seine?", k=2, max_new_tokens=2, context_map=True)
    text_mode = store.query(bank, "Where is the Seine?", k=2, mode="text", max_new_tokens=2, context_map=True)
    assert plain.usage.map_prefill_tokens == 0
    assert first.usage.map_prefill_tokens == map_tokens > 0
    assert second.usage.map_prefill_tokens == 0 and text_mode.usage.map_prefill_tokens == 0
    assert first.usage.context_tokens == plain.usage.context_tokens + map_tokens
    store.context_map.edit(bank, feedback=[{"id": "cr-1", "tag": "helpful"}])  # same text: still cached
    assert store.query(bank, "Who?", k=1, max_new_tokens=1, context_map=True).usage.map_prefill_tokens == 0
    store.context_map.edit(bank, [{"op": "add", "section": "understanding", "content": "Normans are Norse"}])
    changed = store.query(bank, "Who?", k=1, max_new_tokens=1, context_map=True)
    assert changed.usage.map_prefill_tokens == store.context_map.get(bank).tokens > map_tokens


def test_cached_map_kv_equals_a_text_prefill(store: BankStore) -> None:
    """Placed right after the prefix, the map's stored (pre-RoPE) KV gives the logits of reading its text."""
    bank = new_bank(store)
    store.put_document(bank, "normans", NORMANS)
    with store.session() as s:
        shown = store.context_map.prefill(s, store.bank_row(s, bank))
    assert shown.kv is not None
    runner = store.runner
    q = runner.question_ids("Who were the Normans?")
    kv_logits = runner.logits(runner.assemble([shown.kv]), q)
    text_ctx = runner.text_context()
    text_logits = runner.logits(Context(text_ctx.cache, text_ctx.next_position, 0), shown.token_ids + q)
    assert torch.allclose(kv_logits, text_logits[len(shown.token_ids):], atol=1e-4)


def test_query_records_keep_the_last_n(tmp_path: Path, tiny_llm: LoadedModel, embedder: Embedder) -> None:
    st_ = BankStore(Settings(data_dir=tmp_path / "d", context_map_keep_queries=3), llm=tiny_llm, embedder=embedder)
    st_.create_bank("kb")
    st_.put_document("kb", "paris", PARIS)
    for n in range(5):
        st_.query("kb", f"question {n}?", k=1, max_new_tokens=1)
    with st_.session() as s:
        rows = s.scalars(select(ContextMapQueryRow).order_by(ContextMapQueryRow.id)).all()
        assert [r.question for r in rows] == ["question 2?", "question 3?", "question 4?"]
        assert rows[0].sources == ["paris"]
    st_.delete_bank("kb")  # the map and its records go with the bank
    with st_.session() as s:
        for table in (ContextMapRow, ContextMapVersionRow, ContextMapQueryRow):
            assert s.scalar(select(func.count()).select_from(table)) == 0
    st_.sessions.kw["bind"].dispose()


# -- refresh ----------------------------------------------------------------------------------------------


class StubLLM:
    """A real OpenAI-compatible HTTP server on a free port that answers every chat call with ``reply``."""

    def __init__(self) -> None:
        self.reply = ""
        self.requests: list[dict[str, Any]] = []
        self.refuse_formats: set[str] = set()  # response_format types answered 400, as endpoints that lack them
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server API
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
                if (body.get("response_format") or {}).get("type") in stub.refuse_formats:
                    self.send_response(400)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = json.dumps({"id": "x", "object": "chat.completion", "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": stub.reply}, "finish_reason": "stop"}]})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data.encode())

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub_llm() -> Iterator[StubLLM]:
    stub = StubLLM()
    yield stub
    stub.close()


@pytest.fixture
def remote_store(tmp_path: Path, tiny_llm: LoadedModel, embedder: Embedder, stub_llm: StubLLM
                 ) -> Iterator[Callable[[], BankStore]]:
    st_ = BankStore(Settings(data_dir=tmp_path / "d", map_llm_url=stub_llm.url, map_llm_model="stub-model",
                             map_llm_api_key="sk-test"), llm=tiny_llm, embedder=embedder)
    yield lambda: st_
    st_.sessions.kw["bind"].dispose()


def test_refresh_applies_the_endpoints_edits_and_garbage_changes_nothing(remote_store, stub_llm: StubLLM) -> None:
    store = remote_store()
    store.create_bank("kb")
    store.put_document("kb", "normans", NORMANS)
    assert store.context_map.refresh("kb").status == "nothing_to_distill"  # no queries yet
    store.context_map.edit("kb", feedback=[{"id": "cr-1", "tag": "helpful"}])
    store.query("kb", "Who were the Normans?", k=1, max_new_tokens=2)
    before = store.context_map.get("kb")
    stub_llm.reply = json.dumps({"edits": [
        {"op": "add", "section": "understanding", "content": "The Normans descend from Norse raiders."},
        {"op": "add", "section": "reusable_results", "content": "Normans: Normandy, 10th-11th century."},
        {"op": "delete", "id": "cu-99"}],
        "feedback": [{"id": "cr-1", "tag": "helpful"}]})
    report = store.context_map.refresh("kb", agent="curator")
    assert report.status == "applied" and report.records == 1 and report.llm == stub_llm.url
    assert [a["id"] for a in report.applied if a["op"] == "add"] == ["cu-1", "rr-1"]
    assert report.rejected[0]["id"] == "cu-99"  # an edit naming no item is skipped and reported
    after = store.context_map.get("kb")
    assert after.version == before.version + 1 and len(after.items) == 3
    cr1 = next(i for i in after.items if i.id == "cr-1")
    assert cr1.helpful == 2 and cr1.score == pytest.approx(1 * 0.85 + 1)  # decayed, then the new vote
    sent = stub_llm.requests[-1]
    assert sent["path"] == "/v1/chat/completions" and sent["model"] == "stub-model"
    assert sent["auth"] == "Bearer sk-test" and "Who were the Normans?" in sent["messages"][1]["content"]

    store.query("kb", "Where is Normandy?", k=1, max_new_tokens=2)
    for garbage in ("I think the map is fine!", '{"edits": [{"op": "explode"}]}', "```json\n{oops\n```"):
        stub_llm.reply = garbage
        report = store.context_map.refresh("kb")
        assert report.status == "unparseable" and report.error and report.raw == garbage
        assert store.context_map.get("kb") == after  # nothing changed, not even the decay
    store.context_map.configure("kb", frozen=True)
    with pytest.raises(Conflict):
        store.context_map.refresh("kb")


def test_refresh_reports_an_unreachable_endpoint(tmp_path: Path, tiny_llm: LoadedModel, embedder: Embedder) -> None:
    st_ = BankStore(Settings(data_dir=tmp_path / "d", map_llm_url="http://127.0.0.1:9/v1", map_llm_timeout_s=2),
                    llm=tiny_llm, embedder=embedder)
    st_.create_bank("kb")
    st_.put_document("kb", "paris", PARIS)
    st_.query("kb", "Where?", k=1, max_new_tokens=1)
    version = st_.context_map.get("kb").version
    report = st_.context_map.refresh("kb")
    assert report.status == "llm_error" and st_.context_map.get("kb").version == version
    st_.sessions.kw["bind"].dispose()


def test_refresh_with_the_local_model(store: BankStore) -> None:
    """Even the tiny random model yields valid edits: its decoding is constrained to the edit schema, and a
    question the map does not cover makes the first edit an add of its answer, so the map gains an item."""
    bank = new_bank(store)
    store.put_document(bank, "paris", PARIS)
    store.query(bank, "Where does the Seine river flow?", k=1, max_new_tokens=2)
    before = store.context_map.get(bank)
    report = store.context_map.refresh(bank)
    assert report.llm == "local" and report.status in ("applied", "unchanged") and report.raw is None, report
    assert report.applied and report.applied[0]["op"] == "add", report
    after = store.context_map.get(bank)
    assert after.version == before.version + 1
    added = next(i for i in after.items if i.id == report.applied[0]["id"])
    assert added.section == "reusable_results" and added.content.startswith("Q: Where does the Seine river flow? A: ")
    assert added.id not in {i.id for i in before.items}
