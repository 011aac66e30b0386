"""Hot tier: decoded blocks in memory, per bank, within the process's KV budget (kvstore.memory.budget)."""

from __future__ import annotations

from collections.abc import Callable, Collection

import torch

from kvstore.memory.budget import KVBudget
from kvstore.model.device import pinned
from kvstore.types import BlockKV

KIND = "blocks"


def resident_key(bank: int, key: str) -> str:
    """What a block's GPU-resident copy is found by: its bank and its hot-tier key, so the GPU cache is
    partitioned by bank like the hot tier (a shared copy would make one bank's load time tell whether
    another bank had just used the same text)."""
    return f"{bank}/{key}"


def bank_of_resident_key(bank: int) -> Callable[[str], bool]:
    """Whether a GPU cache key belongs to ``bank`` (to drop them all when the bank is deleted)."""
    prefix = f"{bank}/"
    return lambda key: key.startswith(prefix)


class HotCache:
    """Decoded blocks of each bank keyed by blob id (a cold block's on-the-fly KV by its token content,
    ``memory.cold_key``). Two banks holding the same content hold two entries: nothing here depends on
    another bank's data or activity, except the eviction order once the global KV budget is full.

    ``budget_bytes`` caps the hot tier within ``kv``, the process's KV budget (``KVRAG_HOT_TIER_BYTES``); with
    no ``kv`` (a standalone tier: tests, benchmarks) it has a budget of its own.
    """

    def __init__(self, budget_bytes: int, pin_dtype: torch.dtype | None = None, *, kv: KVBudget | None = None
                 ) -> None:
        self.kv = kv if kv is not None else KVBudget(budget_bytes)
        self.budget_bytes = budget_bytes
        # A CUDA worker keeps its blocks in page-locked host memory in the model's dtype, so the copy to the
        # GPU is one asynchronous DMA with no conversion; a CPU worker stores the decoded tensors as they are.
        self.pin_dtype = pin_dtype

    @property
    def budget_bytes(self) -> int:
        return self.kv.kind_bytes.get(KIND, self.kv.total_bytes)

    @budget_bytes.setter
    def budget_bytes(self, value: int) -> None:
        self.kv.kind_bytes[KIND] = value
        self.kv.shrink()

    @property
    def nbytes(self) -> int:
        return self.kv.kind_nbytes(KIND)

    @property
    def hits(self) -> int:
        return self.kv.counters[KIND].hits

    @property
    def misses(self) -> int:
        return self.kv.counters[KIND].misses

    def get(self, bank: int, key: str) -> BlockKV | None:
        """The bank's block under ``key``, now its most recently used; None (a miss) when absent."""
        block = self.kv.get(bank, KIND, key)
        assert block is None or isinstance(block, BlockKV)
        return block

    def contains(self, bank: int, key: str) -> bool:
        """Whether the bank holds ``key`` (recency and counters untouched)."""
        return self.kv.peek(bank, KIND, key) is not None

    def size_of(self, bank: int, key: str) -> int:
        """Bytes of the bank's decoded block under ``key``, 0 if absent."""
        return self.kv.size_of(bank, KIND, key)

    def put(self, bank: int, key: str, block: BlockKV) -> BlockKV:
        """Keep ``block`` for the bank (a pinned copy on a CUDA worker); returns ``block`` itself, tagged with
        its bank-partitioned GPU cache key, to serve now."""
        block.key = resident_key(bank, key)
        kept = block
        if self.pin_dtype is not None and self.kv.fits(KIND, block.nbytes):
            kept = BlockKV(k=pinned(block.k, self.pin_dtype), v=pinned(block.v, self.pin_dtype), key=block.key)
        self.kv.put(bank, KIND, key, kept)
        return block

    def free_bytes(self, bank: int) -> int:
        """Room the bank's blocks can take without evicting anything: the least of what is left under the hot
        tier's cap, the process's KV budget and the bank's share (warming at ingest must not push out KV in use).

        The two global rooms depend on other banks' use (volume, never content: the same residual as the global
        cap's eviction, issue 26 hole 5). With ``kv_memory_bank_bytes`` x banks <= both global caps they never
        bind before the bank's own share does, so whether a bank's blocks are warmed depends on it alone."""
        free = [self.budget_bytes - self.nbytes, self.kv.total_bytes - self.kv.nbytes]
        if self.kv.bank_bytes is not None:
            free.append(self.kv.bank_bytes - sum(part["bytes"] for part in self.kv.usage(bank).values()))
        return min(free)

    def discard(self, bank: int, key: str) -> None:
        self.kv.discard(bank, KIND, key)

    def discard_everywhere(self, key: str, keep: Collection[int] = ()) -> None:
        """Drop ``key`` from every bank but those in ``keep`` (the banks still referencing its blob)."""
        self.kv.discard_everywhere(KIND, key, keep)
