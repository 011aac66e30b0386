"""The parallel-encoding logit bias: on every assembled block but the first, for the queries after the context, on
every path a question takes (prefill, decode, teacher forcing, a batch, a recompute's passes, a compaction), and for
the context tokens a recompute runs again."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import replace

import pytest
import torch

from kvstore.bank import BankStore
from kvstore.model import attention_bias, recompute
from kvstore.model.attention_bias import BlockBias, biased_mask, layer_mask
from kvstore.model.batching import BatchRequest, answer_alone, answer_batch
from kvstore.model.compaction import CompactionSpec, compact, prefill_attention
from kvstore.model.loader import LoadedModel
from kvstore.model.recompute import blend, blend_and_ask
from kvstore.model.runner import Runner
from tests.conftest import TINY_FAMILIES, build_tiny

BLOCKS = (
    "The Normans were the people who gave their name to Normandy, a region in France.",
    "Paris is the capital and most populous city of France. The Seine flows through it.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
)
QUESTION = "Who were the Normans?"
PROMPT = "You are a helpful assistant."


@pytest.fixture(scope="module", params=list(TINY_FAMILIES))
def family(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# The same bias on every layer, and one that is three times as strong from the second layer on: each path a
# question takes must hand the per-layer factor to every attention it runs.
PROFILES = {"flat": BlockBias(-0.7), "deeper": BlockBias(-0.7, ((1, 3.0),))}


@pytest.fixture(scope="module", params=list(PROFILES))
def pair(family: str, request: pytest.FixtureRequest) -> tuple[Runner, Runner]:
    """Two runners on two copies of one tiny model (the bias switches its model's attention): unbiased, biased."""
    plain, biased = build_tiny(family), build_tiny(family)
    return Runner(plain, PROMPT), Runner(biased, PROMPT, block_bias=PROFILES[request.param])


def _blocks(runner: Runner) -> tuple[list[list[int]], list[int]]:
    return [runner.tokenize(b) for b in BLOCKS], runner.question_ids(QUESTION)


def test_mask_adds_the_bias_to_every_kind_of_mask() -> None:
    query, key = torch.zeros(1, 2, 3, 4), torch.zeros(1, 1, 6, 4)
    bias = torch.tensor([[0.0, 0.0, -1.0, -1.0]])  # four rows; the two after them get none
    causal = biased_mask(None, query, key, bias)
    assert causal.shape == (1, 1, 3, 6)
    assert causal[0, 0, 0, 3] == -1.0 and causal[0, 0, 0, 1] == 0.0 and causal[0, 0, 2, 4] == 0.0
    assert causal[0, 0, 0, 5] < -1e30 and causal[0, 0, 2, 5] == 0.0  # the first query does not see the last key
    allowed = torch.ones(1, 1, 3, 6, dtype=torch.bool)
    allowed[..., 1] = False
    from_bool = biased_mask(allowed, query, key, bias)
    assert from_bool[0, 0, 0, 1] < -1e30 and from_bool[0, 0, 0, 2] == -1.0
    additive = torch.full((1, 1, 3, 6), 0.5)
    assert torch.equal(biased_mask(additive, query, key, bias)[0, 0, 0], torch.tensor([0.5, 0.5, -0.5, -0.5, 0.5, 0.5]))


def test_each_layer_adds_its_factor_of_the_bias() -> None:
    query, key = torch.zeros(1, 2, 3, 4), torch.zeros(1, 1, 4, 4)
    bias, scale = torch.tensor([[0.0, -1.0, -1.0, 0.0]]), torch.tensor([1.0, 1.0, 2.5])
    deep, shallow = torch.nn.Module(), torch.nn.Module()
    deep.layer_idx, shallow.layer_idx = 2, 0
    additive = torch.zeros(1, 1, 3, 4)
    assert torch.equal(layer_mask(deep, additive, query, key, bias, scale)[0, 0, 0], torch.tensor([0, -2.5, -2.5, 0]))
    assert torch.equal(layer_mask(shallow, additive, query, key, bias, scale), biased_mask(additive, query, key, bias))
    assert torch.equal(layer_mask(deep, additive, query, key, bias, None), biased_mask(additive, query, key, bias))
    assert layer_mask(deep, additive, query, key, None, scale) is additive


def test_a_factor_per_layer_and_row_scales_each_row_on_its_own() -> None:
    query, key = torch.zeros(1, 2, 3, 4), torch.zeros(1, 1, 4, 4)
    bias = torch.tensor([[0.0, -1.0, -1.0, 0.0]])
    scale = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 0.0, 1.0]])  # [layers, rows]: row 2 off on layer 1
    second = torch.nn.Module()
    second.layer_idx = 1
    additive = torch.zeros(1, 1, 3, 4)
    assert torch.equal(layer_mask(second, additive, query, key, bias, scale)[0, 0, 0], torch.tensor([0, -2.0, 0, 0]))
    assert torch.equal(layer_mask(second, additive, query, key, bias, scale)[0, 0, :, 1], torch.full((3,), -2.0))


def test_a_profile_gives_its_factor_per_layer() -> None:
    assert BlockBias(-0.5, ((1, 1.5), (3, 2.0))).layer_factors(5) == [1.0, 1.5, 1.5, 2.0, 2.0]
    assert BlockBias(-0.5).layer_factors(3) == [1.0, 1.0, 1.0]
    assert BlockBias(-0.5, ((8, 2.0),)).layer_factors(4) == [1.0] * 4


def test_a_uniform_factor_equals_that_bias_on_every_layer(family: str) -> None:
    scaled = Runner(build_tiny(family), PROMPT, block_bias=BlockBias(-0.35, ((0, 2.0),)))
    flat = Runner(build_tiny(family), PROMPT, block_bias=-0.7)
    blocks, question = _blocks(flat)
    assert scaled.bias_scale is not None and flat.bias_scale is None
    torch.testing.assert_close(scaled.logits(scaled.assemble(scaled.encode(blocks)), question),
                               flat.logits(flat.assemble(flat.encode(blocks)), question))


def test_only_the_blocks_after_the_first_are_biased(pair: tuple[Runner, Runner]) -> None:
    plain, biased = pair
    blocks, question = _blocks(biased)
    assert biased.block_bias == -0.7 and plain.block_bias == 0.0
    alone = biased.assemble(biased.encode(blocks[:1]))
    assert alone.bias is None  # one block sits where it was encoded: exact, nothing to correct
    torch.testing.assert_close(biased.logits(alone, question), plain.logits(plain.assemble(plain.encode(blocks[:1])),
                                                                            question))
    ctx = biased.assemble(biased.encode(blocks))
    p, first = len(biased.prefix_ids), len(blocks[0])
    assert ctx.bias is not None and ctx.bias.shape == (ctx.cache.get_seq_length(),)
    assert bool((ctx.bias[:p + first] == 0).all()) and bool((ctx.bias[p + first:] == -0.7).all())
    unbiased = plain.logits(plain.assemble(plain.encode(blocks)), question)
    assert not torch.allclose(biased.logits(ctx, question), unbiased, atol=1e-4)


def test_a_large_bias_hides_the_later_blocks(family: str) -> None:
    """At -50 the question sees, in effect, the prefix and the first block alone at the same positions."""
    runner = Runner(build_tiny(family), PROMPT, block_bias=-50.0)
    blocks, question = _blocks(runner)
    kvs = runner.encode(blocks)
    ctx = runner.assemble(kvs)
    p = len(runner.prefix_ids)
    first_only = runner.context_at(kvs[0], torch.arange(p, p + len(blocks[0])), ctx.next_position)
    torch.testing.assert_close(runner.logits(ctx, question), runner.logits(first_only, question), atol=1e-4, rtol=1e-4)


def test_decoding_keeps_the_bias(pair: tuple[Runner, Runner]) -> None:
    """Each decoded token attends with the bias: the answer's logits, teacher forced, are what decoding saw."""
    _, biased = pair
    blocks, question = _blocks(biased)
    kvs = biased.encode(blocks)
    gen = biased.generate(biased.assemble(kvs), question, 5)
    forced = biased.logits(biased.assemble(kvs), question + gen.token_ids)
    assert forced[len(question) - 1:].argmax(-1).tolist()[:len(gen.token_ids)] == gen.token_ids


def test_batched_rows_equal_their_queries_alone(pair: tuple[Runner, Runner]) -> None:
    _, biased = pair
    blocks, question = _blocks(biased)
    kvs = biased.encode(blocks)
    requests = [BatchRequest(kvs, question, 5, record=True), BatchRequest(kvs[1:], question, 5),
                BatchRequest(kvs[:1], question, 5)]
    batched = answer_batch(biased, requests)
    for request, got in zip(requests, batched, strict=True):
        alone = answer_alone(biased, request)
        assert got.generation.token_ids == alone.generation.token_ids
    votes, alone_votes = batched[0].votes(), answer_alone(biased, requests[0]).votes()
    assert votes is not None and alone_votes is not None
    torch.testing.assert_close(votes, alone_votes, atol=1e-5, rtol=1e-4)


def test_recording_the_attention_keeps_the_bias(pair: tuple[Runner, Runner]) -> None:
    _, biased = pair
    blocks, question = _blocks(biased)
    kvs = biased.encode(blocks)
    want = biased.generate(biased.assemble(kvs), question, 5).token_ids
    ctx = biased.assemble(kvs)
    with prefill_attention(biased, ctx) as recorded:
        assert biased.generate(ctx, question, 5).token_ids == want
    scores = recorded()
    assert scores is not None and scores.shape == (ctx.context_tokens,)


@pytest.mark.parametrize("ratio", [0.3, 1.0])
def test_the_question_riding_a_recompute_is_biased_as_a_prefill_after_it(pair: tuple[Runner, Runner],
                                                                         ratio: float) -> None:
    _, biased = pair
    blocks, question = _blocks(biased)
    kvs = biased.encode(blocks)
    ids = [t for b in blocks for t in b]
    after = biased.assemble(kvs)
    blend(biased, after, ids, ratio, question_ids=question, exact_tokens=len(blocks[0]))
    want = biased.prefill(after, question)
    ctx = biased.assemble(kvs)
    asked = blend_and_ask(biased, ctx, ids, question, ratio, exact_tokens=len(blocks[0]))
    torch.testing.assert_close(asked.logits, want, rtol=1e-4, atol=1e-4)


def test_ratio_one_under_the_bias_is_the_text_path(pair: tuple[Runner, Runner]) -> None:
    _, biased = pair
    blocks, question = _blocks(biased)
    ids = [t for b in blocks for t in b]
    text = biased.logits(biased.text_context(), ids + question)[-1]
    ctx = biased.assemble(biased.encode(blocks))
    assert blend(biased, ctx, ids, 1.0, question_ids=question, exact_tokens=len(blocks[0])) == len(ids)
    assert ctx.bias is None
    torch.testing.assert_close(biased.logits(ctx, question)[-1], text, rtol=1e-4, atol=1e-4)
    asked = blend_and_ask(biased, biased.assemble(biased.encode(blocks)), ids, question, 1.0)
    torch.testing.assert_close(asked.logits, text, rtol=1e-4, atol=1e-4)


def test_recomputed_rows_lose_the_bias_where_their_kv_is_exact(pair: tuple[Runner, Runner]) -> None:
    _, biased = pair
    blocks, question = _blocks(biased)
    ids = [t for b in blocks for t in b]
    kvs = biased.encode(blocks)
    ctx = biased.assemble(kvs)
    count = blend(biased, ctx, ids, 0.3, question_ids=question, exact_tokens=len(blocks[0]))
    assert ctx.exact is not None and ctx.bias is not None
    assert ctx.exact.shape == (biased.num_layers, ctx.bias.shape[0])
    prefix = len(biased.prefix_ids)
    # Only probed context tokens are marked; the chosen ones at every layer, the others at their probes' layers.
    assert not ctx.exact[:, :prefix + len(blocks[0])].any()
    assert int(ctx.exact.all(dim=0).sum()) == count
    assert bool((ctx.exact.any(dim=0) & ~ctx.exact.all(dim=0)).any())
    assert bool(ctx.exact[0].sum() >= ctx.exact[-1].sum())
    # The marks decide what later queries see: the same KV with every row biased answers differently (each on its
    # own copy of the cache, which a forward extends).
    marked = replace(ctx, cache=copy.deepcopy(ctx.cache))
    still_biased = replace(ctx, cache=copy.deepcopy(ctx.cache), exact=None)
    assert not torch.allclose(biased.logits(marked, question), biased.logits(still_biased, question))


def test_recomputed_tokens_read_the_stale_rows_through_the_bias(pair: tuple[Runner, Runner],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A recomputed token reads stored KV that never saw the blocks before it, as the question does, and gets the
    same bias: the same model recomputing the same tokens writes other KV with the bias than without, and only
    there (the other rows keep what both runners stored)."""
    blocks, question = _blocks(pair[1])
    ids = [t for b in blocks for t in b]
    wanted = torch.tensor([len(ids) - 9, len(ids) - 5, len(ids) - 2])  # in the last block: stale rows before them
    attention = torch.zeros(len(ids))
    attention[wanted] = 1.0  # every other candidate scores 0: both runners choose exactly these
    monkeypatch.setattr(recompute, "token_scores", lambda *args, **kwargs: attention)
    caches = []
    for runner in pair:
        ctx = runner.assemble(runner.encode(blocks))
        assert blend(runner, ctx, ids, 3.5 / len(ids), question_ids=question, exact_tokens=len(blocks[0])) == 3
        caches.append(ctx.cache)
    rows = wanted + len(pair[1].prefix_ids)
    others = torch.ones(caches[0].get_seq_length(), dtype=torch.bool)
    others[rows] = False
    plain, biased = caches[0].layers[-1], caches[1].layers[-1]
    assert not torch.allclose(plain.values[:, :, rows], biased.values[:, :, rows], atol=1e-5)
    torch.testing.assert_close(plain.values[:, :, others], biased.values[:, :, others])
    torch.testing.assert_close(plain.keys[:, :, others], biased.keys[:, :, others])


def test_compaction_keeps_each_row_its_bias(pair: tuple[Runner, Runner]) -> None:
    _, biased = pair
    blocks, question = _blocks(biased)
    ctx = biased.assemble(biased.encode(blocks))
    assert ctx.bias is not None
    full = ctx.bias.clone()
    kept = compact(biased, ctx, question, CompactionSpec(budget_tokens=10))
    assert kept.bias is not None and kept.bias.shape == (kept.cache.get_seq_length(),)
    assert int((kept.bias == -0.7).sum()) <= int((full == -0.7).sum()) and int((kept.bias == 0).sum()) >= len(
        biased.prefix_ids)


def test_compaction_keeps_each_row_its_exact_layers(pair: tuple[Runner, Runner]) -> None:
    _, biased = pair
    blocks, question = _blocks(biased)
    ids = [t for b in blocks for t in b]
    ctx = biased.assemble(biased.encode(blocks))
    blend(biased, ctx, ids, 0.5, question_ids=question, exact_tokens=len(blocks[0]))
    assert ctx.exact is not None and ctx.bias is not None
    before = ctx.exact.clone()
    kept = compact(biased, ctx, question, CompactionSpec(budget_tokens=10))
    assert kept.exact is not None and kept.bias is not None
    assert kept.exact.shape == (biased.num_layers, kept.cache.get_seq_length())
    assert int(kept.exact.sum()) <= int(before.sum()) and not kept.exact[:, :len(biased.prefix_ids)].any()


def test_a_model_without_sdpa_runs_unbiased(family: str) -> None:
    llm = build_tiny(family)
    llm.model.set_attn_implementation("eager")
    runner = Runner(llm, PROMPT, block_bias=-0.5)
    assert runner.block_bias == 0.0 and runner.assemble(runner.encode(_blocks(runner)[0])).bias is None


def test_the_store_takes_the_measured_bias_unless_told(make_store: Callable[..., BankStore], family: str) -> None:
    assert attention_bias.measured_block_bias("SmolLM2-135M-Instruct") == BlockBias(-0.5, ((6, 1.5), (12, 2.0)))
    assert attention_bias.measured_block_bias("tiny-llama") == BlockBias(0.0)
    assert make_store().runner.block_bias == 0.0 and make_store().runner.bias_scale is None
    tiny: LoadedModel = build_tiny(family)
    store = make_store(llm=tiny, block_bias=-0.25)
    assert store.runner.block_bias == -0.25 and store.runner.bias_scale is None  # a value given: every layer
