"""Memory management on the tiny model: budgets, tiers, policies, importance, merging, expiry, versions."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from kvstore.bank import BankStore
from kvstore.banks.documents import find_document
from kvstore.memory.policy import Candidate, MemoryConfig, decayed, plan_eviction, policy_scores
from kvstore.model.compat import with_cache
from kvstore.storage import index as index_module
from kvstore.storage.catalog import BlockRow, DocumentRow
from kvstore.storage.index import BankIndex
from kvstore.types import SearchFilter
from tests.conftest import build_tiny

TEXTS = [
    "The Normans gave their name to Normandy, a region in northern France.",
    "Paris is the capital and most populous city of France. The Seine flows through it.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "They were descended from Norse raiders and pirates from Denmark, Iceland and Norway.",
    "Who what when where why how: questions and answers about passages.",
    "A short note.",
]
QUESTIONS = ["Who were the Normans?", "What flows through Paris?", "What does photosynthesis make?",
             "Where did the raiders come from?"]


def _bank(store: BankStore, **kwargs: object) -> str:
    name = "b" + uuid.uuid4().hex[:12]
    store.create_bank(name, **kwargs)  # type: ignore[arg-type]
    return name


def _tier(store: BankStore, bank: str, doc_id: str) -> list[str]:
    """Tier of each block of a document: warm (blob on disk) or cold."""
    with store.session() as s:
        doc = find_document(s, store.bank_row(s, bank), doc_id)
        assert doc is not None
        blobs = s.scalars(select(BlockRow.blob_id).where(BlockRow.document_id == doc.id).order_by(BlockRow.ordinal))
        return ["warm" if b else "cold" for b in blobs]


def _unprotected_warm(store: BankStore, bank: str) -> int:
    """Warm blocks the evictor may move: those not sharing a blob with a pinned document's block."""
    with store.session() as s:
        rows = s.execute(select(BlockRow.blob_id, DocumentRow.pinned).join(
            DocumentRow, DocumentRow.id == BlockRow.document_id).where(
            BlockRow.bank_id == store.bank_row(s, bank).id, BlockRow.blob_id.is_not(None))).all()
    pinned = {r.blob_id for r in rows if r.pinned}
    return sum(r.blob_id not in pinned for r in rows)


def _block_bytes(store: BankStore) -> int:
    bank = _bank(store)
    store.put_document(bank, "probe", TEXTS[0])
    size = store.stats(bank).stored_bytes
    store.delete_bank(bank)
    return size


@pytest.fixture
def store(make_store: Callable[..., BankStore]) -> BankStore:
    return make_store()


# -- budgets ---------------------------------------------------------------------------------------

OPS = st.lists(st.one_of(
    st.tuples(st.just("put"), st.integers(0, 4), st.integers(0, len(TEXTS) - 1), st.booleans()),
    st.tuples(st.just("query"), st.integers(0, len(QUESTIONS) - 1), st.just(0), st.just(False)),
    st.tuples(st.just("delete"), st.integers(0, 4), st.just(0), st.just(False)),
), min_size=1, max_size=10)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS, policy=st.sampled_from(["lru", "importance", "hybrid"]), max_blocks=st.sampled_from([None, 2]))
def test_budget_holds_after_every_acknowledged_write(store: BankStore, ops: list[tuple[str, int, int, bool]],
                                                     policy: str, max_blocks: int | None) -> None:
    budget = int(2.5 * _block_bytes(store))
    bank = _bank(store, budget_bytes=budget, max_blocks=max_blocks, eviction=policy)
    present: set[str] = set()
    for op, a, b, pinned in ops:
        if op == "put":
            store.put_document(bank, f"d{a}", TEXTS[b], pinned=pinned and a == 0)
            present.add(f"d{a}")
        elif op == "query" and present:
            store.query(bank, QUESTIONS[a], k=2, max_new_tokens=2)
        elif op == "delete" and f"d{a}" in present:
            store.delete_document(bank, f"d{a}")
            present.discard(f"d{a}")
        st_ = store.stats(bank)
        # Only pinned content (never evicted) may keep a bank above its budget.
        assert st_.stored_bytes <= budget or _unprotected_warm(store, bank) == 0
        assert max_blocks is None or st_.tiers["warm"]["blocks"] <= max_blocks or _unprotected_warm(store, bank) == 0
        assert st_.tiers["warm"]["bytes"] == st_.stored_bytes
        assert st_.tiers["warm"]["blocks"] + st_.tiers["cold"]["blocks"] == st_.blocks
        assert st_.index_entries == st_.blocks  # eviction never removes a block from search


def test_pinned_documents_are_never_evicted(store: BankStore) -> None:
    bank = _bank(store, max_blocks=1)
    store.put_document(bank, "keep", TEXTS[0], pinned=True)
    for i in range(1, 4):
        store.put_document(bank, f"d{i}", TEXTS[i])
        store.query(bank, QUESTIONS[i], k=1, max_new_tokens=2)
    assert _tier(store, bank, "keep") == ["warm"]
    assert all(_tier(store, bank, f"d{i}") == ["cold"] for i in range(1, 4))
    assert store.maintain(bank)["evicted"] == 0


def test_lru_evicts_the_least_recently_used(store: BankStore) -> None:
    bank = _bank(store, max_blocks=2, eviction="lru")
    store.put_document(bank, "a", TEXTS[0])
    store.put_document(bank, "b", TEXTS[1])
    assert store.search(bank, QUESTIONS[0], k=1)[0].doc_id == "a"
    store.query(bank, QUESTIONS[0], k=1, max_new_tokens=2)  # touches a, so b is now the oldest
    store.put_document(bank, "c", TEXTS[2])
    assert (_tier(store, bank, "a"), _tier(store, bank, "b"), _tier(store, bank, "c")) == (
        ["warm"], ["cold"], ["warm"])
    assert store.stats(bank).evictions == 1


def test_plan_eviction_moves_shared_blobs_together_and_respects_pins() -> None:
    now = 1000.0
    cands = [Candidate(1, "x", 10, now - 5, 0, 0.0, 0.0, False), Candidate(2, "x", 10, now, 3, 0.0, 0.0, False),
             Candidate(3, "y", 10, now - 9, 0, 0.0, 0.0, True), Candidate(4, "z", 10, now - 1, 0, 0.0, 0.0, False)]
    plan = plan_eviction(cands, "lru", 20, None, MemoryConfig())
    # x counts once (20 of 30 bytes used by x+y+z... 30 > 20); y is pinned; z is older than x's newest member.
    assert plan.block_ids == [4] and plan.bytes_after == 20 and not plan.over_budget
    assert plan_eviction(cands, "lru", 5, None, MemoryConfig()).over_budget  # the pinned blob alone is 10


def _age_accesses(store: BankStore, bank: str, doc_id: str, by: timedelta) -> None:
    """Move a document's last access back in time, as if its queries had come ``by`` earlier."""
    with store.session() as s:
        doc = find_document(s, store.bank_row(s, bank), doc_id)
        assert doc is not None
        for block in s.scalars(select(BlockRow).where(BlockRow.document_id == doc.id)):
            assert block.last_access_at is not None
            block.last_access_at = block.last_access_at - by
        s.commit()


@pytest.mark.parametrize(("policy", "kept", "evicted"), [("hybrid", "a", "b"), ("lru", "b", "a")])
def test_hybrid_keeps_a_block_used_often_a_while_ago_over_one_used_once_just_now(
        store: BankStore, policy: str, kept: str, evicted: str) -> None:
    bank = _bank(store, eviction=policy)
    store.put_document(bank, "a", TEXTS[0])
    store.put_document(bank, "b", TEXTS[1])
    assert [store.search(bank, q, k=1)[0].doc_id for q in QUESTIONS[:2]] == ["a", "b"]
    for _ in range(5):
        store.query(bank, QUESTIONS[0], k=1, max_new_tokens=1)
    _age_accesses(store, bank, "a", timedelta(hours=3))
    store.query(bank, QUESTIONS[1], k=1, max_new_tokens=1)  # b: one hit, just now (a one-hit scan)
    with store.session() as s:
        heat = {r.text: r.heat for r in s.execute(select(BlockRow.text, BlockRow.heat).where(
            BlockRow.bank_id == store.bank_row(s, bank).id))}
    assert heat[TEXTS[0]] == pytest.approx(5.0, rel=1e-3) and heat[TEXTS[1]] == pytest.approx(1.0)
    store.update_bank(bank, max_blocks=1)
    assert (_tier(store, bank, kept), _tier(store, bank, evicted)) == (["warm"], ["cold"])


def test_hybrid_heat_decays_so_recency_still_counts() -> None:
    now, day = 1e6, 24 * 3600.0
    cfg = MemoryConfig()

    def cand(block_id: int, hits: int, age_s: float) -> Candidate:
        return Candidate(block_id, f"blob{block_id}", 10, now - age_s, hits, 0.0, 0.0, False,
                         heat=hits * 0.5 ** (age_s / cfg.heat_half_life_s))

    often_lately, once_now, often_long_ago, never = (cand(1, 10, 3 * 3600), cand(2, 1, 0), cand(3, 10, 10 * day),
                                                     cand(4, 0, 2 * day))
    cands = [often_lately, once_now, often_long_ago, never]

    def order(policy: str) -> list[int]:
        """Block ids, first evicted first."""
        return [cands[i].block_id for i in np.argsort(policy_scores(policy, cands, cfg))]

    # hybrid: never used < used often but ten half-lives ago < used once now < used often lately
    assert order("hybrid") == [4, 3, 2, 1]
    assert order("lru") == [3, 4, 1, 2]
    # Attention importance breaks the tie between equally hot blocks.
    hot_a, hot_b = cand(5, 2, 0), cand(6, 2, 0)
    hot_b.importance = 0.9
    assert policy_scores("hybrid", [hot_a, hot_b], cfg).argmin() == 0


def test_hybrid_evicts_the_larger_of_equally_valued_blocks_first() -> None:
    """Value per byte: freeing one large block keeps more blocks (hits) warm than freeing a small one."""
    now, cfg = 1e6, MemoryConfig()
    small, large = (Candidate(1, "s", 1_000, now, 3, 0.5, 0.0, False, heat=3.0),
                    Candidate(2, "l", 4_000, now, 3, 0.5, 0.0, False, heat=3.0))
    assert policy_scores("hybrid", [small, large], cfg).argmin() == 1
    # A four-times-larger block used five times as often still outweighs the small one per byte.
    small.heat, small.importance = 0.6, 0.1
    assert policy_scores("hybrid", [small, large], cfg).argmin() == 0
    plan = plan_eviction([Candidate(3, "a", 1_000, now, 1, 0.2, 0.0, False, heat=1.0),
                          Candidate(4, "b", 1_000, now, 1, 0.2, 0.0, False, heat=1.0), large], "hybrid",
                         budget_bytes=2_500, max_blocks=None, cfg=cfg)
    assert plan.block_ids == [2] and plan.bytes_after == 2_000


# -- importance ------------------------------------------------------------------------------------

LONG = ("The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, a region "
        "in France. They were descended from Norse raiders and pirates from Denmark, Iceland and Norway.")


def _eager_shares(llm_seed: int, store: BankStore, blocks: list, q_ids: list[int]) -> list[float]:
    """The same attention shares measured independently: transformers' eager attention, output_attentions."""
    twin = build_tiny("llama", seed=llm_seed)
    twin.model.set_attn_implementation("eager")
    ctx = store.runner.assemble(blocks)
    pos = torch.arange(ctx.next_position, ctx.next_position + len(q_ids))[None]
    with torch.inference_mode():
        out = twin.model(input_ids=torch.tensor([q_ids]), position_ids=pos, **with_cache(twin.model, ctx.cache),
                         use_cache=True, output_attentions=True)
    p = ctx.next_position - ctx.context_tokens
    per_token = torch.stack([a[0].float().mean(dim=(0, 1)) for a in out.attentions]).mean(0)[p:ctx.next_position]
    parts = torch.split(per_token, [b.tokens for b in blocks])
    mass = torch.stack([t.sum() for t in parts])
    return (mass / mass.sum()).tolist()


def test_importance_ranks_the_attended_block_above_the_ignored_one(store: BankStore) -> None:
    bank = _bank(store, eviction="importance")
    store.put_document(bank, "long", LONG)
    store.put_document(bank, "short", "A short note.")
    question = "Who were the Normans and where did they come from?"
    for _ in range(2):
        result = store.query(bank, question, k=2, max_new_tokens=2)
    assert {h.doc_id for h in result.sources} == {"long", "short"}
    with store.session() as s:
        rows = s.execute(select(BlockRow.id, BlockRow.importance, BlockRow.text)).all()
        imp = {("long" if r.text == LONG else "short"): r.importance for r in rows}
    assert imp["long"] > imp["short"] > 0
    assert imp["long"] + imp["short"] == pytest.approx(2.0, abs=1e-3)  # normalized per query, two queries
    # The shares match an independent measurement with transformers' eager attention.
    with store.session() as s:
        row = store.bank_row(s, bank)
        blocks = [store.load_block(s, row, b) for b in s.scalars(select(BlockRow).where(BlockRow.bank_id == row.id)
                                                                 .order_by(BlockRow.id))]
    q_ids = store.runner.question_ids(question)
    ctx = store.runner.assemble(blocks)
    ours = store.memory.attention_shares(ctx, q_ids, blocks)
    assert ours is not None and ours == pytest.approx(_eager_shares(0, store, blocks, q_ids), abs=1e-4)
    # Under the importance policy the short block goes first, although it was not used less recently.
    store.update_bank(bank, max_blocks=1)
    assert (_tier(store, bank, "long"), _tier(store, bank, "short")) == (["warm"], ["cold"])


def test_importance_decays_with_a_half_life() -> None:
    now = datetime.now(UTC)
    assert decayed(1.0, now - timedelta(hours=2), now, 3600) == pytest.approx(0.25)
    assert decayed(1.0, None, now, 3600) == 1.0


def test_writer_importance_protects_a_document(store: BankStore) -> None:
    bank = _bank(store, max_blocks=1, eviction="hybrid")
    store.put_document(bank, "vip", TEXTS[0], importance=5.0)
    store.put_document(bank, "other", TEXTS[1])
    assert (_tier(store, bank, "vip"), _tier(store, bank, "other")) == (["warm"], ["cold"])


# -- tiers -----------------------------------------------------------------------------------------


def test_cold_blocks_still_answer_and_come_back_warm(store: BankStore) -> None:
    bank = _bank(store)
    store.put_document(bank, "normans", TEXTS[0])
    store.put_document(bank, "paris", TEXTS[1])
    warm_answer = store.query(bank, QUESTIONS[0], k=1, max_new_tokens=8).answer
    text_answer = store.query(bank, QUESTIONS[0], k=1, mode="text", max_new_tokens=8).answer
    store.query(bank, QUESTIONS[1], k=1, max_new_tokens=1)
    store.update_bank(bank, max_blocks=1)  # paris was used last: normans goes cold
    assert _tier(store, bank, "normans") == ["cold"]
    st_ = store.stats(bank)
    assert st_.tiers["cold"]["blocks"] == 1 and st_.evictions == 1
    store.hot.budget_bytes = 0  # no decoded copy anywhere: the block must be prefilled from text
    assert store.query(bank, QUESTIONS[0], k=1, max_new_tokens=8).answer == warm_answer == text_answer
    assert store.memory.counters.cold_encodes == 1
    # Used again: re-warmed, and the budget evicted the other block instead.
    assert (_tier(store, bank, "normans"), _tier(store, bank, "paris")) == (["warm"], ["cold"])
    assert store.stats(bank).reencodes == 1
    assert store.verify(bank) == {"checked": 1, "rebuilt": 0}


def test_hot_tier_is_reported(store: BankStore) -> None:
    bank = _bank(store)
    store.put_document(bank, "normans", TEXTS[0])
    store.query(bank, QUESTIONS[0], k=1, max_new_tokens=2)
    tiers = store.stats(bank).tiers
    assert tiers["hot"]["blocks"] == 1 and tiers["hot"]["bytes"] > tiers["warm"]["bytes"] > 0


# -- sharing and merging ---------------------------------------------------------------------------


def test_a_blob_shared_across_banks_counts_in_each_and_outlives_one_bank(store: BankStore) -> None:
    one, two = _bank(store), _bank(store)
    store.put_document(one, "d", TEXTS[0])
    store.put_document(two, "d", TEXTS[0])
    assert len(list(store.blobs.ids())) == 1
    assert store.stats(one).stored_bytes == store.stats(two).stored_bytes > 0
    store.update_bank(one, budget_bytes=1)  # bank one evicts: the blob stays, bank two references it
    store.delete_document(one, "d")
    assert len(list(store.blobs.ids())) == 1 and _tier(store, two, "d") == ["warm"]
    assert store.query(two, QUESTIONS[0], k=1, max_new_tokens=2).sources[0].doc_id == "d"
    store.delete_bank(two)
    assert list(store.blobs.ids()) == []


NEAR_A = "The Normans were a people who gave their name to Normandy, a region in northern France."
NEAR_B = "The Normans were a people who gave their name to Normandy, a region of northern France."


def test_near_duplicates_are_not_merged(store: BankStore) -> None:
    """Only identical tokens share KV (test_merge_integrity.py): near-duplicates keep their own blobs."""
    bank = _bank(store)
    store.put_document(bank, "a", NEAR_A, tags=["a"])
    store.put_document(bank, "b", NEAR_B, tags=["b"], agent="bob")
    before = store.stats(bank)
    report = store.maintain(bank)
    assert report["merged"] == 0 and store.stats(bank).stored_bytes == before.stored_bytes
    for tag, agent in (("a", None), ("b", "bob")):
        result = store.query(bank, QUESTIONS[0], k=1, max_new_tokens=4, filter=SearchFilter(tags=[tag], agent=agent))
        assert [h.doc_id for h in result.sources] == [tag] and result.usage.context_tokens > 0


# -- staleness and versions ------------------------------------------------------------------------


def test_expired_documents_are_not_served_and_maintenance_removes_them(store: BankStore) -> None:
    bank = _bank(store)
    store.put_document(bank, "old", TEXTS[0], expires_at=datetime.now(UTC) - timedelta(seconds=1))
    store.put_document(bank, "new", TEXTS[1], ttl_s=3600)
    assert [h.doc_id for h in store.search(bank, QUESTIONS[0], k=5)] == ["new"]
    assert [h.doc_id for h in store.search(bank, QUESTIONS[0], k=5, filter=SearchFilter(tags=[]))] == ["new"]
    assert store.maintain(bank)["expired_documents"] == ["old"]
    assert store.stats(bank).documents == 1


def test_a_model_change_marks_blocks_stale_and_reencodes_them(store: BankStore,
                                                             make_store: Callable[..., BankStore]) -> None:
    bank = _bank(store)
    store.put_document(bank, "normans", TEXTS[0])
    store.put_document(bank, "paris", TEXTS[1])
    other = make_store(llm=build_tiny("llama", seed=3))
    report = other.maintain(bank)
    assert report["rebound_model"] and report["reencoded"] == 2
    assert other.stats(bank).reencodes == 2 and other.get_bank(bank).model_fingerprint == other.llm.fingerprint
    kv = other.query(bank, QUESTIONS[0], k=1, max_new_tokens=6).answer
    assert kv == other.query(bank, QUESTIONS[0], k=1, mode="text", max_new_tokens=6).answer
    assert other.maintain(bank)["rebound_model"] is False


def test_a_new_version_replaces_the_old_atomically(store: BankStore, monkeypatch: pytest.MonkeyPatch) -> None:
    bank = _bank(store)
    store.put_document(bank, "doc", TEXTS[0])
    blobs_before = set(store.blobs.ids())

    def broken(*_args: object, **_kwargs: object) -> list:
        raise RuntimeError("encoder crashed")

    monkeypatch.setattr(store.runner, "encode", broken)
    with pytest.raises(RuntimeError):
        store.put_document(bank, "doc", TEXTS[1])
    monkeypatch.undo()
    doc = store.get_document(bank, "doc")
    assert doc.version == 1 and doc.text == TEXTS[0] and set(store.blobs.ids()) == blobs_before
    store.put_document(bank, "doc", TEXTS[1])
    hits = store.search(bank, QUESTIONS[1], k=5)
    assert [h.text for h in hits] == [TEXTS[1]] and store.get_document(bank, "doc").version == 2
    assert set(store.blobs.ids()).isdisjoint(blobs_before)


def test_orphan_blobs_are_collected_after_a_grace_period(store: BankStore) -> None:
    bank = _bank(store)
    store.put_document(bank, "doc", TEXTS[0])
    stray = store.blobs.put(b"not referenced by any block")
    assert store.maintain(bank)["orphan_blobs_removed"] == 0  # younger than the grace period
    store.memory.config.orphan_grace_s = 0
    assert store.maintain(bank)["orphan_blobs_removed"] == 1
    assert stray not in set(store.blobs.ids()) and len(list(store.blobs.ids())) == 1


# -- index -----------------------------------------------------------------------------------------


def test_index_switches_to_ivf_and_back_with_removal_and_selective_filters(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(index_module, "FLAT_MAX", 400)
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(20, 32))
    data = centres[rng.integers(0, 20, 1000)] + 0.1 * rng.normal(size=(1000, 32))
    data = (data / np.linalg.norm(data, axis=1, keepdims=True)).astype(np.float32)
    index = BankIndex(32)
    index.add(np.arange(1000), data)
    assert index.kind == "ivf" and index.ntotal == 1000
    ids, _ = index.search(data[5], 10)
    assert ids[0] == 5
    allowed = np.asarray([3, 500, 999])
    exact = allowed[np.argsort(-(data[allowed] @ data[5]))]
    assert index.search(data[5], 10, allowed)[0].tolist() == exact.tolist()
    index.remove(np.arange(0, 1000, 2))
    assert 5 in index.search(data[5], 1)[0] and 4 not in index.search(data[4], 10)[0]
    index.remove(np.arange(1, 800, 2))
    assert index.kind == "flat" and index.ntotal == 100 and index.search(data[801], 1)[0][0] == 801

