"""Hot tier: decoded blocks in memory under a byte budget, least recently used out first."""

from __future__ import annotations

import torch

from .device import pinned
from .lru import ByteBudgetLRU
from .runner import BlockKV


class HotCache(ByteBudgetLRU[BlockKV]):
    """Decoded blocks keyed by blob id (content address), so shared content is cached once; a cold
    block's on-the-fly KV is keyed by its token content (``memory.cold_key``)."""

    def __init__(self, budget_bytes: int, pin_dtype: torch.dtype | None = None) -> None:
        super().__init__(budget_bytes)
        # A CUDA worker keeps its blocks in page-locked host memory in the model's dtype, so the copy to the
        # GPU is one asynchronous DMA with no conversion; a CPU worker stores the decoded tensors as they are.
        self.pin_dtype = pin_dtype

    def size_of(self, key: str) -> int:
        """Bytes of the decoded block under ``key``, 0 if absent."""
        block = self.peek(key)
        return block.nbytes if block is not None else 0

    def put(self, key: str, block: BlockKV) -> None:
        if self.pin_dtype is not None and self.budget_bytes > 0:
            block = BlockKV(k=pinned(block.k, self.pin_dtype), v=pinned(block.v, self.pin_dtype), key=key)
        super().put(key, block)
