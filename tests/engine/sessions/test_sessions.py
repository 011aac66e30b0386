"""Agent sessions on the tiny model: appends equal one whole prefill, briefs, the budget, prune, durability,
blob collection; on SQLite and (marker ``postgres``) on a throwaway PostgreSQL database."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from sqlalchemy import select

from kvstore.bank import BankStore
from kvstore.errors import Conflict, NotFound, ValidationFailed
from kvstore.model.compaction import COMPACTION_SKIP_LAYERS, segment_keep_mask, token_scores
from kvstore.sessions.append import render_segment
from kvstore.sessions.attention import segment_attention
from kvstore.sessions.judge import HttpJudge, JudgeError, parse_needed
from kvstore.sessions.livekv import SessionKV
from kvstore.sessions.rows import find_session
from kvstore.sessions.service import SessionStore
from kvstore.storage.session_tables import AgentSessionRow, SessionPageRow
from kvstore.types import BlockKV

SEGMENTS = [
    {"role": "orchestrator", "text": "Find out who the Normans were and where they lived."},
    {"role": "tool", "text": "The Normans were the people who gave their name to Normandy, a region in France."},
    {"role": "note", "text": "Paris is the capital of France. The Seine flows through it."},
    {"role": "tool", "text": "Photosynthesis converts light energy into chemical energy stored in glucose."},
    {"role": "worker", "text": "They were descended from Norse raiders from Denmark and Norway.", "agent": "w1"},
]
TASK = "Who were the Normans?"
BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=BACKENDS)
def catalog(request: pytest.FixtureRequest) -> dict[str, str]:
    """Catalog settings: SQLite in the data dir, or a throwaway PostgreSQL database."""
    return {"database_url": request.getfixturevalue("postgres_url")} if request.param == "postgres" else {}


@pytest.fixture
def sessions(make_store: Callable[..., BankStore], catalog: dict[str, str]) -> SessionStore:
    # Small pages: every segment spans several blobs. fp16 pages: the equivalences below are about appending,
    # and a lossy default codec would add its own error on top of fp16 rounding.
    store = make_store(block_tokens=16, default_codec="fp16", **catalog)
    store.create_bank("agents")
    return store.agent_sessions


def _trajectory_ids(ss: SessionStore) -> list[int]:
    return [t for seg in SEGMENTS for t in ss.runner.tokenize(render_segment(seg["role"], seg["text"],
                                                                             seg.get("agent")))]


def _whole_prefill(ss: SessionStore) -> BlockKV:
    """The trajectory prefilled at once after the prefix, fp32, keys pre-RoPE."""
    return ss.runner.extend(ss.runner.text_context(), _trajectory_ids(ss))


def _greedy(ss: SessionStore, kv: BlockKV, question: str, max_new_tokens: int = 8) -> list[int]:
    runner = ss.runner
    p = len(runner.prefix_ids)
    ctx = runner.context_at(kv, torch.arange(p, p + kv.tokens), p + kv.tokens)
    return runner.generate(ctx, runner.question_ids(question), max_new_tokens).token_ids


def test_appending_segment_by_segment_equals_one_whole_prefill(sessions: SessionStore) -> None:
    sessions.create("agents", "s")
    counts = [sessions.append("agents", "s", [seg]).token_counts[0] for seg in SEGMENTS]
    whole = _whole_prefill(sessions)
    assert sum(counts) == whole.tokens == sessions.get("agents", "s").tokens
    with sessions.store.session() as s:
        from kvstore.storage.catalog import BankRow

        bank = s.query(BankRow).filter_by(name="agents").one()
        row = s.query(AgentSessionRow).filter_by(session_id="s").one()
        sessions.store.kv_memory.drop_kind("sessions")  # from the blobs, not the in-memory copy
        state = sessions.live.load(s, bank, row)
    assert state.positions.tolist() == list(range(whole.tokens))
    for got, want in ((state.kv.k, whole.k), (state.kv.v, whole.v)):
        scale = want.abs().max()
        assert (got - want).abs().max() <= 2e-3 * scale, "segment appends drift beyond fp16 rounding"
    # Same greedy answer as the whole trajectory in kv mode, and a brief with no compaction is exactly that.
    reference = _greedy(sessions, whole, TASK)
    brief = sessions.brief("agents", "s", TASK, max_new_tokens=8)
    assert brief.generated_tokens == len(reference)
    assert sessions.runner.tokenizer.decode(reference, skip_special_tokens=True).strip() == brief.answer
    assert brief.kept_tokens == brief.session_tokens == whole.tokens
    # The uncompacted briefing context gives the whole prefill's next-token distribution (fp16 pages).
    ctx, session_tokens, kept = sessions.briefing_context("agents", "s", TASK)
    assert kept == session_tokens == whole.tokens
    p = len(sessions.runner.prefix_ids)
    ids = sessions.runner.question_ids(TASK)
    want = sessions.runner.logits(sessions.runner.context_at(whole, torch.arange(p, p + whole.tokens),
                                                             p + whole.tokens), ids)
    got = sessions.runner.logits(ctx, ids)
    assert got.argmax(-1).tolist() == want.argmax(-1).tolist()
    assert (got - want).abs().max() <= 1e-2 * want.abs().max()


def test_appending_several_segments_at_once_equals_one_by_one(sessions: SessionStore) -> None:
    sessions.create("agents", "one")
    sessions.create("agents", "all")
    for seg in SEGMENTS:
        sessions.append("agents", "one", [seg], agent="orch")
    result = sessions.append("agents", "all", SEGMENTS, agent="orch")
    assert result.segment_ids == list(range(len(SEGMENTS)))
    a, b = sessions.get("agents", "one"), sessions.get("agents", "all")
    assert [g.tokens for g in a.segments] == [g.tokens for g in b.segments]
    assert [g.agent for g in b.segments] == ["orch"] * 4 + ["w1"]
    assert sessions.brief("agents", "one", TASK).answer == sessions.brief("agents", "all", TASK).answer


@pytest.mark.parametrize("selection", ["segments", "tokens"])
def test_budget_is_respected_and_keeps_boundaries(sessions: SessionStore, selection: str) -> None:
    sessions.create("agents", "s")
    sessions.append("agents", "s", SEGMENTS)
    total = sessions.get("agents", "s").tokens
    for budget in (0, 3, 5, 12, 40, total, total + 10):
        result = sessions.brief("agents", "s", TASK, budget_tokens=budget, max_new_tokens=2, selection=selection)
        assert result.kept_tokens <= budget and result.kept_tokens == min(budget, total)
        assert result.session_tokens == total
    tau = sessions.brief("agents", "s", TASK, tau=1.0, max_new_tokens=2, selection=selection)
    assert len(SEGMENTS) <= tau.kept_tokens < total  # boundaries are always kept; tau drops the rest
    both = sessions.brief("agents", "s", TASK, tau=0.0, budget_tokens=9, max_new_tokens=2, selection=selection)
    assert both.kept_tokens <= 9
    with pytest.raises(ValidationFailed):
        sessions.brief("agents", "s", TASK, budget_tokens=9, selection="random")  # type: ignore[arg-type]


def test_a_brief_keeps_by_default_what_the_segment_selection_picks(sessions: SessionStore) -> None:
    sessions.create("agents", "s")
    sessions.append("agents", "s", SEGMENTS)
    budget = sessions.get("agents", "s").tokens // 2
    with sessions.store.sessions() as s:
        bank = sessions.bank_row(s, "agents")
        session = find_session(s, bank, "s")
        state, positions = sessions.live.load(s, bank, session), session.positions
    with sessions.store.model_lock:
        scores = token_scores(sessions.runner, sessions.live.context(state, positions),
                              sessions.runner.question_ids(TASK), reduction="peak",
                              skip_layers=COMPACTION_SKIP_LAYERS)
    keep = segment_keep_mask(scores, state.spans, budget)
    assert int(keep.sum()) == budget and any(bool(keep[a:a + t].all()) for a, t in state.spans[1:])
    want = sessions.live.context(SessionKV(segment_ids=state.segment_ids, positions=state.positions[keep], spans=[],
                                       kv=BlockKV(k=state.kv.k[:, :, keep], v=state.kv.v[:, :, keep])), positions)
    got, _, kept = sessions.briefing_context("agents", "s", TASK, budget_tokens=budget)
    assert kept == budget
    for got_layer, want_layer in zip(got.cache.layers, want.cache.layers, strict=True):
        assert torch.equal(got_layer.keys, want_layer.keys) and torch.equal(got_layer.values, want_layer.values)
    tokens, _, _ = sessions.briefing_context("agents", "s", TASK, budget_tokens=budget, selection="tokens")
    assert tokens.context_tokens == budget


def test_brief_validates_and_may_include_documents(sessions: SessionStore) -> None:
    store = sessions.store
    store.put_document("agents", "normans", "The Normans gave their name to Normandy, a region in France.")
    sessions.create("agents", "s")
    sessions.append("agents", "s", SEGMENTS[:2])
    with pytest.raises(ValidationFailed):
        sessions.brief("agents", "s", " ")
    with pytest.raises(ValidationFailed):
        sessions.brief("agents", "s", TASK, budget_tokens=-1)
    with pytest.raises(NotFound):
        sessions.brief("agents", "nope", TASK)
    result = sessions.brief("agents", "s", TASK, include_documents=1, budget_tokens=8, max_new_tokens=2)
    assert result.document_tokens > 0 and result.sources[0].doc_id == "normans" and result.kept_tokens <= 8


def test_create_get_delete_and_validation(sessions: SessionStore) -> None:
    created = sessions.create("agents", metadata={"task": "t"}, agent="orch")
    assert created.session_id.startswith("s-") and created.tokens == 0 and created.metadata == {"task": "t"}
    with pytest.raises(Conflict):
        sessions.create("agents", created.session_id)
    for bad_id in ("bad id", "s1\n", "..", ".hidden", "x" * 129):  # matched whole: no trailing newline
        with pytest.raises(ValidationFailed):
            sessions.create("agents", bad_id)
    with pytest.raises(NotFound):
        sessions.create("nobank", "x")
    for bad in ([], [{"role": "boss", "text": "x"}], [{"role": "note", "text": "  "}]):
        with pytest.raises(ValidationFailed):
            sessions.append("agents", created.session_id, bad)
    sessions.append("agents", created.session_id, SEGMENTS[:2])
    info = sessions.get("agents", created.session_id)
    assert info.stored_bytes > 0 and [g.role for g in info.segments] == ["orchestrator", "tool"]
    sessions.delete("agents", created.session_id)
    with pytest.raises(NotFound):
        sessions.get("agents", created.session_id)
    assert list(sessions.blobs.ids()) == []


def test_identical_sessions_share_blobs_safely(sessions: SessionStore) -> None:
    for sid in ("a", "b"):
        sessions.create("agents", sid)
        sessions.append("agents", sid, SEGMENTS[:2])
    blobs = set(sessions.blobs.ids())
    sessions.delete("agents", "a")
    assert set(sessions.blobs.ids()) == blobs  # b still uses the same content-addressed pages
    sessions.store.kv_memory.drop_kind("sessions")
    assert sessions.brief("agents", "b", TASK, max_new_tokens=2).kept_tokens > 0


# -- prune ----------------------------------------------------------------------------------------


def test_parse_needed_is_strict() -> None:
    live = [0, 1, 2]
    assert parse_needed('{"needed": [2, 0]}', live) == [0, 2]
    assert parse_needed('```json\n{"needed": []}\n```', live) == []
    for bad in ('needed: [1]', '{"needed": [1], "why": "x"}', '{"needed": "1"}', '{"needed": [1.0]}',
                '{"needed": [true]}', '{"needed": [7]}', '[1]', 'Sure! {"needed": [1]}'):
        with pytest.raises(JudgeError):
            parse_needed(bad, live)


@pytest.fixture
def judge_server() -> Iterator[tuple[str, list[dict], list[dict]]]:
    """A stub OpenAI-compatible endpoint answering every chat completion with the reply in ``replies[0]``."""
    replies: list[dict] = [{"content": '{"needed": [0, 1, 4]}'}]
    seen: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the http.server API
            seen.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            body = json.dumps({"choices": [{"message": {"role": "assistant", **replies[0]}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", seen, replies
    finally:
        server.shutdown()
        server.server_close()


def test_model_prune_never_drops_a_needed_segment(sessions: SessionStore, judge_server) -> None:
    url, seen, replies = judge_server
    sessions.create("agents", "s")
    sessions.append("agents", "s", SEGMENTS)
    before = sessions.get("agents", "s")
    result = sessions.prune("agents", "s", policy="model", goal="who were the Normans", judge=HttpJudge(url))
    assert result.error is None and result.needed == [0, 1, 4] and result.pruned == [2, 3]
    assert "who were the Normans" in seen[0]["messages"][0]["content"]
    after = sessions.get("agents", "s")
    assert [g.pruned for g in after.segments] == [False, False, True, True, False]
    assert after.segments[2].text == SEGMENTS[2]["text"]  # the text stays for audit
    assert result.tokens_before == before.tokens and result.tokens_after == after.tokens < before.tokens
    assert after.stored_bytes == before.stored_bytes  # the pruned KV is kept for restore (contextmap/test_hole6.py)
    # The judge's tokens never entered the trajectory; positions continue after the pruned ones.
    appended = sessions.append("agents", "s", [{"role": "note", "text": "Normandy is in France."}])
    assert appended.segment_ids == [5] and sessions.get("agents", "s").segments[5].start == before.total_tokens
    sessions.store.kv_memory.drop_kind("sessions")
    assert appended.tokens == after.tokens + appended.token_counts[0]
    assert sessions.brief("agents", "s", TASK, max_new_tokens=2).session_tokens == appended.tokens
    # An unusable reply prunes nothing and says why.
    replies[0] = {"content": "I think segment 1 matters."}
    bad = sessions.prune("agents", "s", policy="model", judge=HttpJudge(url))
    assert bad.pruned == [] and bad.error and bad.tokens_after == bad.tokens_before


def test_model_prune_never_drops_what_any_judge_reply_names(sessions: SessionStore) -> None:
    """Replies naming different subsets, one after another: a named live segment is never pruned."""
    sessions.create("agents", "s")
    sessions.append("agents", "s", SEGMENTS)
    for named in ([4, 0, 2], [0, 2], [2]):  # an empty list is refused (tests/engine/contextmap/test_hole6.py)
        live = {g.id for g in sessions.get("agents", "s").segments if not g.pruned}
        result = sessions.prune("agents", "s", policy="model",
                                judge=lambda _prompt, _ids, n=named: json.dumps({"needed": n}))
        assert result.error is None and set(result.needed) == set(named)
        assert set(result.pruned) == live - set(named)
        after = {g.id for g in sessions.get("agents", "s").segments if not g.pruned}
        assert after == set(named), (named, after)
        if named:
            assert sessions.brief("agents", "s", TASK, max_new_tokens=1).session_tokens == sum(
                g.tokens for g in sessions.get("agents", "s").segments if g.id in named)


def test_local_judge_replies_parse_even_from_a_random_model(sessions: SessionStore) -> None:
    """The loaded model judges by default; its reply is decoded constrained to the JSON, so even random weights
    give a usable answer that names only live segments (and the prune drops exactly the others)."""
    sessions.create("agents", "s")
    sessions.append("agents", "s", SEGMENTS)
    live = {g.id for g in sessions.get("agents", "s").segments if not g.pruned}
    result = sessions.prune("agents", "s", policy="model", goal="who were the Normans")
    assert result.error is None
    assert set(result.needed) <= live and set(result.pruned) | set(result.held_back) == live - set(result.needed)
    assert result.needed and len(result.pruned) <= len(live) // 2  # never everything, at most half in one prune


def test_model_prune_uses_the_map_llm_endpoint_when_configured(make_store, judge_server) -> None:
    from kvstore.config import Settings

    if "map_llm_url" not in Settings.model_fields:
        pytest.skip("this build has no KVRAG_MAP_LLM_URL setting")
    url, seen, _ = judge_server
    ss = make_store(map_llm_url=url).agent_sessions
    ss.store.create_bank("agents")
    ss.create("agents", "s")
    ss.append("agents", "s", SEGMENTS)
    assert ss.prune("agents", "s", policy="model").pruned == [2, 3] and seen


def test_attention_prune_drops_only_segments_the_briefs_ignore(sessions: SessionStore) -> None:
    sessions.create("agents", "s")
    sessions.append("agents", "s", SEGMENTS)
    assert sessions.prune("agents", "s", policy="attention").pruned == []  # no brief yet: no evidence
    for _ in range(3):
        sessions.brief("agents", "s", TASK, max_new_tokens=1)
    with sessions.store.session() as s:
        from kvstore.storage.session_tables import SessionSegmentRow

        records = {r.ordinal: r.attention for r in s.query(SessionSegmentRow).all()}
    assert all(len(v) == 3 for v in records.values())
    mean = {k: sum(v) / len(v) for k, v in records.items()}
    threshold = sorted(mean.values())[2]  # between the second and third lowest: exactly two fall below
    result = sessions.prune("agents", "s", policy="attention", threshold=threshold)
    assert result.pruned == sorted(k for k, m in mean.items() if m < threshold) and len(result.pruned) == 2
    assert sessions.prune("agents", "s", policy="attention", threshold=0.0).pruned == []
    with pytest.raises(ValidationFailed):
        sessions.prune("agents", "s", policy="random")  # type: ignore[arg-type]


def test_segment_attention_is_a_share_over_an_even_share_without_sinks() -> None:
    scores = torch.tensor([9.0, 1.0, 1.0, 1.0, 9.0, 4.0, 0.0])
    spans = [(0, 4), (4, 2), (6, 1)]
    # Three live segments: an even share is 1/3. Without sinks the segments got 12, 13 and 0 of 25.
    assert segment_attention(scores, spans) == pytest.approx([12 / 25 * 3, 13 / 25 * 3, 0.0])
    # Rows 0 and 4 (the first token, a segment boundary) are sinks: left out, the others got 3, 4 and 0 of 7.
    sinks = torch.tensor([0, 4])
    assert segment_attention(scores, spans, sinks) == pytest.approx([3 / 7 * 3, 4 / 7 * 3, 0.0])
    assert segment_attention(torch.zeros(3), [(0, 3)]) == [1.0]  # no attention at all: no evidence


def test_attention_prune_drops_an_unattended_segment_and_keeps_an_attended_one(
        sessions: SessionStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Constructed attention: the task looks at segment 1 and never at segment 3 (sinks soak up a lot)."""
    import kvstore.sessions.brief as mod

    sessions.create("agents", "s")
    sessions.append("agents", "s", SEGMENTS)
    tokens = [g.tokens for g in sessions.get("agents", "s").segments]
    spans = [(sum(tokens[:i]), t) for i, t in enumerate(tokens)]  # rows in the live KV

    def constructed(runner: object, ctx: object, task_ids: object) -> Callable[[str, int], torch.Tensor]:
        scores = torch.full((sum(tokens),), 0.01)
        a, t = spans[1]
        scores[a:a + t] = 1.0  # attended
        a, t = spans[3]
        scores[a:a + t] = 0.0  # ignored by every brief...
        scores[a] = 50.0  # ...but for its boundary token, a sink that must not count
        scores[:4] = 50.0  # the first tokens: sinks too
        return lambda reduction, skip_layers: scores

    monkeypatch.setattr(mod, "question_votes", constructed)
    for _ in range(2):
        sessions.brief("agents", "s", TASK, max_new_tokens=1)
    before = sessions.get("agents", "s").tokens
    result = sessions.prune("agents", "s", policy="attention")
    assert 3 in result.pruned and 1 not in result.pruned and 1 in result.needed
    assert result.tokens_before == before and result.tokens_after == before - sum(
        t for i, (_, t) in enumerate(spans) if i in result.pruned)
    live = {g.id for g in sessions.get("agents", "s").segments if not g.pruned}
    assert 1 in live and 3 not in live


# -- durability -----------------------------------------------------------------------------------


def test_every_acknowledged_append_survives_a_reopen_without_close(make_store: Callable[..., BankStore],
                                                                   catalog: dict[str, str]) -> None:
    first = make_store(block_tokens=16, default_codec="fp16", **catalog).agent_sessions
    first.store.create_bank("agents")
    first.create("agents", "s")
    acked = [first.append("agents", "s", [seg]) for seg in SEGMENTS]
    answer = first.brief("agents", "s", TASK, max_new_tokens=4).answer
    # No close(): the process "dies" here; a new store opens the same data dir.
    second = make_store(block_tokens=16, default_codec="fp16", **catalog).agent_sessions
    info = second.get("agents", "s")
    assert [g.id for g in info.segments] == [a.segment_ids[0] for a in acked]
    assert info.tokens == acked[-1].tokens
    assert second.brief("agents", "s", TASK, max_new_tokens=4).answer == answer


def test_appends_from_two_processes_continue_one_trajectory(make_store: Callable[..., BankStore],
                                                            catalog: dict[str, str]) -> None:
    """Two stores on one catalog (two server processes): each sees the other's appends, none is lost or
    computed over a stale state, and the result still equals one whole prefill."""
    a = make_store(block_tokens=16, default_codec="fp16", **catalog).agent_sessions
    a.store.create_bank("agents")
    b = make_store(block_tokens=16, default_codec="fp16", **catalog).agent_sessions
    a.create("agents", "s")
    for i, seg in enumerate(SEGMENTS):
        (a if i % 2 == 0 else b).append("agents", "s", [seg])
    whole = _whole_prefill(a)
    for ss in (a, b):
        with ss.store.session() as s:
            bank = ss.bank_row(s, "agents")
            state = ss.live.load(s, bank, find_session(s, bank, "s"))
        assert state.positions.tolist() == list(range(whole.tokens))
        assert (state.kv.k - whole.k).abs().max() <= 2e-3 * whole.k.abs().max()
    answers = {ss.brief("agents", "s", TASK, max_new_tokens=4).answer for ss in (a, b)}
    assert len(answers) == 1


def _page_blobs(ss: SessionStore) -> set[str]:
    with ss.store.session() as s:
        return set(s.scalars(select(SessionPageRow.blob_id)))


def test_deleting_a_bank_collects_its_session_blobs_but_not_shared_ones(sessions: SessionStore) -> None:
    store = sessions.store
    store.create_bank("other")
    sessions.create("other", "s")
    sessions.append("other", "s", SEGMENTS[:2])
    others = set(sessions.blobs.ids())
    sessions.create("agents", "s")
    sessions.append("agents", "s", SEGMENTS[:2])  # the same pages as bank "other": content-addressed, stored once
    assert set(sessions.blobs.ids()) == others
    sessions.append("agents", "s", SEGMENTS[2:])  # pages only bank "agents" uses
    assert set(sessions.blobs.ids()) == _page_blobs(sessions) > others

    store.delete_bank("agents")
    assert set(sessions.blobs.ids()) == others == _page_blobs(sessions)  # the catalog cascaded; shared pages stay
    with store.session() as s:
        assert [r.session_id for r in s.scalars(select(AgentSessionRow))] == ["s"]
    sessions.store.kv_memory.drop_kind("sessions")
    assert sessions.brief("other", "s", TASK, max_new_tokens=2).kept_tokens == sessions.get("other", "s").tokens

    # A new bank and session of the same names start empty: nothing of the deleted one's live KV is reused.
    store.create_bank("agents")
    sessions.create("agents", "s")
    assert sessions.get("agents", "s").tokens == 0
    appended = sessions.append("agents", "s", SEGMENTS[3:4])
    assert sessions.brief("agents", "s", TASK, max_new_tokens=2).session_tokens == appended.tokens

    store.delete_bank("agents")
    store.delete_bank("other")
    assert list(sessions.blobs.ids()) == [] and _page_blobs(sessions) == set()


def test_deleting_a_session_collects_only_the_blobs_no_other_session_uses(sessions: SessionStore) -> None:
    sessions.create("agents", "b")
    sessions.append("agents", "b", SEGMENTS[:2])
    only_b = set(sessions.blobs.ids())
    sessions.create("agents", "a")
    sessions.append("agents", "a", SEGMENTS)  # its first pages are b's
    assert set(sessions.blobs.ids()) > only_b
    sessions.delete("agents", "a")
    assert set(sessions.blobs.ids()) == only_b == _page_blobs(sessions)
    sessions.delete("agents", "b")
    assert list(sessions.blobs.ids()) == [] and _page_blobs(sessions) == set()


def test_orphan_session_blobs_are_collected_after_the_grace_period(sessions: SessionStore) -> None:
    """A blob written by an append that died before its commit: no page names it."""
    sessions.create("agents", "s")
    sessions.append("agents", "s", SEGMENTS[:2])
    referenced = set(sessions.blobs.ids())
    orphan = sessions.blobs.put(b"an append that died before its commit")
    assert sessions.collect_orphans(grace_s=3600) == 0 and orphan in set(sessions.blobs.ids())  # maybe in flight
    assert sessions.collect_orphans(grace_s=0) == 1
    assert set(sessions.blobs.ids()) == referenced
    sessions.store.kv_memory.drop_kind("sessions")
    assert sessions.brief("agents", "s", TASK, max_new_tokens=1).kept_tokens == sessions.get("agents", "s").tokens
    report = sessions.store.maintain("agents")
    assert report["session_orphan_blobs_removed"] == 0
