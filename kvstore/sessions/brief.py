"""Briefs: a worker answers a task from a task-compacted slice of a session's trajectory (Latent Briefing).

The task's tokens are run over the session's KV and every trajectory position is scored by the attention
the task pays it (one shared mask over layers and heads, :mod:`kvstore.model.compaction`). ``budget_tokens``
(or as many as score above ``median + tau * MAD``) are kept, always with the first tokens and each
segment's first token: by default whole segments in order of density of the peak attention any head pays
them (layers 2+, from the same task pass), then the best chunks in what is left (``selection="tokens"``:
the best positions by the mean attention, one by one). Kept tokens stay at their original positions.
Each brief also records every segment's share of the attention (:mod:`kvstore.sessions.attention`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from sqlalchemy import select
from sqlalchemy.orm import Session

from kvstore.errors import ValidationFailed
from kvstore.model.compaction import (
    COMPACTION_SKIP_LAYERS,
    KEEP_FIRST,
    SELECTIONS,
    CompactionSpec,
    Selection,
    keep_mask,
    question_votes,
    segment_keep_mask,
)
from kvstore.sessions.attention import record_attention
from kvstore.sessions.livekv import LiveStates, SessionKV, concat
from kvstore.sessions.rows import find_session, session_bank
from kvstore.sessions.values import BriefResult, BriefTimings, ms
from kvstore.storage.catalog import BankRow, BlockRow
from kvstore.types import BlockKV, Context

if TYPE_CHECKING:
    from kvstore.ports import Engine
    from kvstore.types import Hit


class Briefer:
    """Briefs over the sessions of one store (reads only, but for the attention record)."""

    def __init__(self, store: Engine, live: LiveStates) -> None:
        self.store, self.live = store, live

    def brief(self, bank: str, session_id: str, task: str, *, budget_tokens: int | None = None,
              tau: float | None = None, selection: Selection = "segments", include_documents: int = 0,
              max_new_tokens: int = 64, on_token: Callable[[str], None] | None = None,
              started_at: float | None = None) -> BriefResult:
        """Answer ``task`` from a task-compacted slice of the session (all of it with neither budget nor tau),
        plus the top ``include_documents`` bank blocks placed after the trajectory. ``selection`` is how the
        kept tokens are chosen (:data:`kvstore.model.compaction.Selection`)."""
        t0 = started_at if started_at is not None else time.perf_counter()
        settings = self.store.settings
        if not isinstance(task, str) or not task.strip():
            raise ValidationFailed("task must be a non-empty string")
        self.store.limits.check_task(task)
        compaction: dict[str, Any] = {k: v for k, v in (("tau", tau), ("budget_tokens", budget_tokens))
                                      if v is not None}
        try:
            spec = CompactionSpec.parse(compaction) if compaction else None
        except ValueError as exc:
            raise ValidationFailed(str(exc)) from None
        if selection not in SELECTIONS:
            raise ValidationFailed(f"selection must be one of {SELECTIONS}")
        if not 0 <= max_new_tokens <= settings.max_new_tokens:
            raise ValidationFailed(f"max_new_tokens must be between 0 and {settings.max_new_tokens}")
        if isinstance(include_documents, bool) or not 0 <= include_documents <= settings.max_k:
            raise ValidationFailed(f"include_documents must be between 0 and {settings.max_k}")
        runner = self.store.runner
        task_ids = runner.question_ids(task)
        with self.store.sessions() as s:
            bank_row = session_bank(s, bank, self.store.llm.fingerprint)
            session = find_session(s, bank_row, session_id)
            state = self.live.load(s, bank_row, session)
            # The documents go after the trajectory: only those that fit the model's positions are read.
            fixed = len(runner.prefix_ids) + session.positions + len(task_ids) + max_new_tokens
            hits, docs = self.documents(s, bank, bank_row, task, include_documents, fixed)
            t_loaded = time.perf_counter()
            with self.store.model_lock:
                ctx, kept, scores = self.compact(state, session.positions, task_ids, spec, docs, selection)
                t_compacted = time.perf_counter()
                gen = runner.generate(ctx, task_ids, max_new_tokens, on_token)
            if scores is not None:
                record_attention(s, state, scores)
        t_end = time.perf_counter()
        timings = BriefTimings(load_ms=ms(t_loaded - t0), compaction_ms=ms(t_compacted - t_loaded),
                               prefill_ms=ms(gen.ttft_s - t_compacted), ttft_ms=ms(gen.ttft_s - t0),
                               total_ms=ms(t_end - t0))
        return BriefResult(answer=gen.text, session_tokens=state.tokens, kept_tokens=kept,
                           document_tokens=docs.tokens if docs is not None else 0, task_tokens=len(task_ids),
                           generated_tokens=len(gen.token_ids), compaction_ms=timings.compaction_ms,
                           timings=timings, sources=hits)

    def briefing_context(self, bank: str, session_id: str, task: str, *, budget_tokens: int | None = None,
                         tau: float | None = None, selection: Selection = "segments") -> tuple[Context, int, int]:
        """The context a brief would answer ``task`` after, with the session's and the kept token counts
        (fidelity measurements: nothing is recorded)."""
        spec = CompactionSpec(tau=tau, budget_tokens=budget_tokens) if tau is not None or budget_tokens is not None \
            else None
        with self.store.sessions() as s:
            bank_row = session_bank(s, bank, self.store.llm.fingerprint)
            session = find_session(s, bank_row, session_id)
            state = self.live.load(s, bank_row, session)
            with self.store.model_lock:
                ctx, kept, _ = self.compact(state, session.positions, self.store.runner.question_ids(task), spec,
                                            None, selection)
        return ctx, state.tokens, kept

    def compact(self, state: SessionKV, next_offset: int, task_ids: Sequence[int], spec: CompactionSpec | None,
                docs: BlockKV | None, selection: Selection = "segments") -> tuple[Context, int, torch.Tensor | None]:
        """(context, kept trajectory tokens, the task's attention per trajectory token or None when empty).

        The task is scored over the whole trajectory; the kept tokens stay at their positions and the
        documents' KV goes after the trajectory, the task after both. Callers hold the model lock.
        """
        ctx = self.live.context(state, next_offset)
        # The task's attention over the trajectory: the compaction signal and the attention prune's record.
        votes = question_votes(self.store.runner, ctx, task_ids) if state.tokens else None
        scores = votes("mean", 0) if votes is not None else None
        if (spec is None or scores is None) and docs is None:
            return ctx, state.tokens, scores
        kept = state
        if spec is not None and votes is not None and scores is not None:
            boundaries = torch.tensor([a for a, t in state.spans if t], dtype=torch.long, device=scores.device)
            keep = keep_mask(scores, spec, KEEP_FIRST, always=boundaries)
            if selection == "segments":
                # The token rule (tau and/or budget) says how many tokens to keep; segments spend them, ranked
                # by the peak attention any head pays them (the mean stays the prune's record).
                peak = votes("peak", COMPACTION_SKIP_LAYERS)
                keep = segment_keep_mask(peak, state.spans, int(keep.sum()))
            kept = SessionKV(segment_ids=state.segment_ids, positions=state.positions[keep], spans=[],
                             kv=BlockKV(k=state.kv.k[:, :, keep], v=state.kv.v[:, :, keep]))
        if docs is None:
            return self.live.context(kept, next_offset), kept.tokens, scores
        doc_positions = torch.arange(next_offset, next_offset + docs.tokens, device=state.positions.device)
        return self.live.context(kept, next_offset + docs.tokens, docs, doc_positions), kept.tokens, scores

    def documents(self, s: Session, bank: str, bank_row: BankRow, task: str, k: int, fixed_tokens: int = 0
                  ) -> tuple[list[Hit], BlockKV | None]:
        """The top-k bank blocks for the task that fit the model's positions after ``fixed_tokens``, and their KV
        concatenated (None when k is 0 or nothing matched)."""
        if k == 0:
            return [], None
        hits = self.store.search(bank, task, k=k)
        rows = {r.id: r for r in s.scalars(select(BlockRow).where(
            BlockRow.bank_id == bank_row.id, BlockRow.id.in_([h.block_id for h in hits])))}
        hits = [h for h in hits if h.block_id in rows]
        hits = hits[:self.store.limits.blocks_that_fit([rows[h.block_id].token_count for h in hits], fixed_tokens)]
        blocks = [self.store.load_block(s, bank_row, rows[h.block_id]) for h in hits]
        return hits, (concat(self.store.runner, blocks) if blocks else None)
