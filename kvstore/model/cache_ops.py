"""Operations on an assembled context's KV cache that other parts need without handling cache layers themselves."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvstore.model.compaction import token_scores
from kvstore.model.runner import Runner
from kvstore.types import Context


def truncate(ctx: Context, rows: int) -> None:
    """Cut every layer of ``ctx``'s cache back to its first ``rows`` rows, in place."""
    for layer in ctx.cache.layers:
        layer.keys, layer.values = layer.keys[:, :, :rows], layer.values[:, :, :rows]


def context_attention(runner: Runner, ctx: Context, question_ids: Sequence[int]) -> torch.Tensor:
    """The attention ``question_ids`` pay each context token of an answered ``ctx``: ``[context_tokens]``
    (:func:`kvstore.model.compaction.token_scores`). The cache is first cut back to prefix + context: the rows
    the question and the answer added are dropped, so the question is scored once more over the context alone."""
    truncate(ctx, ctx.next_position)
    return token_scores(runner, ctx, question_ids)
