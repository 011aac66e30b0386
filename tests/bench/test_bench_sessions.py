"""bench/sessions helpers that need no model: the paired F1 difference and the gold-answer NLL."""

from __future__ import annotations

import torch

from bench.sessions import Record, gold_nll, paired_difference


def _record(variant: str, qid: str, f1: float) -> Record:
    return Record(variant, 0, qid, f1, 0.0, 1, 0.0, 0.0, "")


def test_paired_difference_pairs_by_subquestion_and_brackets_the_mean() -> None:
    records = [_record("kv", q, f) for q, f in (("a", 1.0), ("b", 0.0), ("c", 0.5), ("d", 0.0))]
    records += [_record("brief", q, f) for q, f in (("a", 0.5), ("b", 0.0), ("c", 0.5), ("e", 1.0))]
    mean, low, high = paired_difference(records, "brief") or (0.0, 0.0, 0.0)
    assert mean == -0.5 / 3  # "d" and "e" have no pair
    assert low <= mean <= high and low >= -0.5 and high <= 0.0
    assert paired_difference(records, "kv") == (0.0, 0.0, 0.0)
    assert paired_difference(records, "missing") is None


def test_gold_nll_reads_the_answer_tokens_after_the_question() -> None:
    # 2 question tokens, 2 answer tokens: answer token i is predicted at input 1 + i.
    logprobs = torch.log_softmax(torch.randn(4, 5), dim=-1)
    want = -(logprobs[1, 3] + logprobs[2, 0]) / 2
    assert abs(gold_nll(logprobs, 2, [3, 0]) - float(want)) < 1e-6
