"""Memory management of a bank: tiers, budgets, importance, dedup, expiry, re-encoding and garbage collection.

Tiers of a block:

- **hot**: decoded KV in RAM (:class:`~kvstore.memory.hot.HotCache`, per bank, keyed by blob id, LRU under
  ``KVRAG_HOT_TIER_BYTES`` within the process's KV budget, :mod:`kvstore.memory.budget`);
- **warm**: the compressed blob on disk (``BlockRow.blob_id`` set);
- **cold**: text, token ids and embedding only (``blob_id`` None). A query that retrieves a cold
  block prefills its tokens after the shared prefix on the fly, which is exactly how the block was
  encoded at ingest, so the answer does not change, only its latency.

Cold blocks keep ``status == "live"``: they stay searchable and every filter that selects live
blocks keeps working; the tier is told by ``blob_id``.

Which warm blocks go cold first is :mod:`kvstore.memory.policy`; where each block lives, as stats and
listings show it, :mod:`kvstore.memory.placement`.

This module holds no web imports and no BankStore: the facade calls these functions inside its own
sessions and write order.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from kvstore.codec.format import encode_block
from kvstore.memory.dedup import ids_bytes, misattributed, plan_dedup, share_blob
from kvstore.memory.placement import cold_key
from kvstore.memory.policy import (
    EvictionPlan,
    MemoryConfig,
    block_attention,
    evict_to_budget,
    expired_doc_ids,
    warm_candidates,
)
from kvstore.model.cache_ops import context_attention
from kvstore.storage.catalog import BankRow, BlockRow, utcnow
from kvstore.storage.replication import blob_gc_lock
from kvstore.types import BlockKV, Context

if TYPE_CHECKING:
    from kvstore.ports import Engine


log = logging.getLogger(__name__)


class SessionHousekeeping(Protocol):
    """The agent sessions' part of maintenance (:class:`kvstore.sessions.service.SessionStore`)."""

    def collect_orphans(self, grace_s: float) -> int: ...

    def purge_pruned(self) -> int: ...


@dataclass
class TierCounters:
    """Where the blocks of kv queries came from (per process, for /metrics)."""

    hot_hits: int = 0
    warm_loads: int = 0
    cold_encodes: int = 0
    rewarms: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"hot_hits": self.hot_hits, "warm_loads": self.warm_loads, "cold_encodes": self.cold_encodes,
                "rewarms": self.rewarms}


# -- the manager: what the facade calls -----------------------------------------------------------


class MemoryManager:
    """Tiers, budgets, importance, dedup, expiry, re-encoding and garbage collection of a BankStore.

    It works through the store's own catalog sessions, blob store, hot tier, index and model lock,
    and keeps its write order: blobs first, then one catalog transaction, then derived state.
    """

    def __init__(self, store: Engine, sessions: SessionHousekeeping, config: MemoryConfig | None = None) -> None:
        self.store = store
        self.sessions = sessions
        self.config = config or MemoryConfig()
        self.counters = TierCounters()

    # -- query path -------------------------------------------------------------------------------

    def load_cold(self, bank: BankRow, block: BlockRow) -> BlockKV:
        """KV of a cold block: prefill its tokens after the prefix (as at ingest), cached in the hot tier."""
        store = self.store
        key = cold_key(bank.model_fingerprint, block.token_ids)
        kv = store.hot.get(bank.id, key)
        if kv is not None:
            self.counters.hot_hits += 1
            return kv
        ids = np.frombuffer(block.token_ids, dtype="<i4").astype(int).tolist()
        with store.model_lock:
            kv = store.runner.encode([ids])[0]
        self.counters.cold_encodes += 1
        return store.hot.put(bank.id, key, kv)

    def attention_shares(self, ctx: Context, question_ids: Sequence[int], kvs: Sequence[BlockKV],
                         recorded: Callable[[], torch.Tensor | None] | None = None) -> list[float] | None:
        """Share of the question's attention on each assembled block, or None when it cannot be told
        (tracking off, or a compacted context whose rows no longer line up with the blocks).

        ``recorded`` reduces what the answer's prefill recorded (:func:`kvstore.model.compaction.prefill_attention`)
        to ``[context_tokens]``, only once the shares are wanted; when it has nothing (nothing was generated)
        the context's cache is cut back to prefix + blocks and the question is scored once more.
        """
        spans = [kv.tokens for kv in kvs]
        if not self.config.track_importance or not spans or ctx.context_tokens != sum(spans):
            return None
        scores = recorded() if recorded is not None else None
        if scores is None:
            with self.store.model_lock:
                scores = context_attention(self.store.runner, ctx, question_ids)
        return block_attention(scores, spans)

    def block_shares(self, votes: torch.Tensor | None, kvs: Sequence[BlockKV]) -> list[float] | None:
        """:meth:`attention_shares` from votes already reduced (``[context_tokens]``, a batched answer's), or
        None when tracking is off or nothing was recorded."""
        spans = [kv.tokens for kv in kvs]
        if not self.config.track_importance or not spans or votes is None:
            return None
        return block_attention(votes, spans)

    def rewarm_and_enforce(self, s: Session, bank: BankRow, rows: Sequence[BlockRow], kvs: Sequence[BlockKV]) -> int:
        """Write the cold blocks a query just used back to warm, then bring the bank within budget.

        Runs after the access was recorded, so the policies see these blocks as just used.
        """
        if not self.config.rewarm_on_access:
            return 0
        cold = [(row, kv) for row, kv in zip(rows, kvs, strict=True) if row.blob_id is None]
        if not cold:
            return 0
        store = self.store
        with store.blob_lock:
            blob_gc_lock(s, exclusive=False)  # these blobs are referenced when this transaction commits
            for row, kv in cold:
                data = encode_block(kv, bank.model_fingerprint, bank.codec)
                blob_id = store.blobs.put(data)
                s.execute(update(BlockRow).where(BlockRow.id == row.id, BlockRow.blob_id.is_(None)).values(
                    blob_id=blob_id, stored_bytes=len(data), codec=bank.codec,
                    kv_summary=store.summaries.build(kv, bank.model_fingerprint)))
                store.hot.discard(bank.id, cold_key(bank.model_fingerprint, row.token_ids))
                store.hot.put(bank.id, blob_id, kv)
            s.execute(update(BankRow).where(BankRow.id == bank.id).values(reencodes=BankRow.reencodes + len(cold)))
            s.commit()
            self.counters.rewarms += len(cold)
            self.enforce_budget(s, bank)
        return len(cold)

    # -- write path -------------------------------------------------------------------------------

    def enforce_budget(self, s: Session, bank: BankRow) -> EvictionPlan:
        """Evict to the bank's budget and drop blobs nothing references any more (caller holds the blob lock)."""
        plan = evict_to_budget(s, bank, self.config, utcnow())
        if plan.blob_ids:
            self.store.drop_unreferenced(s, plan.blob_ids)
        return plan

    # -- maintenance ------------------------------------------------------------------------------

    def maintain(self, bank: str, *, evict: bool = True, merge: bool = True, gc: bool = True, expire: bool = True,
                 reencode: bool = True) -> dict[str, Any]:
        """Expire, repair old near-duplicate merges, re-encode (model change, spare budget), share the blobs of
        blocks with identical tokens, evict, collect orphans."""
        store = self.store
        report: dict[str, Any] = {"bank": bank, "expired_documents": [], "repaired_merges": 0, "rebound_model": False,
                                  "reencoded": 0, "merged": 0, "evicted": 0, "over_budget": False,
                                  "orphan_blobs_removed": 0}
        if expire:
            with store.sessions() as s:
                doomed = expired_doc_ids(s, store.bank_row(s, bank).id, utcnow())
            for doc_id in doomed:
                store.delete_document(bank, doc_id, agent="maintenance")
            report["expired_documents"] = doomed
        if reencode:
            report["rebound_model"] = self._rebind_model(bank)
        # Not optional: until it runs, a bank the old code merged answers with other documents' facts.
        report["repaired_merges"] = self._repair_merges(bank)
        if reencode:
            report["reencoded"] = self._rewarm_cold(bank)
        if merge:
            report["merged"] = self._merge(bank)
        if evict:
            with store.sessions() as s, store.blob_lock:
                plan = self.enforce_budget(s, store.bank_row(s, bank))
            report["evicted"], report["over_budget"] = len(plan.block_ids), plan.over_budget
        if gc:
            report["orphan_blobs_removed"] = self.collect_orphans()
            report["session_orphan_blobs_removed"] = self.sessions.collect_orphans(self.config.orphan_grace_s)
            report["session_pruned_purged"] = self.sessions.purge_pruned()  # past the restore retention
        return report

    def _rebind_model(self, bank: str) -> bool:
        """A bank encoded by another model: re-tokenize every block with the loaded model, drop its KV
        (every block goes cold, so queries re-encode lazily) and bind the bank to the loaded model."""
        store = self.store
        llm, runner = store.llm, store.runner
        with store.sessions() as s, store.blob_lock:
            row = store.bank_row(s, bank)
            if row.model_fingerprint == llm.fingerprint:
                return False
            blocks = s.scalars(select(BlockRow).where(BlockRow.bank_id == row.id)).all()
            old_blobs = {b.blob_id for b in blocks if b.blob_id}
            for b in blocks:
                ids = runner.tokenize(b.text)
                b.token_ids = np.asarray(ids, dtype="<i4").tobytes()
                b.token_count, b.raw_bytes = len(ids), len(ids) * runner.bytes_per_token_fp16
                b.blob_id, b.stored_bytes, b.merged_into = None, 0, None
                b.kv_summary = None  # keys of the old model: rebuilt from the new KV when next needed
            row.model_fingerprint, row.model_name = llm.fingerprint, llm.name
            s.commit()
            store.drop_unreferenced(s, old_blobs)
        return True

    def _rewarm_cold(self, bank: str) -> int:
        """Encode cold blocks back to warm while the budget has room, most used and most important first."""
        store = self.store
        with store.sessions() as s:
            row = store.bank_row(s, bank)
            cold = s.scalars(select(BlockRow).where(
                BlockRow.bank_id == row.id, BlockRow.status == "live", BlockRow.blob_id.is_(None)).order_by(
                BlockRow.access_count.desc(), BlockRow.importance.desc(), BlockRow.id.desc())).all()
            if not cold:
                return 0
            cands = warm_candidates(s, row.id, utcnow(), self.config)
            used = sum({c.blob_id: c.stored_bytes for c in cands}.values())
            room_blocks = None if row.max_blocks is None else row.max_blocks - len(cands)
            done = 0
            batch = store.settings.encode_batch_size
            for start in range(0, len(cold), batch):
                part = cold[start:start + batch]
                with store.model_lock:
                    kvs = store.runner.encode([np.frombuffer(b.token_ids, dtype="<i4").tolist() for b in part], batch)
                full = False
                with store.blob_lock:
                    blob_gc_lock(s, exclusive=False)
                    warmed = 0
                    for block, kv in zip(part, kvs, strict=True):
                        data = encode_block(kv, row.model_fingerprint, row.codec)
                        full = (row.budget_bytes is not None and used + len(data) > row.budget_bytes) or (
                            room_blocks is not None and done + warmed >= room_blocks)
                        if full:
                            break
                        block.blob_id, block.stored_bytes, block.codec = store.blobs.put(data), len(data), row.codec
                        block.kv_summary = store.summaries.build(kv, row.model_fingerprint)
                        used += len(data)
                        warmed += 1
                    s.execute(update(BankRow).where(BankRow.id == row.id).values(
                        reencodes=BankRow.reencodes + warmed))
                    s.commit()
                done += warmed
                if full:
                    break
            return done

    def _merge(self, bank: str) -> int:
        """Point each warm block at the blob of the oldest block with identical token ids (dedup; see
        :mod:`kvstore.memory.dedup`): the answers stay exactly what each block's own tokens give."""
        store = self.store
        with store.sessions() as s, store.blob_lock:
            row = store.bank_row(s, bank)
            blocks = s.scalars(select(BlockRow).where(
                BlockRow.bank_id == row.id, BlockRow.status == "live", BlockRow.blob_id.is_not(None))).all()
            pairs = plan_dedup(blocks)
            freed = {share_blob(keep, dup) for keep, dup in pairs}
            if pairs:
                row.merges += len(pairs)
                s.commit()
                store.drop_unreferenced(s, freed)
            return len(pairs)

    def _repair_merges(self, bank: str) -> int:
        """Re-encode, from its own text, every block of a bank the old near-duplicate merge touched (flagged by
        migration 0010): its stored token ids and KV were another block's. Returns how many were repaired."""
        store = self.store
        with store.sessions() as s:
            row = store.bank_row(s, bank)
            if not row.merge_repair or row.model_fingerprint != store.llm.fingerprint:
                return 0  # another model's bank: rebinding it to this model re-tokenizes every block anyway
            wrong = misattributed(s.scalars(select(BlockRow).where(BlockRow.bank_id == row.id)).all(),
                                  store.runner.tokenize)
            batch = store.settings.encode_batch_size
            with store.blob_lock:
                blob_gc_lock(s, exclusive=False)  # the re-encoded blobs are referenced when this commits
                old_blobs = set()
                for start in range(0, len(wrong), batch):
                    part = wrong[start:start + batch]
                    with store.model_lock:
                        kvs = store.runner.encode([m.token_ids for m in part], batch)
                    for fix, kv in zip(part, kvs, strict=True):
                        block, data = fix.block, encode_block(kv, row.model_fingerprint, row.codec)
                        old_blobs.add(block.blob_id)
                        block.token_ids = ids_bytes(fix.token_ids)
                        block.token_count = len(fix.token_ids)
                        block.raw_bytes = len(fix.token_ids) * store.runner.bytes_per_token_fp16
                        block.blob_id, block.stored_bytes, block.codec = store.blobs.put(data), len(data), row.codec
                        block.kv_summary = store.summaries.build(kv, row.model_fingerprint)
                        block.merged_into = None
                row.merge_repair = False
                s.commit()
                store.drop_unreferenced(s, old_blobs)
            if wrong:
                log.warning("bank %s: re-encoded %d blocks that near-duplicate merging had pointed at another "
                            "block's KV", bank, len(wrong))
            return len(wrong)

    def collect_orphans(self) -> int:
        """Delete blobs no block of any bank references, older than the grace period (an ingest writes its blobs
        before its catalog transaction). Safe with several writer processes: the listing and the references are
        read under the collection lock (replication.blob_gc_lock), which a transaction about to reference a
        blob holds shared from its (re)put of that blob to its commit."""
        store = self.store
        cutoff = time.time() - self.config.orphan_grace_s
        removed = 0
        with store.sessions() as s, store.blob_lock:
            blob_gc_lock(s, exclusive=True)
            old = list(store.blobs.ids_older_than(cutoff))
            referenced = set(s.scalars(select(BlockRow.blob_id).where(BlockRow.blob_id.is_not(None)).distinct()))
            for blob_id in old:
                if blob_id in referenced:
                    continue
                store.blobs.delete(blob_id)
                store.hot.discard_everywhere(blob_id)
                removed += 1
            s.commit()
        return removed

    def sources(self, block_id: int) -> list[int]:
        """Every block that serves the KV of ``block_id`` (itself and the duplicates merged into it)."""
        with self.store.sessions() as s:
            return [block_id, *s.scalars(select(BlockRow.id).where(BlockRow.merged_into == block_id).order_by(
                BlockRow.id))]
