"""Banks: create, list, change and delete them, and their stats.

A bank is bound to the loaded model's fingerprint at creation; its codec, budget and eviction policy are
defaults for the blocks written later. Deleting one removes its documents, blocks, op log, index, agent
sessions, KV kept in memory and the blobs no other bank references.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import Any, Protocol

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from kvstore.codec.format import check_choosable, default_codec, get_preset
from kvstore.config import Settings
from kvstore.errors import Conflict, IncompatibleModel, NotFound, ValidationFailed
from kvstore.memory.budget import KVBudget
from kvstore.memory.hot import HotCache, bank_of_resident_key
from kvstore.memory.placement import tier_stats
from kvstore.model.loader import LoadedModel
from kvstore.model.runner import Runner
from kvstore.storage.bank_settings import check_bank_limits
from kvstore.storage.catalog import BankRow, BlockRow, DocumentRow, OpLogRow
from kvstore.storage.indexes import BankIndexes
from kvstore.types import BankInfo, BankStats

BANK_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
EVICTION_POLICIES = ("lru", "importance", "hybrid")


def validate_bank_name(name: str) -> None:
    if not isinstance(name, str) or not BANK_NAME.fullmatch(name):
        raise ValidationFailed("bank name must match [a-z0-9][a-z0-9_-]{0,62}")


def check_model(bank: BankRow, llm: LoadedModel) -> None:
    """A bank's KV is only valid for the model it was written with."""
    if bank.model_fingerprint != llm.fingerprint:
        raise IncompatibleModel(f"bank {bank.name!r} is bound to model {bank.model_name!r}, not the loaded "
                                f"{llm.name!r}")


def bank_info(row: BankRow) -> BankInfo:
    return BankInfo(name=row.name, codec=row.codec, model=row.model_name, model_fingerprint=row.model_fingerprint,
                    block_tokens=row.block_tokens, budget_bytes=row.budget_bytes, max_blocks=row.max_blocks,
                    eviction=row.eviction, created_at=row.created_at)


class MapSettings(Protocol):
    """The context maps' per-bank settings (:class:`kvstore.contextmap.service.ContextMaps`)."""

    def check_budget(self, budget: int) -> None: ...

    def configure(self, bank: str, *, budget_tokens: int | None = None) -> Any: ...


class BudgetEnforcer(Protocol):
    """The memory manager's eviction to a bank's budget (:class:`kvstore.memory.tiers.MemoryManager`)."""

    def enforce_budget(self, s: Session, bank: BankRow) -> Any: ...


class BlobDropper(Protocol):
    def drop_unreferenced(self, s: Session, blob_ids: Iterable[str | None]) -> None: ...


BankDeletion = Callable[[Session, int], AbstractContextManager[None]]  # around the deleting transaction


class Banks:
    """Bank rows of the catalog and what hangs off them in this process (index, KV in memory)."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], llm: LoadedModel, runner: Runner,
                 indexes: BankIndexes, context_map: MapSettings, memory: BudgetEnforcer, hot: HotCache,
                 kv_memory: KVBudget, blob_lock: threading.Lock, gc: BlobDropper,
                 deleting_sessions: BankDeletion) -> None:
        self.settings = settings
        self.sessions = sessions
        self.llm = llm
        self.runner = runner
        self.indexes = indexes
        self.context_map = context_map
        self.memory = memory
        self.hot = hot
        self.kv_memory = kv_memory
        self.blob_lock = blob_lock
        self.gc = gc
        self.deleting_sessions = deleting_sessions  # the agent sessions' cleanup (kvstore.sessions)

    def row(self, s: Session, name: str) -> BankRow:
        if not isinstance(name, str) or not BANK_NAME.fullmatch(name):
            raise NotFound(f"bank {name!r} not found")
        row = s.scalar(select(BankRow).where(BankRow.name == name))
        if row is None:
            raise NotFound(f"bank {name!r} not found")
        return row

    def resolve_codec(self, codec: str) -> str:
        """``auto`` as this store's model gets it (:func:`kvstore.codec.format.default_codec`); other names as given."""
        return default_codec(codec, self.runner.num_layers, self.runner.kv_heads, self.runner.head_dim)

    def create(self, name: str, *, codec: str | None = None, budget_bytes: int | None = None,
               max_blocks: int | None = None, eviction: str = "lru",
               block_tokens: int | None = None, context_map_budget_tokens: int | None = None) -> BankInfo:
        """Create an empty bank bound to the loaded model's fingerprint."""
        validate_bank_name(name)
        if context_map_budget_tokens is not None:
            self.context_map.check_budget(context_map_budget_tokens)
        check_choosable(codec or self.settings.default_codec)
        codec = self.resolve_codec(codec or self.settings.default_codec)
        get_preset(codec)
        if eviction not in EVICTION_POLICIES:
            raise ValidationFailed(f"eviction must be one of {EVICTION_POLICIES}")
        check_bank_limits(budget_bytes=budget_bytes, max_blocks=max_blocks)
        with self.sessions() as s:
            row = BankRow(name=name, model_fingerprint=self.llm.fingerprint, model_name=self.llm.name, codec=codec,
                          block_tokens=block_tokens or self.settings.block_tokens, budget_bytes=budget_bytes,
                          max_blocks=max_blocks, eviction=eviction, evictions=0, merges=0)
            s.add(row)
            try:
                s.commit()
            except IntegrityError:
                raise Conflict(f"bank {name!r} already exists") from None
            self.indexes.create(row.id)
        if context_map_budget_tokens is not None:
            self.context_map.configure(name, budget_tokens=context_map_budget_tokens)
        return bank_info(row)

    def list_banks(self, names: set[str] | None = None) -> list[BankInfo]:
        """Every bank, or only those in ``names`` (a key's scope)."""
        with self.sessions() as s:
            rows = s.scalars(select(BankRow).order_by(BankRow.name)).all()
            return [bank_info(r) for r in rows if names is None or r.name in names]

    def get(self, name: str) -> BankInfo:
        with self.sessions() as s:
            return bank_info(self.row(s, name))

    def update(self, name: str, *, codec: str | None = None, budget_bytes: int | None = None,
               max_blocks: int | None = None, eviction: str | None = None,
               context_map_budget_tokens: int | None = None) -> BankInfo:
        """Change a bank's defaults; existing blocks keep the codec they were written with."""
        if context_map_budget_tokens is not None:
            self.context_map.check_budget(context_map_budget_tokens)
        check_bank_limits(budget_bytes=budget_bytes, max_blocks=max_blocks)
        with self.sessions() as s:
            row = self.row(s, name)
            if codec is not None:
                check_choosable(codec)
                codec = self.resolve_codec(codec)
                get_preset(codec)
                row.codec = codec
            if budget_bytes is not None:
                row.budget_bytes = budget_bytes
            if max_blocks is not None:
                row.max_blocks = max_blocks
            if eviction is not None:
                if eviction not in EVICTION_POLICIES:
                    raise ValidationFailed(f"eviction must be one of {EVICTION_POLICIES}")
                row.eviction = eviction
            s.commit()
            with self.blob_lock:
                self.memory.enforce_budget(s, row)
        if context_map_budget_tokens is not None:
            self.context_map.configure(name, budget_tokens=context_map_budget_tokens)
        return bank_info(row)

    def delete(self, name: str) -> None:
        """Delete a bank with its documents, blocks, index, agent sessions and unreferenced blobs."""
        with self.sessions() as s, self.blob_lock:
            row = self.row(s, name)
            blob_ids = set(s.scalars(select(BlockRow.blob_id).where(BlockRow.bank_id == row.id)).all())
            with self.deleting_sessions(s, row.id):
                s.execute(delete(BlockRow).where(BlockRow.bank_id == row.id))
                s.execute(delete(DocumentRow).where(DocumentRow.bank_id == row.id))
                s.execute(delete(OpLogRow).where(OpLogRow.bank_id == row.id))
                s.delete(row)
                s.commit()
            self.kv_memory.drop_bank(row.id)  # its hot blocks, map KV and session states
            self.runner.resident.discard_where(bank_of_resident_key(row.id))  # and its GPU-resident copies
            self.gc.drop_unreferenced(s, blob_ids)
            self.indexes.drop(row)

    def stats(self, name: str) -> BankStats:
        with self.sessions() as s:
            bank = self.row(s, name)
            docs = s.scalar(select(func.count()).select_from(DocumentRow).where(DocumentRow.bank_id == bank.id)) or 0
            live = (BlockRow.bank_id == bank.id, BlockRow.status == "live")
            n_blocks, tokens, raw = s.execute(select(func.count(), func.coalesce(func.sum(BlockRow.token_count), 0),
                                                     func.coalesce(func.sum(BlockRow.raw_bytes), 0)).where(*live)).one()
            # A blob shared by several blocks is stored once, so count each distinct blob once.
            distinct = select(BlockRow.blob_id, func.max(BlockRow.stored_bytes).label("b")).where(
                *live, BlockRow.blob_id.is_not(None)).group_by(BlockRow.blob_id).subquery()
            stored = int(s.scalar(select(func.coalesce(func.sum(distinct.c.b), 0))) or 0)
            raw = int(raw)
            quarantined = s.scalar(select(func.count()).select_from(BlockRow).where(
                BlockRow.bank_id == bank.id, BlockRow.status == "quarantined")) or 0
            return BankStats(name=bank.name, documents=int(docs), blocks=int(n_blocks), tokens=int(tokens),
                             raw_bytes=int(raw), stored_bytes=int(stored),
                             compression_ratio=round(raw / stored, 4) if stored else 0.0,
                             budget_bytes=bank.budget_bytes, max_blocks=bank.max_blocks, eviction=bank.eviction,
                             evictions=bank.evictions, merges=bank.merges, quarantined_blocks=int(quarantined),
                             index_entries=self.indexes.get(bank).ntotal, reencodes=int(bank.reencodes or 0),
                             tiers=tier_stats(s, bank.id, self.hot, bank.model_fingerprint),
                             memory=self.kv_memory.usage(bank.id))
