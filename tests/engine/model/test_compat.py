"""The engine hands the KV cache to the model the way the installed transformers asks (issue 32: the deprecated
``past_key_values`` keyword warned 572 times in one test run and goes away in transformers 5.40)."""

from __future__ import annotations

import inspect
import warnings

import pytest

from kvstore.model.batching import BatchRequest, answer_batch
from kvstore.model.compaction import token_scores
from kvstore.model.compat import NEW, OLD, cache_keyword
from kvstore.model.recompute import blend
from kvstore.model.runner import Runner
from tests.conftest import TINY_FAMILIES, build_tiny


def _deprecations(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if "past_key_values" in str(w.message)]


@pytest.mark.parametrize("kind", sorted(TINY_FAMILIES))
def test_keyword_is_the_one_the_forward_declares(kind: str) -> None:
    llm = build_tiny(kind, **TINY_FAMILIES[kind])
    for module in (llm.model, llm.model.get_decoder()):
        declared = inspect.signature(type(module).forward).parameters
        assert cache_keyword(module) == (NEW if NEW in declared else OLD)
        assert cache_keyword(module) in declared


@pytest.mark.parametrize("kind", sorted(TINY_FAMILIES))
def test_engine_forwards_warn_no_past_key_values_deprecation(kind: str) -> None:
    """Prefix, encode, assemble, question prefill, decode, a padded batch, attention scoring and recompute: every
    forward the query path runs, with every warning recorded."""
    runner = Runner(build_tiny(kind, **TINY_FAMILIES[kind]), "You are a helpful assistant.")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runner = Runner(runner.llm, "You are a helpful assistant.")
        blocks = runner.encode([runner.tokenize("Paris is the capital of France."),
                                runner.tokenize("The Seine flows through it.")])
        q = runner.question_ids("What flows through Paris?")
        ctx = runner.assemble(blocks)
        gen = runner.generate(ctx, q, max_new_tokens=3)
        answers = answer_batch(runner, [BatchRequest(blocks, q, 2), BatchRequest(blocks[:1], q[:3], 2)])
        scores = token_scores(runner, runner.assemble(blocks), q)
        recomputed = blend(runner, runner.assemble(blocks), [t for b in ("Paris is the capital of France.",
                                                                        "The Seine flows through it.")
                                                            for t in runner.tokenize(b)], 0.5, question_ids=q)
    assert gen.prefill_ms > 0 and len(answers) == 2
    assert scores.shape[0] == sum(b.tokens for b in blocks) and recomputed > 0
    assert _deprecations(caught) == []
