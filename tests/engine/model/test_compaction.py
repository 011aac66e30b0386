"""Attention-matching compaction: scores are the question's attention, the prefix and question survive,
budgets hold, positions are kept."""

from __future__ import annotations

import pytest
import torch

from kvstore.model.compaction import (
    COMPACTION_CHUNK,
    COMPACTION_SKIP_LAYERS,
    KEEP_FIRST,
    CompactionSpec,
    chunk_means,
    compact,
    compaction_scores,
    keep_mask,
    prefill_attention,
    segment_keep_mask,
    token_scores,
)
from kvstore.model.compat import with_cache
from kvstore.model.runner import Runner
from kvstore.types import BlockKV, Context
from tests.conftest import TINY_FAMILIES, build_tiny

BLOCKS = (
    "The Normans were the people who gave their name to Normandy, a region in France.",
    "Paris is the capital and most populous city of France. The Seine flows through it.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
)
QUESTION = "Who were the Normans?"


@pytest.fixture(scope="module", params=list(TINY_FAMILIES))
def runner(request: pytest.FixtureRequest) -> Runner:
    return Runner(build_tiny(request.param, **TINY_FAMILIES[request.param]), "You are a helpful assistant.")


_ENCODED: dict[int, list[BlockKV]] = {}


def _assembled(runner: Runner) -> Context:
    """A fresh assembled context (compaction edits it in place); blocks are encoded once per runner."""
    if id(runner) not in _ENCODED:
        _ENCODED[id(runner)] = runner.encode([runner.tokenize(b) for b in BLOCKS])
    return runner.assemble(_ENCODED[id(runner)])


def test_scores_are_the_attention_eager_attention_reports() -> None:
    llm = build_tiny("llama")
    runner = Runner(llm, "You are a helpful assistant.")
    question = runner.question_ids(QUESTION)
    ctx = _assembled(runner)
    rows, n = ctx.cache.get_seq_length(), ctx.context_tokens
    got = token_scores(runner, ctx, question)
    peak = compaction_scores(runner, ctx, question)
    assert ctx.cache.get_seq_length() == rows  # the question's KV is dropped again
    llm.model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            out = llm.model(input_ids=torch.tensor([question]), **with_cache(llm.model, ctx.cache),
                            output_attentions=True,
                            position_ids=torch.arange(ctx.next_position, ctx.next_position + len(question))[None])
    finally:
        llm.model.set_attn_implementation("sdpa")
    # attentions: per layer [1, heads, question, rows + question]
    want = torch.stack([a[0].mean(dim=(0, 1)) for a in out.attentions]).mean(0)[rows - n:rows]
    assert torch.allclose(got, want, atol=1e-5)
    # Compaction's score: the most any head pays a token from any question token, layers after the first ones,
    # then averaged over aligned chunks.
    voting = out.attentions[min(COMPACTION_SKIP_LAYERS, len(out.attentions) - 1):]
    want_peak = torch.stack([a[0].amax(dim=(0, 1)) for a in voting]).mean(0)[rows - n:rows]
    assert torch.allclose(peak, chunk_means(want_peak, COMPACTION_CHUNK), atol=1e-5)
    assert not torch.allclose(peak, got, atol=1e-3)


def test_chunk_means_average_aligned_chunks_and_a_short_last_one() -> None:
    scores = torch.tensor([1.0, 3.0, 0.0, 0.0, 5.0])
    assert chunk_means(scores, 2).tolist() == [2.0, 2.0, 0.0, 0.0, 5.0]
    assert chunk_means(scores, 1).tolist() == scores.tolist()
    assert torch.allclose(chunk_means(scores, 8), torch.full((5,), 1.8))


def test_scoring_leaves_the_model_as_it_was(runner: Runner) -> None:
    impl = runner.model.config._attn_implementation
    question = runner.question_ids(QUESTION)
    before = runner.logits(_assembled(runner), question)
    compact(runner, _assembled(runner), question, CompactionSpec(tau=0.0))
    assert runner.model.config._attn_implementation == impl
    assert torch.equal(runner.logits(_assembled(runner), question), before)


def test_the_answers_prefill_records_what_a_second_question_pass_scores(runner: Runner) -> None:
    question = runner.question_ids(QUESTION)
    second_pass = token_scores(runner, _assembled(runner), question)
    ctx = _assembled(runner)
    plain = runner.generate(_assembled(runner), question, max_new_tokens=3)
    with prefill_attention(runner, ctx) as recorded:
        assert recorded() is None  # nothing has run yet
        answer = runner.generate(ctx, question, max_new_tokens=3)
    got = recorded()
    assert got is not None and got.shape == (ctx.context_tokens,)
    assert torch.allclose(got, second_pass, atol=1e-5)
    assert answer.token_ids == plain.token_ids  # recording does not change what the model computes


@pytest.mark.parametrize("spec", [CompactionSpec(tau=0.0), CompactionSpec(tau=2.0), CompactionSpec(budget_tokens=10),
                                  CompactionSpec(tau=-5.0, budget_tokens=2)])
def test_compaction_keeps_prefix_and_positions_and_respects_the_budget(runner: Runner, spec: CompactionSpec) -> None:
    question = runner.question_ids(QUESTION)
    full = _assembled(runner)
    prefix = len(runner.prefix_ids)
    keys = torch.stack([layer.keys for layer in full.cache.layers])  # [layers, 1, heads, rows, dim]
    values = torch.stack([layer.values for layer in full.cache.layers])
    out = compact(runner, _assembled(runner), question, spec)
    kept = out.context_tokens
    assert out.next_position == full.next_position
    assert out.cache.get_seq_length() == prefix + kept
    if spec.budget_tokens is not None:
        assert kept <= spec.budget_tokens
    assert kept >= min(KEEP_FIRST, spec.budget_tokens or KEEP_FIRST)
    got_k = torch.stack([layer.keys for layer in out.cache.layers])
    got_v = torch.stack([layer.values for layer in out.cache.layers])
    # The prefix and the first context tokens are untouched; kept rows are copies of stored rows.
    first = prefix + min(KEEP_FIRST, kept)
    assert torch.equal(got_k[..., :first, :], keys[..., :first, :])
    assert torch.equal(got_v[..., :first, :], values[..., :first, :])
    # The question is then prefilled at its uncompacted positions and yields finite logits.
    assert torch.isfinite(runner.logits(out, question)).all()


def test_a_budget_above_the_context_is_lossless(runner: Runner) -> None:
    question = runner.question_ids(QUESTION)
    want = runner.logits(_assembled(runner), question)
    out = compact(runner, _assembled(runner), question, CompactionSpec(budget_tokens=10_000))
    assert out.context_tokens == _assembled(runner).context_tokens
    assert torch.allclose(runner.logits(out, question), want, atol=1e-5)


def test_keep_mask_threshold_and_budget() -> None:
    scores = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.1, 0.1, 0.1, 0.9, 0.1, 0.8, 0.1, 0.1])
    tau = keep_mask(scores, CompactionSpec(tau=3.0))
    assert tau.tolist() == [True] * 4 + [False] * 3 + [True, False, True, False, False]
    budget = keep_mask(scores, CompactionSpec(budget_tokens=5))
    assert budget.tolist()[:4] == [True] * 4 and budget[7] and int(budget.sum()) == 5
    assert int(keep_mask(scores, CompactionSpec(budget_tokens=0)).sum()) == 0


def test_segment_keep_mask_keeps_dense_segments_whole_then_the_best_chunks() -> None:
    # Four segments: a goal (0-3), a dense passage (4-11), a sparse one (12-19), a note (20-23).
    spans = [(0, 4), (4, 8), (12, 8), (20, 4)]
    scores = torch.full((24,), 0.01)
    scores[5:12] = 0.5
    scores[13:20] = 0.05
    scores[17] = 0.9  # one peak in the sparse passage: tokens would take it, segments read density
    keep = segment_keep_mask(scores, spans, budget_tokens=15, keep_first=4, chunk=4)
    assert int(keep.sum()) == 15
    assert keep[:4].all() and keep[4:12].all() and keep[12] and keep[20]  # sinks, the dense passage whole
    # The one token left fits no segment: it goes to the best chunk (16-19, with the peak).
    assert int(keep[16:20].sum()) == 1 and not keep[13:16].any() and not keep[21:].any()
    for budget in (0, 2, 5, 11, 23, 24, 40):  # the budget binds even below the forced tokens
        got = segment_keep_mask(scores, spans, budget, keep_first=4, chunk=4)
        assert int(got.sum()) == min(budget, 24)
    assert segment_keep_mask(scores, spans, 3, keep_first=4).tolist()[:3] == [True] * 3


@pytest.mark.parametrize("raw", [{}, {"tau": "x"}, {"budget_tokens": -1}, {"budget_tokens": 1.5}, {"other": 1}])
def test_bad_specs_are_refused(raw: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        CompactionSpec.parse(raw)

