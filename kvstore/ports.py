"""What the engine's parts may use of each other and of the facade, as protocols.

The facade (:class:`kvstore.bank.BankStore`) builds the parts and hands each the narrow collaborators it
needs: :class:`BankLookup`, :class:`BlobDropper`, :class:`BlockSource`. The memory manager, the context maps,
the key summaries and the sessions are handed the store itself; they type it with :class:`Engine` instead of
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
from kvstore.model.limits import PromptLimits
from kvstore.model.loader import LoadedModel
from kvstore.model.runner import Runner
from kvstore.storage.blobstore import BlobStore
from kvstore.storage.catalog import BankRow, BlockRow
from kvstore.storage.index import BankIndex
from kvstore.types import BlockKV, Hit, SearchFilter


class BankLookup(Protocol):
    """A bank's catalog row by name (:class:`kvstore.banks.service.Banks`); :class:`NotFound` if none."""

    def row(self, s: Session, name: str) -> BankRow: ...


class BlobDropper(Protocol):
    """Deletes the blobs no block references any more (:class:`kvstore.storage.blobgc.BlobCollector`)."""

    def drop_unreferenced(self, s: Session, blob_ids: Iterable[str | None]) -> None: ...


class BlockSource(Protocol):
    """A block's decoded KV (:class:`kvstore.memory.blocks.BlockLoader`); with no session, one is opened
    only to repair a damaged block."""

    def load(self, s: Session | None, bank: BankRow, block: BlockRow) -> BlockKV: ...


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
    limits: PromptLimits  # token caps of caller texts, the model's positions
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
