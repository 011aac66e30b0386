"""Selective recompute of assembled KV (CacheBlend style).

Blocks are encoded one by one after the shared prefix, so a block's tokens never attended to the blocks
placed before it. A text prefill of the same context would give them different KV. Recomputing every
token is exactly a text prefill (and as slow); CacheBlend observes that a few tokens carry most of the
deviation and that an early layer already tells which ones:

0. **Question attention** (when the question is given): the question is run once over the stored KV and
   the attention it pays each context token is recorded (:func:`kvstore.model.compaction.token_scores`, mean over
   heads, question tokens and every layer: half depth ranks worse). A token's stale
   value moves the answer by about its attention times its error, so only the most attended tokens (the
   first ``PROBE_STAGES`` multiple x count) are candidates; the first block (encoded right after the prefix,
   ``exact_tokens``) never is.
1. **Probe**, in stages (``PROBE_STAGES``): the candidates run through the first layers, up to the stage's
   share of the depth, attending to the whole assembled context; their fresh values at that layer are
   compared with the stored ones, the forward stops there and their KV of those layers is kept. The best of
   them by deviation x attention go on from their hidden states to the next stage's deeper check layer. Every
   probed token's first layers become exact, and the deeper check ranks better; narrowing the candidates as
   the probe goes deeper keeps its cost that of one shallower probe of them all.
2. **Recompute**: the ``ratio`` candidates with the largest deviation x attention at the last check layer
   resume from their hidden states through the remaining layers, at their true positions, each attending to
   every context token before it. At each layer their new K/V replace the stored rows before attention, so
   later selected tokens see them; the other tokens keep stored KV.
3. **The question rides along** (:func:`blend_and_ask`): its tokens join every probe stage and the recompute as
   the last rows of each pass. A pass writes a layer's new rows before anything attends, so the question
   sees exactly the blended context, and its logits come out of the recompute's last layer: no question
   prefill of its own after the recompute (one pass over the weights less).

Without a question, every token not known exact enters the first stage and deviation alone ranks.

**The block bias** (:mod:`kvstore.model.attention_bias`) corrects what a query reads from KV that never saw the
blocks before it. A recomputed token reads the stored KV of the tokens before it just as the question does, so every
query of a pass gets the bias, not only the question's: its new KV come closer to a text prefill's. A pass makes its
rows' KV at its layers exactly what a text prefill gives, so from then on those rows get no bias at those layers
(``Context.exact``); with every token recomputed the context is a text prefill's and keeps no bias at all (kept on
recomputed rows, the bias would correct KV that no longer needs it, and the answer would drift away from a text
prefill's the more tokens are recomputed). Each layer is run by one pass only, and a pass marks its rows before
anything attends, so the question riding it sees the bias a prefill after the recompute would.

Every pass is the model's own forward over the assembled cache, writing only the selected rows
(:mod:`kvstore.model.scatter`), so every RoPE decoder transformers implements works.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvstore.model.compaction import token_scores
from kvstore.model.forward import stop_before
from kvstore.model.runner import Runner
from kvstore.model.scatter import ScatterCache, run_rows
from kvstore.types import Context

# Off by default: on CPU even a small ratio costs most of kv mode's time-to-first-token lead over text mode, so a
# query opts in; CUDA keeps the same default until it is measured.
DEFAULT_RATIO_CPU = 0.0
DEFAULT_RATIO_CUDA = 0.0


@dataclass(frozen=True)
class Stage:
    """One probe pass: ``multiple`` x count candidates run up to ``depth`` of the layers (the check layer is
    ``round(depth * (layers - 1))``); the next stage, or the recompute, keeps the best of them."""

    depth: float
    multiple: float


# The question's most attended 2 x count tokens are probed through the first 7% of the layers, the best 1.5 x
# count of them go on to 31% of the depth, and the best count of those resume through the rest.
PROBE_STAGES = (Stage(0.07, 2.0), Stage(0.31, 1.5))


def default_ratio(device: torch.device | str) -> float:
    """The recompute ratio kv mode uses when a query does not say: chosen per device by measurement."""
    return DEFAULT_RATIO_CUDA if torch.device(device).type == "cuda" else DEFAULT_RATIO_CPU


@dataclass
class _Probe:
    """What a probe pass learned about the tokens it ran: their deviation at the check layer and, when layers
    follow it, their hidden states entering the next layer (where a later pass over them resumes); when the pass
    ran every layer with a question riding along, the logits after the question."""

    deviation: torch.Tensor  # [probed] squared value deviation at the check layer
    hidden: torch.Tensor | None  # [probed, hidden_size] entering layer check_layer + 1
    logits: torch.Tensor | None = None  # [vocab]


def _mark_exact(runner: Runner, ctx: Context, rows: torch.Tensor, first: int, last: int) -> None:
    """Record in ``ctx.exact`` that a pass is about to make the KV of cache ``rows`` at layers ``first..last`` a text
    prefill's: the block bias is off there from now on (rows past the context, the question's, carry none)."""
    if ctx.bias is None:
        return
    if ctx.exact is None:
        ctx.exact = torch.zeros(runner.num_layers, ctx.bias.shape[0], dtype=torch.bool, device=ctx.bias.device)
    ctx.exact[first:last + 1, rows[rows < ctx.bias.shape[0]]] = True


def _probe(runner: Runner, ctx: Context, rows: torch.Tensor, inputs: torch.Tensor, check_layer: int,
           start: int = 0, logits: bool = False) -> _Probe:
    """Run the tokens at cache ``rows: [probed]`` (ascending) through layers ``start..check_layer``, attending to
    the whole assembled context, write their new KV for those layers into ``ctx`` and stop. ``inputs`` are their
    token ids ``[probed]`` when ``start`` is 0, else their hidden states entering layer ``start``."""
    cache = ScatterCache(ctx, rows, probe_layer=check_layer)
    _mark_exact(runner, ctx, rows, start, check_layer)
    with stop_before(runner, check_layer + 1) as entered:
        out = run_rows(runner, cache, rows, inputs, start=start, logits=logits, biased=ctx)
    assert cache.deviation is not None
    return _Probe(cache.deviation, entered[0][0] if entered else None, out)


def probe_stages(runner: Runner, stages: Sequence[Stage] = PROBE_STAGES) -> list[tuple[int, float]]:
    """``stages`` as ``(check layer, candidate multiple)`` on ``runner``'s depth, check layers strictly rising (a
    stage that would not go deeper than the one before it is dropped, as on a model of a few layers)."""
    last = runner.num_layers - 1
    out: list[tuple[int, float]] = []
    for stage in stages:
        layer = min(round(stage.depth * last), last)
        if not out or layer > out[-1][0]:
            out.append((layer, stage.multiple))
    return out


@dataclass
class _Question:
    """The question riding along the probe and recompute passes (:func:`blend_and_ask`): its cache rows, right
    after the context, and what the next pass starts it from (token ids, then hidden states)."""

    rows: torch.Tensor  # [question_tokens]
    inputs: torch.Tensor  # [question_tokens] ids, or [question_tokens, hidden_size] entering the next pass

    @classmethod
    def after(cls, ctx: Context, question_ids: Sequence[int]) -> _Question:
        """The question placed after ``ctx``, whose cache gains a row per question token (zero until a pass writes
        it: each pass writes a layer's rows before attending, so no token reads a row not yet written)."""
        rows = ctx.cache.get_seq_length()
        n = len(question_ids)
        for layer in ctx.cache.layers:
            keys, values = layer.keys, layer.values  # [1, kv_heads, rows, head_dim]
            layer.keys = torch.cat((keys, keys.new_zeros(*keys.shape[:2], n, keys.shape[3])), dim=2)
            layer.values = torch.cat((values, values.new_zeros(*values.shape[:2], n, values.shape[3])), dim=2)
        device = ctx.cache.layers[0].keys.device
        return cls(torch.arange(rows, rows + n, device=device), torch.tensor(list(question_ids), device=device))


def _none_asked(device: torch.device) -> _Question:
    return _Question(torch.empty(0, dtype=torch.long, device=device), torch.empty(0, dtype=torch.long, device=device))


@dataclass
class _Selection:
    """The ``count`` chosen context indices (ascending), where the recompute resumes them (and the question),
    and the logits after the question if a probe stage already ran every layer."""

    chosen: torch.Tensor  # [count]
    hidden: torch.Tensor | None  # [count, hidden_size] entering layer ``resume``; None: nothing is left to run
    question: _Question
    logits: torch.Tensor | None = None  # [vocab]


def _select(runner: Runner, ctx: Context, ids: torch.Tensor, count: int, stages: Sequence[tuple[int, float]],
            attention: torch.Tensor | None, exact_tokens: int, question: _Question) -> _Selection:
    """Choose ``count`` context tokens by the probe stages (see :func:`select_tokens`); ``attention: [context]`` is
    the question's, or None to rank by deviation alone. ``question`` rides along every pass (none: no rows)."""
    n = ctx.context_tokens
    p = ctx.next_position - n
    asked = question.rows.numel() > 0
    if attention is not None:
        attention = attention.clone()
        attention[:exact_tokens] = 0.0  # already what a text prefill gives: recomputing them changes nothing
        first = min(n, max(count, round(stages[0][1] * count)))
        candidates = attention.topk(first).indices.sort().values
        weight: torch.Tensor | None = attention[candidates]
    else:
        candidates = torch.arange(exact_tokens if n - exact_tokens >= count else 0, n, device=ids.device)
        weight = None
    inputs, start = ids[candidates], 0
    for i, (layer, _) in enumerate(stages):
        c = len(candidates)
        rows = torch.cat((candidates + p, question.rows))
        probe = _probe(runner, ctx, rows, torch.cat((inputs, question.inputs)), layer, start, logits=asked)
        deviation = probe.deviation[:c]
        # A stale value moves the question's attention output by about (its attention) x (its error), so the
        # product ranks the tokens whose recompute changes the answer most; deviation alone also picks tokens
        # the question never reads. Each stage measures it deeper, on fewer tokens.
        score = deviation if weight is None else deviation * weight.to(deviation)
        keep = count if i + 1 == len(stages) else min(c, max(count, round(stages[i + 1][1] * count)))
        pick = score.topk(keep).indices.sort().values
        candidates, weight = candidates[pick], None if weight is None else weight[pick]
        if probe.hidden is None:  # the stage reached the last layer: nothing is left to run
            return _Selection(candidates, None, question, probe.logits)
        inputs, start = probe.hidden[:c][pick], layer + 1
        question = _Question(question.rows, probe.hidden[c:])
    return _Selection(candidates, inputs, question)


@torch.inference_mode()
def select_tokens(runner: Runner, ctx: Context, context_ids: Sequence[int], count: int,
                  stages: Sequence[Stage] = PROBE_STAGES, question_ids: Sequence[int] | None = None,
                  exact_tokens: int = 0) -> torch.Tensor:
    """Indices (into the context, ascending) of the ``count`` tokens that matter most (see the module doc):
    among the question's most attended tokens, those whose values deviate most at each probe stage's check
    layer, weighted by that attention; without ``question_ids``, by deviation alone, every token entering the
    first stage. The first ``exact_tokens`` context tokens are known exact and not candidates. Each probed
    token's KV is rewritten in ``ctx`` for the layers its stages ran (and its bias dropped there)."""
    device = ctx.cache.layers[0].keys.device
    ids = torch.tensor(list(context_ids), device=device)
    attention = token_scores(runner, ctx, question_ids) if question_ids else None
    return _select(runner, ctx, ids, count, probe_stages(runner, stages), attention, exact_tokens,
                   _none_asked(device)).chosen


@dataclass
class Asked:
    """What :func:`blend_and_ask` leaves besides the blended ``ctx``, whose cache now ends with the question's
    rows (``ctx.next_position`` still counts prefix + context: decoding goes on at ``+ len(question_ids)``)."""

    recomputed: int  # context tokens recomputed through every layer
    logits: torch.Tensor  # [vocab] next-token logits after the question's last token
    attention: torch.Tensor | None  # [context_tokens] the question's attention over the stored KV, when scored


def _count(ctx: Context, context_ids: Sequence[int], ratio: float) -> int:
    if not 0.0 <= ratio <= 1.0:
        raise ValueError("recompute ratio must be between 0 and 1")
    n = ctx.context_tokens
    if len(context_ids) != n:
        raise ValueError(f"context has {n} tokens but {len(context_ids)} ids were given")
    return min(n, max(1, int(ratio * n))) if ratio > 0 and n > 0 else 0


def _blend(runner: Runner, ctx: Context, context_ids: Sequence[int], count: int, stages: Sequence[Stage],
           question_ids: Sequence[int] | None, exact_tokens: int, ask: bool) -> Asked | None:
    """:func:`blend` of ``count`` > 0 tokens; with ``ask`` the question rides along and its logits come back."""
    n = ctx.context_tokens
    p = ctx.next_position - n
    device = ctx.cache.layers[0].keys.device
    ids = torch.tensor(list(context_ids), device=device)
    if count == n:  # everything: the probe would only cost time, and the context becomes a text prefill's
        ctx.bias, ctx.exact = None, None
        question = _Question.after(ctx, question_ids or []) if ask else _none_asked(device)
        rows = torch.cat((torch.arange(n, device=device) + p, question.rows))
        logits = run_rows(runner, ScatterCache(ctx, rows), rows, torch.cat((ids, question.inputs)), logits=ask)
        return Asked(count, logits, None) if logits is not None else None
    layers = probe_stages(runner, stages)
    # Scored on the stored KV, before the probe rewrites any row (and before the question's rows are added).
    attention = token_scores(runner, ctx, question_ids) if question_ids else None
    question = _Question.after(ctx, question_ids or []) if ask else _none_asked(device)
    picked = _select(runner, ctx, ids, count, layers, attention, exact_tokens, question)
    logits = picked.logits
    if picked.hidden is not None:
        # The probes already wrote the chosen tokens' KV up to the last check layer, and their hidden states
        # entering the next layer are what a run from their embeddings would reach there: resume from those.
        rows = torch.cat((picked.chosen + p, picked.question.rows))
        resume = layers[-1][0] + 1
        _mark_exact(runner, ctx, rows, resume, runner.num_layers - 1)
        logits = run_rows(runner, ScatterCache(ctx, rows), rows, torch.cat((picked.hidden, picked.question.inputs)),
                          start=resume, logits=ask, biased=ctx)
    return Asked(count, logits, attention) if logits is not None else None


@torch.inference_mode()
def blend(runner: Runner, ctx: Context, context_ids: Sequence[int], ratio: float,
          stages: Sequence[Stage] = PROBE_STAGES, question_ids: Sequence[int] | None = None,
          exact_tokens: int = 0) -> int:
    """Recompute the KV of the ``ratio`` context tokens that matter most in ``ctx`` (in place).

    ``context_ids`` are the context's token ids (the assembled blocks', in order); ``exact_tokens``, how many of
    the first ones already hold a text prefill's KV (the first block, encoded right after the prefix). With
    ``question_ids`` the selection follows the question's attention (see :func:`select_tokens`). Ratio 0
    leaves ``ctx`` untouched; ratio 1 makes it equal to a text prefill of the same tokens (the block bias goes with
    it; a recomputed row has none at the layers it was recomputed, ``ctx.exact``). Returns how many
    tokens were recomputed through every layer (a selected token's first layers come from the probe).
    """
    count = _count(ctx, context_ids, ratio)
    if count:
        _blend(runner, ctx, context_ids, count, stages, question_ids, exact_tokens, ask=False)
    return count


@torch.inference_mode()
def blend_and_ask(runner: Runner, ctx: Context, context_ids: Sequence[int], question_ids: Sequence[int],
                  ratio: float, stages: Sequence[Stage] = PROBE_STAGES, exact_tokens: int = 0) -> Asked:
    """:func:`blend` with the question prefilled in the same passes: it rides along each probe stage and the
    recompute, where every layer's new context rows are written before it attends, so it sees exactly the
    blended context (as a prefill after :func:`blend` would) without a question pass of its own. ``ctx``'s cache
    gains the question's rows; the answer's first token is ``logits.argmax()`` and decoding continues from there.
    """
    count = _count(ctx, context_ids, ratio)
    asked = _blend(runner, ctx, context_ids, count, stages, question_ids, exact_tokens, ask=True) if count else None
    if asked is None:  # nothing to recompute: a plain prefill of the question
        return Asked(0, runner.prefill(ctx, question_ids), None)
    return asked
