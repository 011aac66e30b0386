"""kv mode's masked attention runs over grouped-query heads without copying them (issue 33)."""

from __future__ import annotations

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from kvstore.model.attention_bias import BIASED_SDPA, biased_mask, grouped_sdpa
from kvstore.model.compaction import prefill_attention
from kvstore.model.runner import Runner
from tests.conftest import build_tiny


class _Attention(nn.Module):
    """What transformers' sdpa reads off an attention module."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


def test_grouped_equals_transformers_repeated_heads() -> None:
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 9, 16, 64), torch.randn(1, 3, 300, 64), torch.randn(1, 3, 300, 64)
    mask = biased_mask(None, q, k, torch.linspace(-1, 0, 300)[None])  # causal + a bias, as kv mode's queries see
    want, _ = sdpa_attention_forward(_Attention(3), q, k, v, mask, scaling=0.125)
    got = grouped_sdpa(q, k, v, mask, 0.125)
    assert got.shape == want.shape == (1, 16, 9, 64)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_biased_question_prefill_unchanged_on_a_grouped_model(monkeypatch) -> None:
    llm = build_tiny("llama", num_attention_heads=4, num_key_value_heads=2)
    runner = Runner(llm, "You are a helpful assistant.", block_bias=-0.75)
    assert llm.model.config._attn_implementation == BIASED_SDPA
    blocks = runner.encode([runner.tokenize("Paris is the capital of France."),
                            runner.tokenize("The Seine flows through it.")])
    q = runner.question_ids("What flows through Paris?")
    calls: list[int] = []

    def counted(*args: object) -> torch.Tensor:
        calls.append(1)
        return grouped_sdpa(*args)  # type: ignore[arg-type]

    monkeypatch.setattr("kvstore.model.attention_bias.grouped_sdpa", counted)
    grouped = runner.prefill(runner.assemble(blocks), q)
    assert len(calls) == llm.model.config.num_hidden_layers  # every layer took the grouped path
    monkeypatch.setattr("kvstore.model.attention_bias._plain", lambda kwargs: False)  # transformers' repeat_kv path
    repeated = runner.prefill(runner.assemble(blocks), q)
    torch.testing.assert_close(grouped, repeated, rtol=1e-5, atol=1e-5)


def test_recording_the_answers_attention_keeps_the_grouped_path(monkeypatch) -> None:
    """The answer's prefill records its attention for the importance policies (the default): that attention function
    must take the grouped path too, or every kv query copies its whole context per query head (issue 33)."""
    llm = build_tiny("llama", num_attention_heads=4, num_key_value_heads=2)
    runner = Runner(llm, "You are a helpful assistant.", block_bias=-0.75)
    blocks = runner.encode([runner.tokenize("Paris is the capital of France."),
                            runner.tokenize("The Seine flows through it.")])
    q = runner.question_ids("What flows through Paris?")
    plain = runner.prefill(runner.assemble(blocks), q)
    calls: list[int] = []

    def counted(*args: object) -> torch.Tensor:
        calls.append(1)
        return grouped_sdpa(*args)  # type: ignore[arg-type]

    monkeypatch.setattr("kvstore.model.attention_bias.grouped_sdpa", counted)
    ctx = runner.assemble(blocks)
    with prefill_attention(runner, ctx) as recorded:
        logits = runner.prefill(ctx, q)
    assert len(calls) == llm.model.config.num_hidden_layers
    torch.testing.assert_close(logits, plain, rtol=1e-5, atol=1e-5)  # recording changes no answer
    votes = recorded()
    assert votes is not None and votes.shape == (ctx.context_tokens,)
    assert 0.0 < float(votes.sum()) <= 1.0 + 1e-4  # the context's share of the question's attention
