"""RoPE handling across model families: exact inversion, single-block fidelity, assembled positions."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from kvstore.codec.format import decode_block, encode_block
from kvstore.model.compat import with_cache
from kvstore.model.runner import Runner
from tests.conftest import TINY_FAMILIES, build_tiny

BLOCK_A = "The Normans were the people who gave their name to Normandy, a region in France."
BLOCK_B = "Paris is the capital and most populous city of France."
QUESTION = "Who were the Normans?"


@pytest.fixture(scope="module", params=list(TINY_FAMILIES))
def runner(request: pytest.FixtureRequest) -> Runner:
    return Runner(build_tiny(request.param, **TINY_FAMILIES[request.param]), "You are a helpful assistant.")


@torch.inference_mode()
def _text_logits(runner: Runner, ids: list[int], last: int) -> torch.Tensor:
    """Ground truth: one plain forward over the whole sequence, no cache tricks."""
    out = runner.model(input_ids=torch.tensor([ids]), **with_cache(runner.model, DynamicCache()))
    return out.logits[0, -last:].float()


def test_unrotate_then_rotate_elsewhere_equals_key_computed_there(runner: Runner) -> None:
    ids = runner.tokenize(BLOCK_A)
    p = len(runner.prefix_ids)
    k_pre = runner.encode([ids])[0].k  # un-rotated from positions p..
    shift = 37
    moved = runner.rope.rotate(k_pre, torch.arange(p + shift, p + shift + len(ids)))
    # Prefix and block prefilled together with every position shifted: attention sees the same relative
    # positions, so each layer's keys are the same vectors rotated to the new positions.
    cache = DynamicCache()
    seq = runner.prefix_ids + ids
    with torch.inference_mode():
        runner.model(input_ids=torch.tensor([seq]), position_ids=torch.arange(shift, shift + len(seq))[None],
                     **with_cache(runner.model, cache))
    direct = torch.stack([cache.layers[i].keys[0, :, p:] for i in range(runner.num_layers)])
    assert torch.allclose(moved, direct, atol=1e-5), (moved - direct).abs().max()


def test_single_block_kv_logits_match_text(runner: Runner) -> None:
    block = runner.tokenize(BLOCK_A)
    question = runner.question_ids(QUESTION)
    kv = runner.logits(runner.assemble(runner.encode([block])), question)
    text = _text_logits(runner, runner.prefix_ids + block + question, len(question))
    assert (kv - text).abs().max().item() <= 1e-4


def test_single_block_through_fp16_codec_has_tiny_kl(runner: Runner) -> None:
    block = runner.tokenize(BLOCK_A)
    question = runner.question_ids(QUESTION)
    stored = encode_block(runner.encode([block])[0], runner.llm.fingerprint, "fp16")
    kv = runner.logits(runner.assemble([decode_block(stored, runner.llm.fingerprint)]), question)
    text = _text_logits(runner, runner.prefix_ids + block + question, len(question))
    kl = torch.nn.functional.kl_div(kv.log_softmax(-1), text.log_softmax(-1), log_target=True, reduction="none")
    assert kl.sum(-1).mean().item() <= 1e-4


def test_two_blocks_get_the_positions_a_text_prefill_gives(runner: Runner) -> None:
    a, b = runner.tokenize(BLOCK_A), runner.tokenize(BLOCK_B)
    blocks = runner.encode([a, b])
    ctx = runner.assemble(blocks)
    p = len(runner.prefix_ids)
    assert ctx.next_position == p + len(a) + len(b)
    assert ctx.context_tokens == len(a) + len(b)
    k_ctx = torch.stack([ctx.cache.layers[i].keys[0] for i in range(runner.num_layers)])
    # Block B's keys must sit at positions p+len(a).., exactly where a text prefill would put them.
    expect_b = runner.rope.rotate(blocks[1].k, torch.arange(p + len(a), p + len(a) + len(b)))
    assert torch.allclose(k_ctx[:, :, p + len(a):], expect_b, atol=1e-6)
    # And prefix + B prefilled with positions shifted by len(a) yields those same keys for B.
    cache = DynamicCache()
    seq = runner.prefix_ids + b
    with torch.inference_mode():
        runner.model(input_ids=torch.tensor([seq]), position_ids=torch.arange(len(a), len(a) + len(seq))[None],
                     **with_cache(runner.model, cache))
    direct_b = torch.stack([cache.layers[i].keys[0, :, p:] for i in range(runner.num_layers)])
    assert torch.allclose(k_ctx[:, :, p + len(a):], direct_b, atol=1e-5)


def test_batched_encode_equals_one_by_one(runner: Runner) -> None:
    a, b = runner.tokenize(BLOCK_A), runner.tokenize(BLOCK_B)
    batched = runner.encode([a, b], batch_size=2)
    single = [runner.encode([x])[0] for x in (a, b)]
    for x, y in zip(batched, single, strict=True):
        assert torch.allclose(x.k, y.k, atol=1e-5) and torch.allclose(x.v, y.v, atol=1e-5)


def test_sliding_window_layers_keep_every_token_of_a_long_block() -> None:
    llm = build_tiny("gemma3_text", **TINY_FAMILIES["gemma3_text"])
    runner = Runner(llm, "You are a helpful assistant.")
    block = runner.tokenize(BLOCK_A + " " + BLOCK_B)
    assert len(block) > 8  # longer than the sliding window
    kv = runner.encode([block])[0]
    assert kv.tokens == len(block)
    question = runner.question_ids(QUESTION)
    got = runner.logits(runner.assemble([kv]), question)
    want = _text_logits(runner, runner.prefix_ids + block + question, len(question))
    assert (got - want).abs().max().item() <= 1e-4
