"""What the engine's parts may use of the facade, as a protocol.

The memory manager, the context maps, the key summaries and the sessions are built by
:class:`kvstore.bank.BankStore` and handed the store itself; they type it with :class:`Engine` instead of
importing ``kvstore.bank``, so no part imports the facade and the engine has no import cycle
(tests/test_architecture.py). Everything here is public on the facade: a part never touches its private
members. This module imports only leaf modules (no part, no facade).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any, Protocol

from sqlalchemy.orm import Session, sessionmaker

from kvstore.config import Settings
from kvstore.memory.budget import KVBudget
from kvstore.memory.hot import HotCache
from kvstore.model.loader import LoadedModel
from kvstore.model.runner import BlockKV, Runner
from kvstore.storage.blobstore import BlobStore
from kvstore.storage.catalog import BankRow, BlockRow
from kvstore.storage.index import BankIndex
from kvstore.types import Hit, SearchFilter


class SummaryBuilder(Protocol):
    """The per-block key summaries the facade keeps (:class:`kvstore.query.keysummary.KeySummaries`)."""

    def build(self, kv: BlockKV, fingerprint: str) -> bytes: ...


class Engine(Protocol):
    """The facade as its parts see it: catalog sessions, blobs, hot tier, model, locks and a few operations."""

    settings: Settings
    sessions: sessionmaker[Session]
    blobs: BlobStore  # local files or an object store (kvstore.storage)
    hot: HotCache
    kv_memory: KVBudget  # one byte budget over every KV kept in RAM, partitioned by bank
    llm: LoadedModel
    runner: Runner
    model_lock: threading.Lock
    blob_lock: threading.Lock  # held around blob writes/deletes and the catalog commit that references them

    @property
    def summaries(self) -> SummaryBuilder: ...

    def bank_row(self, s: Session, name: str) -> BankRow: ...

    def bank_index(self, bank: BankRow) -> BankIndex: ...

    def note(self, bank: str, what: str, value: Any = 1) -> None: ...

    def drop_unreferenced(self, s: Session, blob_ids: Iterable[str | None]) -> None: ...

    def load_block(self, s: Session, bank: BankRow, block: BlockRow) -> BlockKV: ...

    def delete_document(self, bank: str, doc_id: str, *, if_match: int | None = None,
                        agent: str | None = None) -> None: ...

    def search(self, bank: str, query: str, *, k: int = 5, filter: SearchFilter | None = None,
               retrieval: str | None = None) -> list[Hit]: ...
