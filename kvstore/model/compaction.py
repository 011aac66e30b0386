"""Attention-matching compaction of assembled KV (Latent Briefing).

When the retrieved context is large, most of its tokens get almost no attention from the task. The
question is run once over the assembled cache while a scoring attention function records how much
attention its tokens pay each cached token (softmax of q.k with the model's own mask and scaling, in
every layer). Compaction ranks a token by the most attention any head pays it from any question token,
averaged over the layers after the first two (:func:`compaction_scores`); the importance record and
session briefs use the mean over heads and question tokens. One keep-mask, shared by every head and layer,
keeps the context tokens scoring above ``median + tau * MAD`` (or the ``budget_tokens`` best), always
with the prefix and the first context tokens (attention sinks). The kept rows stay rotated at their
original positions and the question is prefilled at the original next position, so RoPE distances are
those of the uncompacted context. (Sliding-window layers measure their window in cache rows, so after
compaction they see somewhat further back than before.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kvstore.model.attention_bias import causal_seen, layer_mask, masked_sdpa
from kvstore.model.compat import with_cache
from kvstore.model.forward import attention_implementation
from kvstore.model.runner import Runner
from kvstore.types import Context

SCORING_ATTENTION = "kvrag_scoring"
KEEP_FIRST = 4  # context tokens always kept: the first tokens after the prefix act as attention sinks
# Compaction scores skip the first layers: their attention is mostly positional (recent tokens, sinks), and
# on SmolLM2 at k = 5 dropping their vote kept the gold answer's NLL closest to uncompacted kv.
COMPACTION_SKIP_LAYERS = 2
# Compaction keeps spans, not scattered tokens: a token scores the mean of its aligned chunk of this many
# context tokens. An answer is a contiguous span, and its words need their neighbours to read as one.
COMPACTION_CHUNK = 8

# How one layer's attention probabilities [heads, question tokens, keys] become one score per key:
# "mean" over heads and question tokens (a key's share of the question's attention), or "peak", the most
# any head pays it from any question token (a key one head relies on counts even if the others ignore it).
Reduction = Literal["mean", "peak"]

# How a session brief spends its budget: "segments" keeps whole segments by attention density, then the best
# chunks; "tokens" keeps the best-scoring positions one by one (the first tokens and segment starts always).
Selection = Literal["segments", "tokens"]
SELECTIONS: tuple[Selection, ...] = ("segments", "tokens")


@dataclass
class _Record:
    """One layer's attention inputs: query ``[batch, q_heads, tokens, dim]``, key ``[batch, kv_heads, keys, dim]``,
    mask bool ``[batch or 1, 1, tokens, keys]`` or None."""

    query: torch.Tensor
    key: torch.Tensor
    mask: torch.Tensor | None
    scaling: float | None
    softcap: float | None
    reduction: Reduction

    def reduce(self, reduction: Reduction | None = None) -> torch.Tensor:
        """Attention per key row of a batch of one: ``[keys]`` (by ``reduction``, else the recorded one)."""
        return _attention_mass(self.query, self.key, self.mask, self.scaling, self.softcap,
                               reduction or self.reduction)

    def reduce_row(self, row: int, tokens: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Attention per key of one row of a padded batch, over its real ``tokens`` and ``keys`` (column
        indices): ``[len(keys)]``, what that row alone would have recorded."""
        mask = None
        if self.mask is not None:
            mask = self.mask[min(row, self.mask.shape[0] - 1)][:, tokens][:, :, keys][None]
        return _attention_mass(self.query[row:row + 1, :, tokens], self.key[row:row + 1, :, keys], mask,
                               self.scaling, self.softcap, self.reduction)


@dataclass
class _Collector:
    """Per-layer attention records of the forwards run while scoring is on, at most ``limit`` of them.

    A record keeps references to the layer's query and key and is reduced only when ``scores()`` is called,
    so recording during an answer's prefill adds nothing before the first token.
    """

    reduction: Reduction
    limit: int | None = None
    records: list[_Record] = field(default_factory=list)

    def add(self, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scaling: float | None,
            softcap: float | None) -> None:
        if self.limit is None or len(self.records) < self.limit:
            self.records.append(_Record(query, key, mask, scaling, softcap, self.reduction))

    def scores(self) -> list[torch.Tensor]:
        """Attention per key row, one ``[keys]`` tensor per recorded layer."""
        return [record.reduce() for record in self.records]


_active: ContextVar[_Collector | None] = ContextVar("kvrag_attention_collector", default=None)


@dataclass(frozen=True)
class CompactionSpec:
    """What to keep: tokens above ``median + tau * MAD``, at most ``budget_tokens`` of them (either or both)."""

    tau: float | None = None
    budget_tokens: int | None = None

    @classmethod
    def parse(cls, spec: dict[str, object]) -> CompactionSpec:
        """From the query API's ``{"tau": float}`` / ``{"budget_tokens": int}``; ValueError when malformed."""
        unknown = set(spec) - {"tau", "budget_tokens"}
        if unknown:
            raise ValueError(f"unknown compaction keys: {sorted(unknown)}")
        tau, budget = spec.get("tau"), spec.get("budget_tokens")
        if tau is None and budget is None:
            raise ValueError("compaction needs 'tau' or 'budget_tokens'")
        if tau is not None and (isinstance(tau, bool) or not isinstance(tau, int | float)):
            raise ValueError("compaction tau must be a number")
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 0):
            raise ValueError("compaction budget_tokens must be a non-negative integer")
        return cls(tau=float(tau) if tau is not None else None, budget_tokens=budget)


def _attention_mass(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None,
                    scaling: float | None, softcap: float | None, reduction: Reduction = "mean") -> torch.Tensor:
    """Attention each key row gets, ``[keys]``: averaged over query heads and tokens (sums to 1), or the
    largest over them (``reduction="peak"``).

    query ``[1, q_heads, tokens, dim]``, key ``[1, kv_heads, keys, dim]``, mask ``[1, 1, tokens, keys]``, bool or
    additive float (a :mod:`kvstore.model.attention_bias` bias in it), or None (then causal, aligned to the end).
    """
    _, q_heads, tokens, dim = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    q = query.float().reshape(1, kv_heads, q_heads // kv_heads, tokens, dim)  # grouped-query heads share a key
    logits = torch.einsum("bhgtd,bhkd->bhgtk", q, key.float()) * (scaling if scaling is not None else dim ** -0.5)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if mask is None:
        mask = causal_seen(tokens, keys, query.device)
    if mask.dtype == torch.bool:
        logits = logits.masked_fill(~mask.reshape(1, 1, 1, tokens, keys), float("-inf"))
    else:
        logits = logits + mask.reshape(1, 1, 1, tokens, keys).float()
    probs = logits.softmax(-1)  # [1, kv_heads, group, tokens, keys]
    return probs.amax(dim=(0, 1, 2, 3)) if reduction == "peak" else probs.mean(dim=(0, 1, 2, 3))


def _scoring_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, scaling: float | None = None,
                       key_bias: torch.Tensor | None = None, key_bias_scale: torch.Tensor | None = None,
                       **kwargs: object) -> tuple[torch.Tensor, None]:
    """sdpa attention (with a :mod:`kvstore.model.attention_bias` bias, when given) that also records the attention
    mass per key row into the active collector."""
    attention_mask = layer_mask(module, attention_mask, query, key, key_bias, key_bias_scale)
    collector = _active.get()
    if collector is not None:
        softcap = kwargs.get("softcap")
        collector.add(query, key, attention_mask, scaling, float(softcap) if isinstance(softcap, int | float)
                      and softcap else None)
    kwargs.pop("softcap", None)
    return masked_sdpa(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


AttentionInterface.register(SCORING_ATTENTION, _scoring_attention)
AttentionMaskInterface.register(SCORING_ATTENTION, sdpa_mask)


@contextmanager
def _scoring(runner: Runner, reduction: Reduction = "mean", limit: int | None = None) -> Iterator[_Collector]:
    """Switch the model to the scoring attention; yields the collector of the per-layer records."""
    collector = _Collector(reduction, limit)
    token = _active.set(collector)
    try:
        with attention_implementation(runner, SCORING_ATTENTION):
            yield collector
    finally:
        _active.reset(token)


@torch.inference_mode()
def question_votes(runner: Runner, ctx: Context, question_ids: Sequence[int]
                   ) -> Callable[[Reduction, int], torch.Tensor]:
    """One question pass over ``ctx``, its attention reduced on demand: ``votes(reduction, skip_layers)`` is
    :func:`token_scores`'s result, and several reductions cost one forward.

    The question's own KV, appended during the pass, is dropped again: ``ctx`` is left as it was.
    """
    rows = ctx.cache.get_seq_length()
    device = ctx.cache.layers[0].keys.device
    positions = torch.arange(ctx.next_position, ctx.next_position + len(question_ids), device=device)
    decoder: Callable[..., object] = runner.model.get_decoder()
    with _scoring(runner) as collector:
        # The decoder alone: only the attention is wanted, the LM head over the vocabulary would be wasted.
        decoder(input_ids=torch.tensor([list(question_ids)], device=device), position_ids=positions[None],
                **with_cache(decoder, ctx.cache), use_cache=True)
    for layer in ctx.cache.layers:
        layer.keys, layer.values = layer.keys[:, :, :rows], layer.values[:, :, :rows]

    @torch.inference_mode()
    def votes(reduction: Reduction, skip_layers: int) -> torch.Tensor:
        return _context_votes([r.reduce(reduction) for r in collector.records], rows, ctx.context_tokens,
                              skip_layers)

    return votes


def token_scores(runner: Runner, ctx: Context, question_ids: Sequence[int], reduction: Reduction = "mean",
                 skip_layers: int = 0) -> torch.Tensor:
    """Attention the question pays each context token (``reduction`` over heads and question tokens), mean
    over the layers after the first ``skip_layers`` (at least the last layer votes): ``[context_tokens]``.
    ``ctx`` is left as it was."""
    return question_votes(runner, ctx, question_ids)(reduction, skip_layers)


def _context_votes(per_layer: Sequence[torch.Tensor], rows: int, context_tokens: int,
                   skip_layers: int = 0) -> torch.Tensor:
    """Per-layer ``[keys]`` scores cut to the context rows and averaged over the voting layers:
    ``[context_tokens]``. Sliding-window layers attend only their window, so every layer is one equal vote."""
    first = rows - context_tokens
    voting = per_layer[min(skip_layers, len(per_layer) - 1):]
    return torch.stack([s[first:rows] for s in voting]).mean(0)


@contextmanager
def prefill_attention(runner: Runner, ctx: Context) -> Iterator[Callable[[], torch.Tensor | None]]:
    """Record, during the next forward over ``ctx`` (the answer's prefill), the attention the prefilled tokens
    pay each context token, like :func:`token_scores` with its defaults but without a second question pass.

    Yields a getter: ``[context_tokens]`` once a forward has run inside the block, else None (nothing was
    generated). Only the first forward's layers are recorded, and they are reduced when the getter is called,
    after the answer: the first token waits for nothing.
    """
    rows, layers = ctx.cache.get_seq_length(), len(ctx.cache.layers)
    with _scoring(runner, "mean", limit=layers) as collector:
        yield lambda: (_context_votes(collector.scores(), rows, ctx.context_tokens)
                       if len(collector.records) == layers else None)


@contextmanager
def batch_prefill_attention(runner: Runner) -> Iterator[Callable[[int, torch.Tensor, torch.Tensor, int, int],
                                                                   torch.Tensor | None]]:
    """:func:`prefill_attention` for the next forward over a padded batch (:mod:`kvstore.model.batching`).

    Yields a getter ``(row, tokens, keys, rows, context_tokens) -> [context_tokens]``: that row's votes, from
    its real question ``tokens`` and cache ``keys`` (column indices; ``rows`` of its keys precede the
    question, the last ``context_tokens`` of them are its context), or None when no forward ran.
    """
    layers = runner.num_layers
    with _scoring(runner, "mean", limit=layers) as collector:
        def votes(row: int, tokens: torch.Tensor, keys: torch.Tensor, rows: int,
                  context_tokens: int) -> torch.Tensor | None:
            if len(collector.records) != layers:
                return None
            return _context_votes([r.reduce_row(row, tokens, keys) for r in collector.records], rows, context_tokens)

        yield votes


def chunk_means(scores: torch.Tensor, chunk: int) -> torch.Tensor:
    """Each token's score replaced by the mean of its aligned chunk of ``chunk`` tokens: ``[tokens]``."""
    n = scores.shape[0]
    padded = torch.cat((scores, scores.new_zeros(-n % chunk)))
    counts = torch.cat((scores.new_ones(n), scores.new_zeros(-n % chunk))).reshape(-1, chunk).sum(1)
    means = padded.reshape(-1, chunk).sum(1) / counts  # the last chunk may be short: mean over its real tokens
    return means.repeat_interleave(chunk)[:n]


def compaction_scores(runner: Runner, ctx: Context, question_ids: Sequence[int]) -> torch.Tensor:
    """What compaction ranks context tokens by: the peak attention any head pays each token from any question
    token, mean over the layers after the first ``COMPACTION_SKIP_LAYERS``, averaged over aligned chunks of
    ``COMPACTION_CHUNK`` tokens. ``[context_tokens]``.

    Why the peak and chunks: a token one head reads from one question position is averaged away by a mean
    over heads and question tokens, and answers are spans, so whole chunks keep them together; each lost
    less gold-answer likelihood than the token-by-token mean (docs/research/recompute.md).
    """
    peak = token_scores(runner, ctx, question_ids, reduction="peak", skip_layers=COMPACTION_SKIP_LAYERS)
    return chunk_means(peak, COMPACTION_CHUNK)


def keep_mask(scores: torch.Tensor, spec: CompactionSpec, keep_first: int = KEEP_FIRST,
              always: torch.Tensor | None = None) -> torch.Tensor:
    """Bool ``[context_tokens]``: the first ``keep_first`` tokens and the ``always`` ones (indices, e.g.
    segment boundaries), the tokens above ``median + tau * MAD`` (all, when no tau), then the best by score,
    at most ``budget_tokens`` in all (the forced tokens count within the budget)."""
    n = scores.shape[0]
    keep = torch.ones(n, dtype=torch.bool, device=scores.device)
    if spec.tau is not None:
        median = scores.median()
        mad = (scores - median).abs().median()
        keep = scores > median + spec.tau * mad
    first = min(keep_first, n, spec.budget_tokens if spec.budget_tokens is not None else n)
    keep[:first] = True
    if always is not None:
        keep[always] = True
    if spec.budget_tokens is not None and int(keep.sum()) > spec.budget_tokens:
        ranked = torch.where(keep, scores, torch.tensor(float("-inf"), device=scores.device))
        if always is not None:
            ranked[always] = float("inf")
        ranked[:first] = float("inf")
        keep = torch.zeros_like(keep)
        keep[ranked.topk(spec.budget_tokens).indices] = True
    return keep


def segment_keep_mask(scores: torch.Tensor, spans: Sequence[tuple[int, int]], budget_tokens: int,
                      keep_first: int = KEEP_FIRST, chunk: int = COMPACTION_CHUNK) -> torch.Tensor:
    """Bool ``[tokens]`` with at most ``budget_tokens`` True: the first ``keep_first`` tokens and each
    segment's first token, then whole segments in order of attention density (the mean score of their
    tokens, those forced ones counted as 0) while each still fits, then the best ``chunk``-token chunk means
    in what is left. ``scores: [tokens]``; spans are (first row, tokens) per segment.

    A passage a worker needs is read as a whole: its answer span keeps the sentences around it, where
    keeping scattered high-attention tokens would cut them apart.
    """
    n = scores.shape[0]
    keep = torch.zeros(n, dtype=torch.bool, device=scores.device)
    forced = list(dict.fromkeys([*range(min(keep_first, n)), *(a for a, t in spans if t)]))[:max(budget_tokens, 0)]
    keep[forced] = True
    unforced = scores.masked_fill(keep, 0.0)
    density = [float(unforced[a:a + t].mean()) if t else float("-inf") for a, t in spans]
    for i in sorted(range(len(spans)), key=lambda j: -density[j]):
        a, t = spans[i]
        if t and int(keep.sum()) + int((~keep[a:a + t]).sum()) <= budget_tokens:
            keep[a:a + t] = True
    left = min(budget_tokens - int(keep.sum()), int((~keep).sum()))
    if left > 0:
        ranked = chunk_means(scores, chunk).masked_fill(keep, float("-inf"))
        keep[ranked.topk(left).indices] = True
    return keep


@torch.inference_mode()
def compact(runner: Runner, ctx: Context, question_ids: Sequence[int], spec: CompactionSpec) -> Context:
    """A context holding the prefix and only the context tokens the question attends to.

    Positions are kept: ``next_position`` is unchanged, so the question is prefilled where it would be
    without compaction. ``context_tokens`` of the result is the number of kept tokens.
    """
    n = ctx.context_tokens
    if n == 0:
        return ctx
    keep = keep_mask(compaction_scores(runner, ctx, question_ids), spec)
    first = ctx.cache.get_seq_length() - n
    device = keep.device
    rows = torch.cat((torch.arange(first, device=device), keep.nonzero().flatten() + first))
    for layer in ctx.cache.layers:
        layer.keys, layer.values = layer.keys.index_select(2, rows), layer.values.index_select(2, rows)
    bias = ctx.bias.index_select(0, rows) if ctx.bias is not None else None
    exact = ctx.exact.index_select(1, rows) if ctx.exact is not None else None
    return Context(ctx.cache, ctx.next_position, int(keep.sum()), bias, exact)
