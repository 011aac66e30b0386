"""A session's live KV: the pre-RoPE keys and values of its unpruned tokens, in order, at their positions.

Kept in memory within the process's KV budget (:mod:`kvstore.memory.budget`); a copy that no longer matches
the catalog's live segments (another process appended, a prune or restore changed them) or that the budget
evicted is decoded from the pages again. Positions never move back, so a pruned segment leaves a gap and the
remaining tokens keep the RoPE distances they were computed with.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from sqlalchemy import select
from sqlalchemy.orm import Session

from kvstore.codec.format import decode_block
from kvstore.errors import CorruptBlock
from kvstore.memory.budget import KVBudget
from kvstore.model.runner import Runner
from kvstore.sessions.rows import segments_of
from kvstore.storage.blobstore import BlobStore
from kvstore.storage.catalog import BankRow
from kvstore.storage.session_tables import AgentSessionRow, SessionPageRow
from kvstore.types import BlockKV, Context

STATE_KIND = "sessions"  # the live states' share of the process's KV budget


@dataclass
class SessionKV:
    """The live KV of a session: pre-RoPE keys and values of the unpruned tokens, in order."""

    segment_ids: tuple[int, ...]  # live segment row ids (validates a cached state against the catalog)
    kv: BlockKV  # [layers, kv_heads, tokens, head_dim]
    positions: torch.Tensor  # [tokens] positions after the shared prefix
    spans: list[tuple[int, int]]  # per live segment: (first row in kv, tokens)

    @property
    def tokens(self) -> int:
        return self.kv.tokens

    @property
    def nbytes(self) -> int:
        return self.kv.nbytes + self.positions.numel() * self.positions.element_size()


def concat(runner: Runner, parts: Sequence[BlockKV]) -> BlockKV:
    """The parts one after another along the tokens, fp32 on the model's device."""
    device = runner.llm.device
    if not parts:
        empty = torch.zeros(runner.num_layers, runner.kv_heads, 0, runner.head_dim, device=device)
        return BlockKV(k=empty, v=empty.clone())
    return BlockKV(k=torch.cat([p.k.to(device, torch.float32) for p in parts], dim=2),
                   v=torch.cat([p.v.to(device, torch.float32) for p in parts], dim=2))


def grown(runner: Runner, state: SessionKV, segment_ids: Sequence[int], pages: Sequence[BlockKV],
          token_counts: Sequence[int], base: int) -> SessionKV:
    """``state`` with appended segments after it: their row ids, their KV ``pages`` in order, their lengths,
    the first at position ``base``."""
    spans = list(state.spans)
    for n in token_counts:
        spans.append((spans[-1][0] + spans[-1][1] if spans else 0, n))
    end = base + sum(token_counts)
    return SessionKV(segment_ids=state.segment_ids + tuple(segment_ids), kv=concat(runner, [state.kv, *pages]),
                     positions=torch.cat((state.positions, torch.arange(base, end, device=state.positions.device))),
                     spans=spans)


class LiveStates:
    """The live KV of the sessions of one store: remembered within the KV budget, else read from the pages."""

    def __init__(self, runner: Runner, blobs: BlobStore, memory: KVBudget) -> None:
        self.runner, self.blobs, self.memory = runner, blobs, memory

    def forget(self, bank_id: int, session_pk: int) -> None:
        self.memory.discard(bank_id, STATE_KIND, session_pk)

    def remember(self, bank_id: int, session_pk: int, state: SessionKV) -> None:
        """Keep the state within the KV budget; evicted, it is decoded from the blobs again when next used."""
        self.memory.put(bank_id, STATE_KIND, session_pk, state)

    def load(self, s: Session, bank: BankRow, session: AgentSessionRow) -> SessionKV:
        """The live KV: the in-memory copy when it matches the catalog's live segments, else from the blobs."""
        live = segments_of(s, session, live_only=True)
        ids = tuple(g.id for g in live)
        cached = self.memory.get(bank.id, STATE_KIND, session.id)
        if isinstance(cached, SessionKV) and cached.segment_ids == ids:
            return cached
        pages = s.scalars(select(SessionPageRow).where(SessionPageRow.segment_pk.in_(ids)).order_by(
            SessionPageRow.segment_pk, SessionPageRow.ordinal)).all() if ids else []
        by_segment: dict[int, list[SessionPageRow]] = {}
        for page in pages:
            by_segment.setdefault(page.segment_pk, []).append(page)
        parts: list[BlockKV] = []
        positions: list[torch.Tensor] = []
        spans: list[tuple[int, int]] = []
        row = 0
        device = self.runner.llm.device
        for g in live:
            segment_pages = by_segment.get(g.id, [])
            if sum(p.token_count for p in segment_pages) != g.token_count:
                raise CorruptBlock(f"session {session.session_id!r} segment {g.ordinal} has missing KV pages")
            parts.extend(decode_block(self.blobs.get(p.blob_id), bank.model_fingerprint) for p in segment_pages)
            positions.append(torch.arange(g.start, g.start + g.token_count, device=device))
            spans.append((row, g.token_count))
            row += g.token_count
        state = SessionKV(segment_ids=ids, kv=concat(self.runner, parts),
                          positions=torch.cat(positions) if positions else torch.zeros(0, dtype=torch.long,
                                                                                       device=device),
                          spans=spans)
        self.remember(bank.id, session.id, state)
        return state

    def context(self, state: SessionKV, next_offset: int, extra: BlockKV | None = None,
                extra_positions: torch.Tensor | None = None) -> Context:
        """The prefix, the state's KV at its positions (and ``extra`` after it), next token at ``next_offset``."""
        p = len(self.runner.prefix_ids)
        kv, positions = state.kv, state.positions
        if extra is not None and extra_positions is not None:
            kv, positions = concat(self.runner, [kv, extra]), torch.cat((positions, extra_positions))
        return self.runner.context_at(kv, positions + p, p + next_offset)
