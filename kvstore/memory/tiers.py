"""Memory management: tiers, eviction policies, attention importance, dedup, expiry.

Tiers of a block:

- **hot**: decoded KV in RAM (:class:`~kvstore.memory.hot.HotCache`, per bank, keyed by blob id, LRU under
  ``KVRAG_HOT_TIER_BYTES`` within the process's KV budget, :mod:`kvstore.memory.budget`);
- **warm**: the compressed blob on disk (``BlockRow.blob_id`` set);
- **cold**: text, token ids and embedding only (``blob_id`` None). A query that retrieves a cold
  block prefills its tokens after the shared prefix on the fly, which is exactly how the block was
  encoded at ingest, so the answer does not change, only its latency.

Cold blocks keep ``status == "live"``: they stay searchable and every filter that selects live
blocks keeps working; the tier is told by ``blob_id``.

A bank's warm tier lives within ``budget_bytes`` (bytes of the distinct blobs its blocks reference;
a blob shared with another bank counts in full in each) and ``max_blocks`` (warm blocks). Eviction
moves blocks warm -> cold in the order the bank's policy gives; blocks sharing a blob move together
(only then are the bytes freed); pinned documents never move. Only a delete removes a document.

Policies (higher score = keep): ``lru`` by last touch; ``importance`` by decayed attention
importance plus the writer's importance; ``hybrid`` by heat and importance. Heat is LRFU's combined
recency-frequency value: every access adds 1 and it halves every ``heat_half_life_s``, so a block used
often a while ago outlives a block used once just now (a one-hit scan does not flush the working set,
as it does under LRU), while a block nobody has used for many half-lives fades out. Importance is the
share of the question's attention that landed on a block's tokens, recorded after each kv query and
decayed with a half-life.

This module holds no web imports and no BankStore: the facade calls these functions inside its own
sessions and write order.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from sqlalchemy import and_, case, func, or_, select, update
from sqlalchemy.orm import Session

from kvstore.codec.format import encode_block
from kvstore.memory.dedup import ids_bytes, misattributed, plan_dedup, share_blob
from kvstore.memory.hot import HotCache
from kvstore.sessions.service import sessions_of
from kvstore.storage.catalog import BankRow, BlockRow, DocumentRow, utcnow
from kvstore.storage.replication import blob_gc_lock
from kvstore.types import BlockKV, Context

if TYPE_CHECKING:
    from kvstore.ports import Engine

log = logging.getLogger(__name__)

POLICIES = ("lru", "importance", "hybrid")


@dataclass
class MemoryConfig:
    """Knobs of memory management (one per store; tests and benchmarks adjust them)."""

    importance_half_life_s: float = 7 * 24 * 3600.0
    # Heat (hybrid's recency + frequency): an access a day old counts half. Shorter leans towards LRU,
    # longer towards LFU.
    heat_half_life_s: float = 24 * 3600.0
    hybrid_weights: tuple[float, float] = (0.7, 0.3)  # heat, attention importance (each scaled to [0, 1])
    track_importance: bool = True  # one extra question pass after the answer; never delays the first token
    rewarm_on_access: bool = True  # a cold block a query used goes back to warm (then the budget is enforced)
    orphan_grace_s: float = 3600.0  # unreferenced blobs younger than this may belong to an ingest in flight


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


def as_utc(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes for timezone-aware columns; they were written in UTC."""
    if value is None:
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def decayed(value: float, since: datetime | None, now: datetime, half_life_s: float) -> float:
    """``value`` recorded at ``since``, halved every ``half_life_s`` seconds until ``now``."""
    since = as_utc(since)
    if since is None or value == 0.0:
        return value
    age = max(0.0, (now - since).total_seconds())
    return value * 0.5 ** (age / half_life_s)


# -- policies -------------------------------------------------------------------------------------


@dataclass
class Candidate:
    """A warm block as the evictor sees it."""

    block_id: int
    blob_id: str
    stored_bytes: int
    touched: float  # unix time of the last access, or of creation when never accessed
    access_count: int
    importance: float  # decayed to now
    prior: float  # writer-given importance (0 when none)
    pinned: bool
    heat: float = 0.0  # decayed access frequency, decayed to now


def _rank01(values: Sequence[float]) -> np.ndarray:
    """Ranks scaled to [0, 1] (ties share the lower rank): scale-free, so recency in seconds or days weighs alike."""
    arr = np.asarray(values, dtype=np.float64)
    if len(arr) <= 1:
        return np.ones(len(arr))
    order = np.searchsorted(np.sort(arr), arr, side="left")
    return order / (len(arr) - 1)


def _norm01(values: Sequence[float]) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    top = arr.max() if len(arr) else 0.0
    return arr / top if top > 0 else np.zeros(len(arr))


def policy_scores(policy: str, cands: Sequence[Candidate], cfg: MemoryConfig) -> np.ndarray:
    """Keep-score per candidate under ``policy``: the lowest is evicted first."""
    recency = _rank01([c.touched for c in cands])
    prior = np.asarray([c.prior for c in cands], dtype=np.float64)
    if policy == "lru":
        return np.asarray([c.touched for c in cands], dtype=np.float64)
    if policy == "importance":
        # Recency only breaks ties (e.g. blocks no query has attended to yet).
        return np.asarray([c.importance for c in cands]) + prior + 1e-9 * recency
    if policy == "hybrid":
        # Value per byte kept (GreedyDual-Size-Frequency): the budget is bytes and a hit is a block, so of two
        # equally valued blocks the larger one goes first and the bytes it frees keep more hits. Recency lives
        # in the heat's decay; the rank only orders equals (e.g. blocks never used yet, oldest first).
        w_heat, w_imp = cfg.hybrid_weights
        value = w_heat * _norm01([c.heat for c in cands]) + w_imp * _norm01([c.importance for c in cands])
        nbytes = np.maximum(np.asarray([c.stored_bytes for c in cands], dtype=np.float64), 1.0)
        return value * (nbytes.mean() / nbytes) + prior + 1e-9 * recency
    raise ValueError(f"unknown eviction policy {policy!r}; one of {POLICIES}")


@dataclass
class EvictionPlan:
    """Blocks to move warm -> cold, and the warm tier before and after."""

    block_ids: list[int] = field(default_factory=list)
    blob_ids: set[str] = field(default_factory=set)
    bytes_before: int = 0
    bytes_after: int = 0
    blocks_after: int = 0
    over_budget: bool = False  # pinned blocks alone exceed the budget


def plan_eviction(cands: Sequence[Candidate], policy: str, budget_bytes: int | None, max_blocks: int | None,
                  cfg: MemoryConfig) -> EvictionPlan:
    """Evict whole blob groups (blocks sharing a blob free its bytes only together), weakest first.

    A group is as strong as its strongest member and untouchable if any member is pinned.
    """
    scores = policy_scores(policy, cands, cfg) if cands else np.empty(0)
    groups: dict[str, list[int]] = {}
    for i, c in enumerate(cands):
        groups.setdefault(c.blob_id, []).append(i)
    size = {blob: max(cands[i].stored_bytes for i in members) for blob, members in groups.items()}
    nbytes, nblocks = sum(size.values()), len(cands)
    plan = EvictionPlan(bytes_before=nbytes)

    def over() -> bool:
        return (budget_bytes is not None and nbytes > budget_bytes) or (max_blocks is not None and nblocks > max_blocks)

    evictable = [(max(scores[i] for i in members), blob) for blob, members in groups.items()
                 if not any(cands[i].pinned for i in members)]
    for _, blob in sorted(evictable, key=lambda t: t[0]):
        if not over():
            break
        plan.block_ids += [cands[i].block_id for i in groups[blob]]
        plan.blob_ids.add(blob)
        nbytes -= size[blob]
        nblocks -= len(groups[blob])
    plan.bytes_after, plan.blocks_after, plan.over_budget = nbytes, nblocks, over()
    return plan


def warm_candidates(s: Session, bank_id: int, now: datetime, cfg: MemoryConfig) -> list[Candidate]:
    """Every warm block of a bank with what the policies need."""
    rows = s.execute(select(BlockRow.id, BlockRow.blob_id, BlockRow.stored_bytes, BlockRow.last_access_at,
                            BlockRow.created_at, BlockRow.access_count, BlockRow.importance, BlockRow.heat,
                            DocumentRow.pinned,
                            DocumentRow.importance.label("prior")).join(
        DocumentRow, DocumentRow.id == BlockRow.document_id).where(
        BlockRow.bank_id == bank_id, BlockRow.status == "live", BlockRow.blob_id.is_not(None))).all()
    out = []
    for r in rows:
        touched = as_utc(r.last_access_at) or as_utc(r.created_at) or now
        out.append(Candidate(block_id=r.id, blob_id=r.blob_id, stored_bytes=int(r.stored_bytes),
                             touched=touched.timestamp(), access_count=int(r.access_count),
                             importance=decayed(float(r.importance), r.last_access_at, now,
                                                cfg.importance_half_life_s),
                             prior=float(r.prior or 0.0), pinned=bool(r.pinned),
                             heat=decayed(float(r.heat), r.last_access_at, now, cfg.heat_half_life_s)))
    return out


def evict_to_budget(s: Session, bank: BankRow, cfg: MemoryConfig, now: datetime) -> EvictionPlan:
    """Move the bank's weakest blocks to cold until it is within budget; commits. The caller drops the blobs
    that no block references any more (``plan.blob_ids``) under its blob lock."""
    if bank.budget_bytes is None and bank.max_blocks is None:
        return EvictionPlan()
    plan = plan_eviction(warm_candidates(s, bank.id, now, cfg), bank.eviction, bank.budget_bytes, bank.max_blocks,
                         cfg)
    if plan.block_ids:
        s.execute(update(BlockRow).where(BlockRow.id.in_(plan.block_ids)).values(
            blob_id=None, stored_bytes=0, merged_into=None))
        s.execute(update(BankRow).where(BankRow.id == bank.id).values(
            evictions=BankRow.evictions + len(plan.block_ids)))
        s.commit()
        s.refresh(bank)
    return plan


# -- importance -----------------------------------------------------------------------------------


def block_attention(scores: torch.Tensor, spans: Sequence[int]) -> list[float]:
    """Share of the question's attention on each block, from per-context-token scores; sums to 1."""
    per_block = torch.stack([part.sum() for part in torch.split(scores.float(), list(spans))])
    total = float(per_block.sum())
    return (per_block / total).tolist() if total > 0 else [0.0] * len(spans)


def record_access(s: Session, block_ids: Sequence[int], shares: Sequence[float] | None, now: datetime,
                  cfg: MemoryConfig) -> None:
    """One access to each block a query used: count, heat (decayed to now, plus one), last access time,
    and when the attention was measured, importance (decayed to now, plus this query's share). Both
    decays read the previous access time, which this then moves to ``now``. Does not commit."""
    rows = s.execute(select(BlockRow.id, BlockRow.importance, BlockRow.heat, BlockRow.last_access_at).where(
        BlockRow.id.in_(list(block_ids)))).all()
    share = dict(zip(block_ids, shares, strict=True)) if shares is not None else {}
    for r in rows:
        values: dict[str, Any] = {
            "access_count": BlockRow.access_count + 1, "last_access_at": now,
            "heat": decayed(float(r.heat), r.last_access_at, now, cfg.heat_half_life_s) + 1.0}
        if r.id in share:
            values["importance"] = decayed(float(r.importance), r.last_access_at, now,
                                           cfg.importance_half_life_s) + share[r.id]
        s.execute(update(BlockRow).where(BlockRow.id == r.id).values(**values))


# -- tiers, expiry, garbage -----------------------------------------------------------------------


def cold_key(fingerprint: str, token_ids: bytes) -> str:
    """Hot-tier key of a cold block's on-the-fly KV: by content, so duplicates within a bank share it (the
    hot tier is partitioned by bank, so other banks never do)."""
    return "cold-" + hashlib.sha256(fingerprint.encode() + token_ids).hexdigest()


def tier_stats(s: Session, bank_id: int, hot: HotCache, fingerprint: str) -> dict[str, dict[str, int]]:
    """Blocks and bytes per tier. warm bytes: distinct blobs on disk; hot bytes: decoded KV in RAM;
    cold bytes: what the catalog keeps for them (text, token ids, embedding)."""
    cold = or_(BlockRow.blob_id.is_(None), BlockRow.blob_id == "")
    # Token ids only for cold blocks (their hot-tier key hashes them): a warm block's key is its blob id, and
    # reading every block's ids made this the slowest part of a large bank's stats.
    rows = s.execute(select(BlockRow.blob_id, BlockRow.stored_bytes,
                            case((cold, BlockRow.token_ids), else_=None),
                            func.length(BlockRow.text), func.length(BlockRow.embedding)).where(
        BlockRow.bank_id == bank_id, BlockRow.status == "live")).all()
    warm_bytes: dict[str, int] = {}
    hot_keys: set[str] = set()
    hot_blocks = warm_blocks = cold_blocks = cold_bytes = 0
    for blob_id, stored, token_ids, text_len, emb_len in rows:
        key = blob_id or cold_key(fingerprint, token_ids)
        if hot.contains(bank_id, key):  # this bank's copy only: another bank's use of the text never shows
            hot_blocks += 1
            hot_keys.add(key)
        if blob_id:
            warm_blocks += 1
            warm_bytes[blob_id] = max(warm_bytes.get(blob_id, 0), int(stored))
        else:
            cold_blocks += 1
            cold_bytes += len(token_ids) + int(text_len or 0) + int(emb_len or 0)
    return {"hot": {"blocks": hot_blocks, "bytes": sum(hot.size_of(bank_id, k) for k in hot_keys)},
            "warm": {"blocks": warm_blocks, "bytes": sum(warm_bytes.values())},
            "cold": {"blocks": cold_blocks, "bytes": cold_bytes}}


@dataclass
class BlockInfo:
    """A block as listed: where it lives (tier: hot | warm | cold), its codec, sizes and heat decayed to now."""

    block_id: int
    doc_id: str
    ordinal: int
    tokens: int
    tier: str
    status: str  # live | quarantined
    codec: str
    raw_bytes: int
    stored_bytes: int  # the blob's size (0 for a cold block: no blob)
    heat: float
    access_count: int
    last_access_at: datetime | None
    merged_into: int | None


def block_page(s: Session, bank: BankRow, hot: HotCache, config: MemoryConfig, *, cursor: int | None, limit: int,
               document_pk: int | None = None) -> tuple[list[BlockInfo], int | None]:
    """One page of a bank's blocks (or one document's) in id order, after block id ``cursor``, with the next
    cursor (None on the last page). One query: the page's columns and doc ids, never text or embeddings."""
    q = select(BlockRow.id, DocumentRow.doc_id, BlockRow.ordinal, BlockRow.token_count, BlockRow.blob_id,
               BlockRow.token_ids, BlockRow.status, BlockRow.codec, BlockRow.raw_bytes, BlockRow.stored_bytes,
               BlockRow.heat, BlockRow.access_count, BlockRow.last_access_at, BlockRow.merged_into).join(
        DocumentRow, DocumentRow.id == BlockRow.document_id).where(BlockRow.bank_id == bank.id)
    if document_pk is not None:
        q = q.where(BlockRow.document_id == document_pk)
    if cursor is not None:
        q = q.where(BlockRow.id > cursor)
    rows = s.execute(q.order_by(BlockRow.id).limit(limit + 1)).all()
    now = datetime.now(UTC)
    page = []
    for r in rows[:limit]:
        key = r.blob_id or cold_key(bank.model_fingerprint, r.token_ids)
        tier = "hot" if hot.contains(bank.id, key) else ("warm" if r.blob_id else "cold")
        page.append(BlockInfo(block_id=r.id, doc_id=r.doc_id, ordinal=r.ordinal, tokens=r.token_count, tier=tier,
                              status=r.status, codec=r.codec, raw_bytes=int(r.raw_bytes),
                              stored_bytes=int(r.stored_bytes) if r.blob_id else 0,
                              heat=round(decayed(float(r.heat), r.last_access_at, now, config.heat_half_life_s), 4),
                              access_count=int(r.access_count), last_access_at=as_utc(r.last_access_at),
                              merged_into=r.merged_into))
    return page, (rows[limit - 1].id if len(rows) > limit else None)


def expired_block_ids(s: Session, bank_id: int, now: datetime) -> list[int]:
    """Blocks of documents past their ``expires_at``: never served, removed by maintenance."""
    return list(s.scalars(select(BlockRow.id).join(DocumentRow, DocumentRow.id == BlockRow.document_id).where(
        and_(DocumentRow.bank_id == bank_id, DocumentRow.expires_at.is_not(None), DocumentRow.expires_at <= now))))


def expired_doc_ids(s: Session, bank_id: int, now: datetime) -> list[str]:
    return list(s.scalars(select(DocumentRow.doc_id).where(
        DocumentRow.bank_id == bank_id, DocumentRow.expires_at.is_not(None), DocumentRow.expires_at <= now)))


# -- the manager: what the facade calls -----------------------------------------------------------


class MemoryManager:
    """Tiers, budgets, importance, dedup, expiry, re-encoding and garbage collection of a BankStore.

    It works through the store's own catalog sessions, blob store, hot tier, index and model lock,
    and keeps its write order: blobs first, then one catalog transaction, then derived state.
    """

    def __init__(self, store: Engine, config: MemoryConfig | None = None) -> None:
        self.store = store
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
            from kvstore.model.compaction import token_scores  # the model-side scoring pass lives with compaction

            rows = ctx.next_position  # prefix + blocks: the question and answer rows are dropped
            with self.store.model_lock:
                for layer in ctx.cache.layers:
                    layer.keys, layer.values = layer.keys[:, :, :rows], layer.values[:, :, :rows]
                scores = token_scores(self.store.runner, ctx, question_ids)
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
            report["session_orphan_blobs_removed"] = sessions_of(store).collect_orphans(self.config.orphan_grace_s)
            report["session_pruned_purged"] = sessions_of(store).purge_pruned()  # past the restore retention
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
