"""How a planned query is answered: one function per strategy (:data:`kvstore.query.plan.Strategy`).

Each takes the plan and the loaded KV of its blocks, runs the model (no catalog session is open), and returns
the answer with the token counts and the attention share of each context for the importance policies.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Protocol

import torch

from kvstore.memory.policy import MemoryConfig
from kvstore.model.batching import BatchRequest, QuestionBatcher
from kvstore.model.compaction import compact, prefill_attention
from kvstore.model.recompute import blend, blend_and_ask
from kvstore.model.runner import Generation, Runner
from kvstore.query.plan import QueryPlan, Strategy
from kvstore.types import BlockKV, Context


class ShareTracker(Protocol):
    """The importance bookkeeping of :class:`kvstore.memory.tiers.MemoryManager`."""

    config: MemoryConfig

    def attention_shares(self, ctx: Context, question_ids: Sequence[int], kvs: Sequence[BlockKV],
                         recorded: Callable[[], torch.Tensor | None] | None = None) -> list[float] | None: ...

    def block_shares(self, votes: torch.Tensor | None, kvs: Sequence[BlockKV]) -> list[float] | None: ...


@dataclass
class Model:
    """What the strategies run on: the runner under its lock, the batcher, and the importance tracker."""

    runner: Runner
    lock: threading.Lock
    batcher: QuestionBatcher
    shares: ShareTracker


@dataclass
class Answered:
    generation: Generation
    context_tokens: int  # context tokens after the prefix, as assembled
    kept_tokens: int  # of those, kept after compaction
    recomputed_tokens: int
    shares: list[float] | None  # the question's attention share per context (map first), or None


def answer_batched(model: Model, plan: QueryPlan, blocks: list[BlockKV], t_loaded: float) -> Answered:
    """The plain kv path: stored KV after the prefix, the question prefilled, in a batch with the others."""
    contexts = plan.lead + blocks
    track = model.shares.config.track_importance
    answer = model.batcher.answer(BatchRequest(contexts, plan.question_ids, plan.options.max_new_tokens,
                                               plan.options.on_token, record=track))
    return Answered(answer.generation, answer.context_tokens, answer.context_tokens, 0,
                    model.shares.block_shares(answer.votes(), contexts))


def answer_recompute(model: Model, plan: QueryPlan, blocks: list[BlockKV], t_loaded: float) -> Answered:
    """Several contexts, partly recomputed with attention over the whole context, the question riding along
    the recompute's passes instead of a prefill of its own; the attention that chose the tokens is the
    importance the policies record."""
    contexts, q_ids = plan.lead + blocks, plan.question_ids
    with model.lock:
        ctx = model.runner.assemble(contexts)
        context_tokens = ctx.context_tokens
        # Of several contexts, the first one is still exact (it was encoded right after the prefix).
        asked = blend_and_ask(model.runner, ctx, plan.context_ids(), q_ids, plan.options.ratio,
                              exact_tokens=contexts[0].tokens)
        gen = model.runner.decode(ctx, asked.logits, ctx.next_position + len(q_ids), plan.options.max_new_tokens,
                                  plan.options.on_token, started=t_loaded)
    shares = model.shares.attention_shares(ctx, q_ids, contexts, lambda: asked.attention)
    return Answered(gen, context_tokens, ctx.context_tokens, asked.recomputed, shares)


def answer_assembled(model: Model, plan: QueryPlan, blocks: list[BlockKV], t_loaded: float) -> Answered:
    """One context on its own: assembled, partly recomputed when the ratio asks for it and there are several
    contexts, compacted when asked, then the question prefilled and the answer decoded."""
    contexts, q_ids, options = plan.lead + blocks, plan.question_ids, plan.options
    with model.lock:
        ctx = model.runner.assemble(contexts)
        context_tokens = ctx.context_tokens
        blended = options.ratio > 0 and len(contexts) > 1
        recomputed = (blend(model.runner, ctx, plan.context_ids(), options.ratio, question_ids=q_ids,
                            exact_tokens=contexts[0].tokens) if blended else 0)
        if options.compaction is not None:
            ctx = compact(model.runner, ctx, q_ids, options.compaction)
        # The answer's prefill records the attention the importance policies need, so no second question pass
        # runs after the answer.
        recorder = (prefill_attention(model.runner, ctx) if model.shares.config.track_importance
                    else nullcontext(lambda: None))
        with recorder as recorded:
            gen = model.runner.generate(ctx, q_ids, options.max_new_tokens, options.on_token)
    shares = model.shares.attention_shares(ctx, q_ids, contexts, recorded)
    return Answered(gen, context_tokens, ctx.context_tokens, recomputed, shares)


def answer_text(model: Model, plan: QueryPlan, blocks: list[BlockKV], t_loaded: float) -> Answered:
    """The baseline: the blocks' text prefilled with the question. The map sits right after the prefix,
    where its cached KV is exact: a serving engine would cache it with the prefix, so this reuses it too."""
    block_ids = plan.block_token_ids()
    room = len(block_ids) + len(plan.question_ids) + max(0, plan.options.max_new_tokens)  # as kv mode's assembly
    with model.lock:
        ctx = model.runner.assemble(plan.lead, room) if plan.lead else model.runner.text_context(room)
        gen = model.runner.generate(ctx, block_ids + plan.question_ids, plan.options.max_new_tokens,
                                    plan.options.on_token)
    tokens = len(plan.lead_ids) + len(block_ids)
    return Answered(gen, tokens, tokens, 0, None)


Answer = Callable[[Model, QueryPlan, list[BlockKV], float], Answered]
STRATEGIES: dict[Strategy, Answer] = {
    "batched": answer_batched, "recompute": answer_recompute, "assembled": answer_assembled, "text": answer_text,
}
