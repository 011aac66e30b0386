"""Room after an assembled context: the question's and the answer's rows are written in place instead of
concatenated onto a copy of the whole context at every forward (issue 33), with the same results."""

from __future__ import annotations

import pytest
import torch

from kvstore.model.cache_ops import truncate
from kvstore.model.runner import Runner
from tests.conftest import TINY_FAMILIES, build_tiny

BLOCKS = ["The Normans gave their name to Normandy.", "Paris is the capital of France.",
          "Photosynthesis converts light energy."]


def _runner(kind: str) -> Runner:
    return Runner(build_tiny(kind, **TINY_FAMILIES[kind]), "You are a helpful assistant.", block_bias=-0.5)


@pytest.mark.parametrize("kind", sorted(TINY_FAMILIES))
def test_answers_with_room_equal_answers_without(kind: str) -> None:
    runner = _runner(kind)
    blocks = runner.encode([runner.tokenize(t) for t in BLOCKS])
    q = runner.question_ids("Who gave their name to Normandy?")
    plain = runner.generate(runner.assemble(blocks), q, max_new_tokens=6)
    ctx = runner.assemble(blocks, room=len(q) + 6)
    buffer = ctx.cache.layers[0].keys.data_ptr()
    roomy = runner.generate(ctx, q, max_new_tokens=6)
    assert roomy.token_ids == plain.token_ids
    # Every row went into the assembly's own buffer: no forward made a new one.
    assert ctx.cache.layers[0].keys.data_ptr() == buffer
    # the question, then one row per answer token fed back (all but the last, or all when EOS ended it)
    assert ctx.cache.get_seq_length() - ctx.next_position - len(q) in (len(roomy.token_ids) - 1, len(roomy.token_ids))
    torch.testing.assert_close(runner.prefill(runner.assemble(blocks, room=len(q)), q),
                               runner.prefill(runner.assemble(blocks), q), rtol=0, atol=0)


def test_text_mode_with_room_equals_text_mode_without() -> None:
    runner = _runner("llama")
    ids = runner.tokenize(" ".join(BLOCKS)) + runner.question_ids("Where is Paris?")
    torch.testing.assert_close(runner.prefill(runner.text_context(room=len(ids)), ids),
                               runner.prefill(runner.text_context(), ids), rtol=0, atol=0)


def test_rows_handed_out_never_change_after_the_cache_is_cut_back() -> None:
    """Attention records keep the keys a forward saw; once the cache is cut back (or compacted) and a new pass
    appends, it must append to a fresh tensor, not over the rows those records still hold."""
    runner = _runner("llama")
    blocks = runner.encode([runner.tokenize(t) for t in BLOCKS])
    q = runner.question_ids("Who gave their name to Normandy?")
    ctx = runner.assemble(blocks, room=2 * len(q))
    runner.prefill(ctx, q)
    seen = ctx.cache.layers[0].keys  # what a record of that forward holds
    before = seen.clone()
    truncate(ctx, ctx.next_position)
    runner.prefill(ctx, runner.question_ids("Which region is named after them?"))
    torch.testing.assert_close(seen, before, rtol=0, atol=0)
    assert ctx.cache.layers[0].keys.data_ptr() != seen.data_ptr()


def test_a_full_room_falls_back_to_concatenation() -> None:
    runner = _runner("llama")
    blocks = runner.encode([runner.tokenize(t) for t in BLOCKS])
    q = runner.question_ids("Who gave their name to Normandy?")
    plain = runner.generate(runner.assemble(blocks), q, max_new_tokens=5)
    short = runner.generate(runner.assemble(blocks, room=len(q) + 1), q, max_new_tokens=5)  # room for 1 answer row
    assert short.token_ids == plain.token_ids
