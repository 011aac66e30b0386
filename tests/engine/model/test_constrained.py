"""Constrained decoding of a JSON id list (kvstore/model/constrained.py)."""

from __future__ import annotations

import json

import pytest

from kvstore.model.constrained import greedy_id_list, list_prefix_ok, list_tokens
from kvstore.model.loader import LoadedModel
from kvstore.model.runner import Runner


@pytest.fixture(scope="module")
def runner(tiny_llm: LoadedModel) -> Runner:
    return Runner(tiny_llm, "You manage an agent's memory.")


IDS = frozenset({"0", "2", "12"})


@pytest.mark.parametrize("text", ["]", "0]", "0, 2]", "12,0]", "1", "12, ", "0, 1", "2,", ""])
def test_prefixes_of_a_list_of_allowed_ids_are_accepted(text: str) -> None:
    assert list_prefix_ok(text, IDS)


@pytest.mark.parametrize("text", ["3", "0, 0]", "0]]", "] ", "0 ]", " 0", "0,  2", "13", "2, 2", "0, 2, 12, "])
def test_anything_else_is_refused(text: str) -> None:
    assert not list_prefix_ok(text, IDS)


def test_list_tokens_hold_only_list_characters(runner: Runner) -> None:
    pieces = list_tokens(runner.tokenizer)
    assert pieces and all(set(p) <= set("0123456789, ]") for p in pieces.values())
    assert "]" in pieces.values()


@pytest.mark.parametrize("allowed", [[1, 2, 3], [0, 7, 10, 11], []])
def test_greedy_id_list_always_parses_to_allowed_distinct_ids(runner: Runner, allowed: list[int]) -> None:
    prompt = runner.tokenize("Which segments are needed? Reply with JSON.", add_special=True)
    reply = greedy_id_list(runner, prompt, '{"needed": [', allowed, list_tokens(runner.tokenizer))
    data = json.loads(reply)
    assert set(data) == {"needed"}
    assert set(data["needed"]) <= set(allowed) and len(set(data["needed"])) == len(data["needed"])

