"""The rendered map's KV: prefilled once per map text after the shared prefix (keys pre-RoPE, like a block)
and kept in memory within the process's KV budget, so a query that reuses it prefills nothing for it.

Entries are keyed by the bank's creation time within the bank's partition: a deleted bank's id may come
back (SQLite), its creation time does not. A new map version with the same text (e.g. only feedback changed)
reuses the KV; a write that changes the text discards it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from kvstore.storage.catalog import BankRow

if TYPE_CHECKING:
    from kvstore.ports import Engine
    from kvstore.types import BlockKV

KIND = "map"  # its share of the process's KV budget (kvstore.memory.budget): evicted, it is prefilled again


@dataclass
class MapPrefill:
    """The map's KV for a query: ``kv`` None for an empty map; ``prefilled`` 0 when it came from the cache."""

    version: int
    token_ids: list[int]
    kv: BlockKV | None
    prefilled: int


@dataclass
class CachedKV:
    """One bank's map KV: the version and the text it was prefilled for, its token ids, the KV itself."""

    version: int
    text: str
    token_ids: list[int]
    kv: BlockKV

    @property
    def nbytes(self) -> int:
        return self.kv.nbytes


def kv_key(bank: BankRow) -> str:
    """The entry's key within the bank's partition: its creation time (see the module doc)."""
    return str(bank.created_at)


class MapKVCache:
    """The map KV of every bank of one store."""

    def __init__(self, store: Engine) -> None:
        self.store = store
        self.memory = store.kv_memory

    def discard(self, bank: BankRow) -> None:
        """Forget the bank's map KV (its text changed)."""
        self.memory.discard(bank.id, KIND, kv_key(bank))

    def prefill(self, bank: BankRow, version: int, text_of: Callable[[], str]) -> MapPrefill:
        """The KV of map ``version`` (``text_of`` renders it), prefilled only when this map text has not been
        prefilled before."""
        key = kv_key(bank)
        cached = self.memory.get(bank.id, KIND, key)
        if cached is not None and cached.version == version:
            return MapPrefill(version, cached.token_ids, cached.kv, 0)
        text = text_of()
        if not text:
            return MapPrefill(version, [], None, 0)
        if cached is not None and cached.text == text:  # e.g. only feedback changed: same text, same KV
            self.memory.put(bank.id, KIND, key, replace(cached, version=version))
            return MapPrefill(version, cached.token_ids, cached.kv, 0)
        ids = self.store.runner.tokenize(text)
        with self.store.model_lock:
            kv = self.store.runner.encode([ids])[0]
        self.memory.put(bank.id, KIND, key, CachedKV(version, text, ids, kv))
        return MapPrefill(version, ids, kv, len(ids))
