"""Loading a block's KV for a query, and repairing a damaged block from its stored text.

A block's KV comes from the hot tier, else its blob (decoded where the model runs), else, for a cold block
(no blob by design), a prefill of its tokens. A blob that fails its checksum or is missing takes the block
out of service (quarantined, counted in the integrity report) until it is re-encoded from its token ids.
"""

from __future__ import annotations

import logging
import threading
from typing import Protocol

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from kvstore.codec.format import decode_block, encode_block
from kvstore.errors import CorruptBlock, IncompatibleModel
from kvstore.memory.hot import HotCache
from kvstore.memory.tiers import TierCounters
from kvstore.model.loader import LoadedModel
from kvstore.model.runner import Runner
from kvstore.ports import BankLookup, BlobDropper, SummaryBuilder
from kvstore.storage.blobstore import BlobStore
from kvstore.storage.catalog import BankRow, BlockRow
from kvstore.storage.indexes import Note
from kvstore.storage.replication import blob_gc_lock
from kvstore.storage.token_ids import bytes_to_ids
from kvstore.types import BlockKV

log = logging.getLogger(__name__)


class ColdTier(Protocol):
    """The memory manager's cold path and counters (:class:`kvstore.memory.tiers.MemoryManager`)."""

    counters: TierCounters

    def load_cold(self, bank: BankRow, block: BlockRow) -> BlockKV: ...


class BlockLoader:
    """Decoded KV of blocks, with quarantine and rebuild of damaged ones (``verify`` checks a whole bank)."""

    def __init__(self, sessions: sessionmaker[Session], banks: BankLookup, llm: LoadedModel, runner: Runner,
                 model_lock: threading.Lock, blobs: BlobStore, blob_lock: threading.Lock, hot: HotCache,
                 memory: ColdTier, summaries: SummaryBuilder, gc: BlobDropper, note: Note) -> None:
        self.sessions = sessions
        self.banks = banks
        self.llm = llm
        self.runner = runner
        self.model_lock = model_lock
        self.blobs = blobs
        self.blob_lock = blob_lock
        self.hot = hot
        self.memory = memory
        self.summaries = summaries
        self.gc = gc
        self.note = note

    def load(self, s: Session | None, bank: BankRow, block: BlockRow) -> BlockKV:
        """Decoded KV of a block: hot tier, else blob + decode; a cold block (no blob) is prefilled from its
        tokens; a corrupt blob is rebuilt from text. With no session ``s``, one is opened for a repair only."""
        if block.blob_id is None:
            return self.memory.load_cold(bank, block)
        if block.blob_id:
            cached = self.hot.get(bank.id, block.blob_id)
            if cached is not None:
                self.memory.counters.hot_hits += 1
                return cached
            try:
                # Decoded where the model runs: on CUDA the compact sections cross the bus, not the dense KV.
                kv = decode_block(self.blobs.get(block.blob_id), bank.model_fingerprint, device=self.llm.device)
                kv = self.hot.put(bank.id, block.blob_id, kv)
                self.memory.counters.warm_loads += 1
                return kv
            except IncompatibleModel:
                raise
            except CorruptBlock as exc:
                if s is None:
                    return self._repair_in_own_session(bank, block, exc.detail)
                self.quarantine(s, bank, block, exc.detail)
        if s is None:
            return self._repair_in_own_session(bank, block, None)
        kv = self.rebuild(s, bank, block)
        self.note(bank.name, "rebuilt_blocks", 1)
        return kv

    def _repair_in_own_session(self, bank: BankRow, block: BlockRow, reason: str | None) -> BlockKV:
        with self.sessions() as s:
            if reason is not None:
                self.quarantine(s, bank, block, reason)
            kv = self.rebuild(s, bank, block)
        self.note(bank.name, "rebuilt_blocks", 1)
        return kv

    def quarantine(self, s: Session, bank: BankRow, block: BlockRow, reason: str) -> None:
        """Take a damaged block out of service (never served, counted in stats) until it is rebuilt."""
        log.error("bank %s block %d: %s; quarantined, rebuilding from the stored text", bank.name, block.id, reason)
        s.execute(update(BlockRow).where(BlockRow.id == block.id).values(status="quarantined"))
        s.commit()
        if block.blob_id:
            self.hot.discard(bank.id, block.blob_id)
        self.note(bank.name, "corrupt_blocks", 1)

    def rebuild(self, s: Session, bank: BankRow, block: BlockRow) -> BlockKV:
        """Encode the block again from its token ids, store the new blob and put the block back in service."""
        ids = bytes_to_ids(block.token_ids)
        with self.model_lock:
            kv = self.runner.encode([ids])[0]
        data = encode_block(kv, bank.model_fingerprint, bank.codec)
        try:
            with self.blob_lock:
                blob_gc_lock(s, exclusive=False)  # referenced when this commits: never collected in between
                old = block.blob_id
                blob_id = self.blobs.put(data, replace=True)
                s.execute(update(BlockRow).where(BlockRow.id == block.id).values(
                    blob_id=blob_id, stored_bytes=len(data), codec=bank.codec, status="live",
                    kv_summary=self.summaries.build(kv, bank.model_fingerprint)))
                s.commit()
                if old and old != blob_id:
                    self.gc.drop_unreferenced(s, {old})
        except Exception as exc:  # noqa: BLE001 - a failed rebuild must not hide the answer we have
            s.rollback()
            raise CorruptBlock(f"block {block.id} could not be rebuilt: {exc}") from exc
        return self.hot.put(bank.id, blob_id, decode_block(data, bank.model_fingerprint))

    def verify(self, bank: str) -> dict[str, int]:
        """Check every block's blob; quarantine and rebuild the damaged ones from the stored text."""
        checked = rebuilt = 0
        with self.sessions() as s:
            bank_row = self.banks.row(s, bank)
            # Cold blocks have no blob by design: nothing to check, they are prefilled from text when used.
            for block in s.scalars(select(BlockRow).where(BlockRow.bank_id == bank_row.id,
                                                          BlockRow.blob_id.is_not(None))).all():
                checked += 1
                try:
                    if not block.blob_id:
                        raise CorruptBlock("block has no blob")
                    decode_block(self.blobs.get(block.blob_id), bank_row.model_fingerprint)
                except CorruptBlock as exc:
                    self.quarantine(s, bank_row, block, exc.detail)
                    self.rebuild(s, bank_row, block)
                    self.note(bank_row.name, "rebuilt_blocks", 1)
                    rebuilt += 1
        return {"checked": checked, "rebuilt": rebuilt}


