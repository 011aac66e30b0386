"""The query API's recompute and compaction knobs, through BankStore on the tiny model."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from kvstore.bank import BankStore
from kvstore.errors import ValidationFailed

BLOCKS = (
    "The Normans were the people who gave their name to Normandy, a region in France.",
    "Paris is the capital and most populous city of France. The Seine flows through it.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
)
QUESTION = "Who were the Normans?"


def test_bank_query_reports_recomputed_and_kept_tokens(make_store: Callable[..., BankStore]) -> None:
    store = make_store()
    store.create_bank("kb")
    for i, text in enumerate(BLOCKS):
        store.put_document("kb", f"d{i}", text)
    plain = store.query("kb", QUESTION, k=3, max_new_tokens=2)
    assert plain.usage.recomputed_tokens == 0 and plain.usage.kept_tokens == plain.usage.context_tokens
    full = store.query("kb", QUESTION, k=3, max_new_tokens=2, recompute=1.0)
    text = store.query("kb", QUESTION, k=3, max_new_tokens=2, mode="text")
    assert full.usage.recomputed_tokens == full.usage.context_tokens and full.answer == text.answer
    small = store.query("kb", QUESTION, k=3, max_new_tokens=2, recompute=0.25, compaction={"budget_tokens": 12})
    assert 0 < small.usage.recomputed_tokens < small.usage.context_tokens
    assert small.usage.kept_tokens == 12 and small.usage.context_tokens == plain.usage.context_tokens
    # The question rides along a partial recompute's passes; a compaction that keeps every token takes the path
    # that blends first and prefills the question after: the same context, so the same answer.
    fused = store.query("kb", QUESTION, k=3, max_new_tokens=6, recompute=0.4)
    after = store.query("kb", QUESTION, k=3, max_new_tokens=6, recompute=0.4, compaction={"budget_tokens": 10_000})
    assert fused.answer == after.answer and fused.usage.generated_tokens == after.usage.generated_tokens
    assert fused.usage.recomputed_tokens == after.usage.recomputed_tokens > 0
    lone = store.query("kb", QUESTION, k=1, max_new_tokens=2, recompute=1.0)
    alone = store.query("kb", QUESTION, k=1, max_new_tokens=2)
    assert lone.usage.recomputed_tokens == 0 and lone.answer == alone.answer  # one block is exact already
    for bad in ({"recompute": 2.0}, {"recompute": "x"}, {"compaction": {"tau": "x"}}, {"compaction": {}}):
        with pytest.raises(ValidationFailed):
            store.query("kb", QUESTION, k=3, max_new_tokens=2, **bad)  # type: ignore[arg-type]
