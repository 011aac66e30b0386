"""Tenancy of memory (issue 26, holes 5 and 7): nothing a bank sees of its KV in memory depends on another
bank, and every KV kept in memory (hot blocks, context-map KV, session states) lives within one budget."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from kvstore.bank import BankStore
from kvstore.memory.hot import resident_key

SECRET = "The vault code of the Acme account is 4417; only the finance team may read it."
OTHER = "Photosynthesis converts light energy into chemical energy stored in glucose."
QUESTION = "What is the vault code of the Acme account?"
SEGMENTS = [{"role": "orchestrator", "text": "Plan the quarterly report for Acme."},
            {"role": "tool", "text": "The ledger shows revenue of 12 million and costs of 9 million."},
            {"role": "worker", "text": "Draft: revenue grew; the margin is 25 percent."}]


@pytest.fixture
def store(make_store: Callable[..., BankStore]) -> BankStore:
    return make_store()


def _touch(store: BankStore, bank: str) -> tuple[dict[str, int], str]:
    """What one kv query did to the tier counters (hot hit, warm load, cold encode), and its answer."""
    before = store.memory.counters.as_dict()
    answer = store.query(bank, QUESTION, k=1, max_new_tokens=4).answer
    after = store.memory.counters.as_dict()
    return {key: after[key] - before[key] for key in after}, answer


def _seen(store: BankStore, bank: str) -> dict[str, Any]:
    """Everything a key of ``bank`` reads about its memory: tiers, KV in memory, each block's tier."""
    stats = store.stats(bank)
    blocks = [(b.doc_id, b.ordinal, b.tier) for b in store.list_blocks(bank)[0]]
    return {"tiers": stats.tiers, "memory": stats.memory, "blocks": blocks}


# -- hole 5: another bank's use of the same text is not observable ---------------------------------


def test_a_bank_sees_a_cold_first_touch_whatever_another_bank_did_with_the_same_text(
        make_store: Callable[..., BankStore]) -> None:
    # Warm-at-ingest off: b's block must start cold, so a hot tier shared with "a" would show as a hot hit.
    store = make_store(hot_tier_on_ingest=False)
    # The control: bank "b" alone, nobody else ever held the text.
    store.create_bank("b")
    store.put_document("b", "d", SECRET)
    alone_before = _seen(store, "b")
    alone_touch = _touch(store, "b")
    alone_after = _seen(store, "b")
    store.delete_bank("b")

    # Bank "a" stores and uses the same text first; "b" must see exactly what it saw alone.
    store.create_bank("a")
    store.put_document("a", "d", SECRET)
    _touch(store, "a")
    _touch(store, "a")
    assert store.stats("a").tiers["hot"]["blocks"] == 1
    store.create_bank("b")
    store.put_document("b", "d", SECRET)
    assert _seen(store, "b") == alone_before
    assert alone_before["tiers"]["hot"] == {"blocks": 0, "bytes": 0}
    assert _touch(store, "b") == alone_touch and alone_touch[0]["hot_hits"] == 0
    assert _seen(store, "b") == alone_after


def test_warming_at_ingest_does_not_depend_on_another_banks_use_within_its_share(
        make_store: Callable[..., BankStore]) -> None:
    # Two bank shares that partition the budget (and the hot tier's cap): warm-at-ingest sees only b's own room.
    store = make_store(kv_memory_bytes=60_000, hot_tier_bytes=60_000, kv_memory_bank_bytes=30_000)
    store.create_bank("b")
    store.put_document("b", "d", SECRET)
    alone_before = _seen(store, "b")
    alone_touch = _touch(store, "b")
    alone_after = _seen(store, "b")
    store.delete_bank("b")
    assert alone_before["tiers"]["hot"]["blocks"] == 1 and alone_touch[0]["hot_hits"] == 1  # warmed at ingest

    # Bank "a" fills its whole share with the same text and others, and uses them.
    store.create_bank("a")
    for i, text in enumerate((SECRET, OTHER, QUESTION, *(seg["text"] for seg in SEGMENTS))):
        store.put_document("a", f"d{i}", text)
    _touch(store, "a")
    assert store.stats("a").tiers["hot"]["bytes"] > 30_000 - 12_288  # a holds its share: no room for one more block
    store.create_bank("b")
    store.put_document("b", "d", SECRET)
    assert _seen(store, "b") == alone_before
    assert _touch(store, "b") == alone_touch
    assert _seen(store, "b") == alone_after


def test_cold_blocks_on_the_fly_kv_is_not_shared_across_banks(store: BankStore) -> None:
    store.memory.config.rewarm_on_access = False  # keep both blocks cold, so only the cold KV cache is tested
    for bank in ("a", "b"):
        store.create_bank(bank, budget_bytes=1)  # nothing fits: every block goes cold at ingest
        store.put_document(bank, "d", SECRET)
        assert [b.tier for b in store.list_blocks(bank)[0]] == ["cold"]
    touch_a, answer_a = _touch(store, "a")
    assert touch_a["cold_encodes"] == 1
    assert [b.tier for b in store.list_blocks("b")[0]] == ["cold"]  # a's on-the-fly KV is not b's
    touch_b, answer_b = _touch(store, "b")
    assert touch_b == touch_a and answer_b == answer_a


def test_one_banks_deletes_and_evictions_never_change_another_bank(store: BankStore) -> None:
    for bank in ("a", "b"):
        store.create_bank(bank)
        store.put_document(bank, "d", SECRET)
        store.put_document(bank, "other", OTHER)
        _touch(store, bank)
    seen, (_, answer) = _seen(store, "b"), _touch(store, "b")
    store.delete_document("a", "d")  # the blob stays on disk: b still references it
    store.update_bank("a", budget_bytes=1)  # evicts the rest of a's blocks to cold
    assert _seen(store, "b") == seen
    store.delete_bank("a")
    assert _seen(store, "b") == seen
    touch, again = _touch(store, "b")
    assert touch["hot_hits"] == 1 and again == answer
    assert store.verify("b") == {"checked": 2, "rebuilt": 0}  # b's blobs, shared with a's, are all on disk


def test_gpu_resident_copies_are_keyed_by_bank(store: BankStore) -> None:
    """A block's GPU cache key carries its bank, so a GPU-resident copy never serves another bank."""
    keys = []
    for bank in ("a", "b"):
        store.create_bank(bank)
        store.put_document(bank, "d", SECRET)
        with store.session() as s:
            row = store.bank_row(s, bank)
            block = store.retriever.retrieve(s, row, QUESTION, 1, None, None)[0][0]
            keys.append(store.load_block(s, row, block).key)
    assert keys[0] != keys[1] and all(k is not None and k.endswith(block.blob_id or "?") for k in keys)


# -- hole 7: one byte budget over every KV in memory ----------------------------------------------


def _fill(store: BankStore, banks: list[str]) -> None:
    sessions = store.agent_sessions
    for i, bank in enumerate(banks):
        store.create_bank(bank)
        store.put_document(bank, "d", SECRET)
        store.put_document(bank, "other", OTHER)
        store.context_map.edit(bank, [{"op": "add", "section": "understanding",
                                       "content": f"Bank {i} keeps the Acme vault facts; ask finance first."}])
        sessions.create(bank, "s")
        sessions.append(bank, "s", SEGMENTS)


def _workload(store: BankStore, banks: list[str], budget: int | None = None) -> list[str]:
    """Answers of kv queries (with and without the context map) and session briefs over every bank,
    checking after each step that the KV in memory is within ``budget``."""
    sessions = store.agent_sessions
    answers = []
    for _ in range(2):
        for bank in banks:
            answers.append(store.query(bank, QUESTION, k=2, max_new_tokens=6).answer)
            answers.append(store.query(bank, QUESTION, k=2, max_new_tokens=6, context_map=True).answer)
            answers.append(sessions.brief(bank, "s", "What is the margin?", max_new_tokens=6).answer)
            if budget is not None:
                assert store.kv_memory.nbytes <= budget
    return answers


def _held(store: BankStore, banks: list[str]) -> dict[str, int]:
    """Bytes of KV in memory per kind over ``banks``, as their stats report it."""
    out = {"blocks": 0, "map": 0, "sessions": 0}
    for bank in banks:
        for kind, usage in store.stats(bank).memory.items():
            out[kind] += usage["bytes"]
    return out


def test_every_kv_in_memory_stays_within_one_budget_and_answers_do_not_change(
        make_store: Callable[..., BankStore]) -> None:
    banks = ["m0", "m1", "m2"]
    roomy = make_store()
    _fill(roomy, banks)
    expected = _workload(roomy, banks)
    held = _held(roomy, banks)
    assert all(held.values()) and roomy.kv_memory.nbytes == sum(held.values())

    budget = sum(held.values()) // 3
    tight = make_store(kv_memory_bytes=budget)  # the same data, reopened under a third of what it needs
    assert _workload(tight, banks, budget) == expected
    now = _held(tight, banks)
    assert sum(now.values()) == tight.kv_memory.nbytes <= budget
    # Each kind was evicted and rebuilt at least once (a first use per bank misses anyway).
    assert all(tight.kv_memory.counters[kind].misses > len(banks) for kind in ("map", "sessions"))


def test_a_per_bank_cap_keeps_each_bank_within_its_share(make_store: Callable[..., BankStore]) -> None:
    banks = ["p0", "p1"]
    roomy = make_store()
    _fill(roomy, banks)
    expected = _workload(roomy, banks)
    cap = sum(_held(roomy, banks[:1]).values()) // 2
    capped = make_store(kv_memory_bank_bytes=cap)
    assert _workload(capped, banks) == expected
    assert all(sum(_held(capped, [bank]).values()) <= cap for bank in banks)


def test_deleting_a_bank_drops_all_of_its_kv_from_memory(store: BankStore) -> None:
    _fill(store, ["gone", "kept"])
    _workload(store, ["gone", "kept"])
    kept = _held(store, ["kept"])
    assert all(_held(store, ["gone"]).values()) and all(kept.values())
    # GPU-resident copies (filled only on CUDA, so placed here by hand): keyed by bank, dropped with it.
    with store.session() as s:
        ids = {bank: store.bank_row(s, bank).id for bank in ("gone", "kept")}
    probe = store.runner.encode([store.runner.tokenize(SECRET)])[0]
    for bank_id in ids.values():
        store.runner.resident.put(resident_key(bank_id, "probe"), probe)
    store.delete_bank("gone")
    assert store.kv_memory.nbytes == sum(kept.values())  # hot blocks, map KV and session states all gone
    assert _held(store, ["kept"]) == kept
    assert resident_key(ids["gone"], "probe") not in store.runner.resident
    assert resident_key(ids["kept"], "probe") in store.runner.resident
