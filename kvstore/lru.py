"""A byte-budgeted LRU map: the eviction core shared by the hot tier and the GPU-resident blocks."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar


class HasBytes(Protocol):
    """Anything that knows its size in bytes (decoded blocks, GPU-resident KV)."""

    @property
    def nbytes(self) -> int: ...


T = TypeVar("T", bound=HasBytes)


class ByteBudgetLRU(Generic[T]):
    """Items keyed by string under a byte budget, least recently used out first; safe across threads.

    ``hits`` and ``misses`` count :meth:`get` calls; :meth:`peek` and ``in`` leave counters and order alone.
    """

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._items: OrderedDict[str, T] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def peek(self, key: str) -> T | None:
        """The item under ``key`` without touching the LRU order or the counters."""
        return self._items.get(key)

    def get(self, key: str) -> T | None:
        """The item under ``key``, now the most recently used; None (a miss) when absent."""
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item

    def put(self, key: str, item: T) -> None:
        """Insert or replace ``item``, then evict the least recently used until within budget; an item larger
        than the whole budget is not kept (it would evict everything and then itself)."""
        size = item.nbytes
        if size > self.budget_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._items[key] = item
            self._bytes += size
            while self._bytes > self.budget_bytes:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= evicted.nbytes

    def discard(self, key: str) -> None:
        """Drop ``key`` if present."""
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes

    def discard_where(self, doomed: Callable[[str], bool]) -> int:
        """Drop every key ``doomed`` accepts (e.g. all of a deleted bank's); how many went."""
        with self._lock:
            keys = [key for key in self._items if doomed(key)]
            for key in keys:
                self._bytes -= self._items.pop(key).nbytes
            return len(keys)
