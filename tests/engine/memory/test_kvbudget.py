"""The KV budget on its own: caps (global, per bank, per kind), max-min fair eviction, partitions, drops."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.memory.budget import KINDS, KVBudget


@dataclass
class Item:
    nbytes: int


def test_the_same_key_in_two_banks_is_two_entries() -> None:
    kv = KVBudget(1000)
    kv.put(1, "blocks", "x", Item(100))
    assert kv.get(2, "blocks", "x") is None and kv.peek(2, "blocks", "x") is None
    assert kv.usage(2) == {kind: {"entries": 0, "bytes": 0} for kind in KINDS}
    kv.put(2, "blocks", "x", Item(100))
    kv.discard(1, "blocks", "x")
    assert kv.get(2, "blocks", "x") is not None and kv.usage(1)["blocks"] == {"entries": 0, "bytes": 0}


def test_a_full_budget_evicts_from_the_bank_holding_the_most() -> None:
    kv = KVBudget(1000)
    kv.put(1, "blocks", "small", Item(200))
    for i in range(4):
        kv.put(2, "map" if i == 0 else "blocks", f"b{i}", Item(200))
    kv.put(2, "sessions", "s", Item(200))  # 1200 > 1000: bank 2 holds 1000 of it, its oldest entry goes
    assert kv.nbytes == 1000
    assert kv.peek(1, "blocks", "small") is not None
    assert kv.peek(2, "map", "b0") is None and kv.peek(2, "sessions", "s") is not None
    kv.get(2, "blocks", "b1")  # used again: b2 is now bank 2's least recently used
    kv.put(3, "blocks", "new", Item(200))
    assert kv.peek(2, "blocks", "b2") is None and kv.peek(2, "blocks", "b1") is not None
    assert kv.peek(1, "blocks", "small") is not None  # the smallest bank keeps its share


def test_per_bank_and_per_kind_caps() -> None:
    kv = KVBudget(10_000, bank_bytes=300, kind_bytes={"blocks": 500})
    for i in range(3):
        kv.put(1, "blocks", i, Item(150))
    assert kv.usage(1)["blocks"]["bytes"] == 300 and kv.peek(1, "blocks", 0) is None  # the bank's own oldest
    kv.put(2, "blocks", "a", Item(150))
    kv.put(3, "blocks", "a", Item(150))  # blocks 600 > 500: bank 1 holds the most blocks
    assert kv.kind_nbytes("blocks") == 450 and kv.peek(1, "blocks", 1) is None
    assert not kv.put(4, "map", "huge", Item(301))  # larger than a bank may hold: not kept
    assert kv.usage(4)["map"]["entries"] == 0
    kv.kind_bytes["blocks"] = 0
    kv.shrink()
    assert kv.kind_nbytes("blocks") == 0 and kv.nbytes == 0


def test_dropping_a_bank_frees_all_of_its_kinds_and_nothing_else() -> None:
    kv = KVBudget(10_000)
    for kind in KINDS:
        kv.put(1, kind, "k", Item(100))
        kv.put(2, kind, "k", Item(100))
    assert kv.drop_bank(1) == 300
    assert kv.usage(1) == {kind: {"entries": 0, "bytes": 0} for kind in KINDS}
    assert kv.usage(2) == {kind: {"entries": 1, "bytes": 100} for kind in KINDS} and kv.nbytes == 300
    kv.discard_everywhere("blocks", "k", keep={2})
    assert kv.peek(2, "blocks", "k") is not None
    kv.discard_everywhere("blocks", "k")
    assert kv.peek(2, "blocks", "k") is None and kv.nbytes == 200


OPS = st.lists(st.tuples(st.sampled_from(["put", "get", "discard", "drop"]), st.integers(1, 4),
                         st.sampled_from(KINDS), st.integers(0, 5), st.integers(1, 400)), max_size=60)


@settings(max_examples=200, deadline=None)
@given(ops=OPS, total=st.integers(0, 1500), bank_cap=st.one_of(st.none(), st.integers(0, 800)),
       block_cap=st.integers(0, 1500))
def test_every_cap_holds_after_any_sequence(ops: list[tuple[str, int, str, int, int]], total: int,
                                            bank_cap: int | None, block_cap: int) -> None:
    kv = KVBudget(total, bank_bytes=bank_cap, kind_bytes={"blocks": block_cap})
    for op, bank, kind, key, size in ops:
        if op == "put":
            kept = kv.put(bank, kind, key, Item(size))
            assert kept == kv.fits(kind, size)
            if kept:  # the newest entry is never its own victim
                assert kv.peek(bank, kind, key) is not None
        elif op == "get":
            kv.get(bank, kind, key)
        elif op == "discard":
            kv.discard(bank, kind, key)
        else:
            kv.drop_bank(bank)
        usage = {b: kv.usage(b) for b in range(1, 5)}
        assert kv.nbytes == sum(u[k]["bytes"] for u in usage.values() for k in KINDS) <= total
        assert kv.kind_nbytes("blocks") == sum(u["blocks"]["bytes"] for u in usage.values()) <= block_cap
        if bank_cap is not None:
            assert all(sum(u[k]["bytes"] for k in KINDS) <= bank_cap for u in usage.values())


def test_the_entry_just_put_is_never_its_own_victim() -> None:
    kv = KVBudget(10_000, kind_bytes={"blocks": 500})
    kv.put(2, "blocks", "a", Item(150))
    kv.put(3, "blocks", "a", Item(150))
    assert kv.put(1, "blocks", "big", Item(400))  # bank 1 now holds the most, but only what it was just given
    assert kv.peek(1, "blocks", "big") is not None and kv.kind_nbytes("blocks") <= 500
    assert kv.peek(2, "blocks", "a") is None and kv.peek(3, "blocks", "a") is None  # the next largest paid
