"""Hot tier: decoded blocks in memory under a byte budget, least recently used out first."""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

from .device import pinned
from .runner import BlockKV


class HotCache:
    """Decoded blocks keyed by blob id (content address), so shared content is cached once; a cold
    block's on-the-fly KV is keyed by its token content (``memory.cold_key``)."""

    def __init__(self, budget_bytes: int, pin_dtype: torch.dtype | None = None) -> None:
        self.budget_bytes = budget_bytes
        # A CUDA worker keeps its blocks in page-locked host memory in the model's dtype, so the copy to the
        # GPU is one asynchronous DMA with no conversion; a CPU worker stores the decoded tensors as they are.
        self.pin_dtype = pin_dtype
        self._items: OrderedDict[str, BlockKV] = OrderedDict()
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
        """Presence without touching the LRU order or the hit counters (for tier statistics)."""
        return key in self._items

    def size_of(self, key: str) -> int:
        """Bytes of the decoded block under ``key``, 0 if absent."""
        block = self._items.get(key)
        return block.nbytes if block is not None else 0

    def get(self, key: str) -> BlockKV | None:
        with self._lock:
            block = self._items.get(key)
            if block is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return block

    def put(self, key: str, block: BlockKV) -> None:
        if self.pin_dtype is not None and self.budget_bytes > 0:
            block = BlockKV(k=pinned(block.k, self.pin_dtype), v=pinned(block.v, self.pin_dtype), key=key)
        size = block.nbytes
        if size > self.budget_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._items[key] = block
            self._bytes += size
            while self._bytes > self.budget_bytes:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= evicted.nbytes

    def discard(self, key: str) -> None:
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
