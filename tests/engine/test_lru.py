"""The byte-budgeted LRU behind the hot tier and the GPU-resident blocks."""

from __future__ import annotations

from dataclasses import dataclass

from kvstore.lru import ByteBudgetLRU


@dataclass
class Item:
    nbytes: int


def test_least_recently_used_goes_first_and_the_budget_holds() -> None:
    lru: ByteBudgetLRU[Item] = ByteBudgetLRU(budget_bytes=30)
    lru.put("a", Item(10))
    lru.put("b", Item(10))
    lru.put("c", Item(10))
    assert lru.get("a") is not None  # "b" is now the least recently used
    lru.put("d", Item(10))
    assert "b" not in lru and all(key in lru for key in "acd")
    assert lru.nbytes == 30 and len(lru) == 3


def test_replacing_a_key_counts_its_bytes_once_and_oversized_items_are_not_kept() -> None:
    lru: ByteBudgetLRU[Item] = ByteBudgetLRU(budget_bytes=30)
    lru.put("a", Item(10))
    lru.put("a", Item(20))
    assert lru.nbytes == 20 and len(lru) == 1
    lru.put("huge", Item(31))
    assert "huge" not in lru and "a" in lru  # a too-large item evicts nothing
    lru.discard("a")
    lru.discard("missing")
    assert lru.nbytes == 0 and len(lru) == 0


def test_counters_and_peek() -> None:
    lru: ByteBudgetLRU[Item] = ByteBudgetLRU(budget_bytes=20)
    lru.put("a", Item(10))
    lru.put("b", Item(10))
    assert lru.peek("a") is not None and lru.peek("zz") is None  # peek neither counts nor reorders
    assert (lru.hits, lru.misses) == (0, 0)
    assert lru.get("a") is not None and lru.get("zz") is None
    assert (lru.hits, lru.misses) == (1, 1)
    lru.put("c", Item(10))  # "b" was least recently used: peek did not refresh it, get refreshed "a"
    assert "b" not in lru and "a" in lru


def test_discard_where_drops_the_matching_keys_and_their_bytes() -> None:
    lru: ByteBudgetLRU[Item] = ByteBudgetLRU(1000)
    for key in ("1/a", "1/b", "12/a"):
        lru.put(key, Item(100))
    assert lru.discard_where(lambda k: k.startswith("1/")) == 2
    assert "12/a" in lru and "1/a" not in lru and lru.nbytes == 100
