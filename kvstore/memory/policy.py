"""Which warm blocks go cold first: the eviction policies, the budget they enforce, and the access record they
read (recency, heat, attention importance), plus expiry.

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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import torch
from sqlalchemy import and_, select, update
from sqlalchemy.orm import Session

from kvstore.storage.catalog import BankRow, BlockRow, DocumentRow

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


# -- expiry ---------------------------------------------------------------------------------------


def expired_block_ids(s: Session, bank_id: int, now: datetime) -> list[int]:
    """Blocks of documents past their ``expires_at``: never served, removed by maintenance."""
    return list(s.scalars(select(BlockRow.id).join(DocumentRow, DocumentRow.id == BlockRow.document_id).where(
        and_(DocumentRow.bank_id == bank_id, DocumentRow.expires_at.is_not(None), DocumentRow.expires_at <= now))))


def expired_doc_ids(s: Session, bank_id: int, now: datetime) -> list[str]:
    return list(s.scalars(select(DocumentRow.doc_id).where(
        DocumentRow.bank_id == bank_id, DocumentRow.expires_at.is_not(None), DocumentRow.expires_at <= now)))
