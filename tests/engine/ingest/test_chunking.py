"""Blocks from text: whole sentences packed up to the token budget, nothing lost, nothing reordered."""

from __future__ import annotations

import pytest

from kvstore.ingest.chunking import chunk_text, split_sentences


def words(text: str) -> int:
    """A tokenizer stand-in: one token per word."""
    return len(text.split())


def test_sentences_split_on_end_marks_and_blank_lines() -> None:
    assert split_sentences("One. Two!  Three?\n\nFour\nstill four.") == ["One.", "Two!", "Three?", "Four\nstill four."]
    assert split_sentences("   ") == []


def test_whole_sentences_are_packed_up_to_the_budget() -> None:
    text = "a b c. d e. f g h i. j."
    assert chunk_text(text, 5, words) == ["a b c. d e.", "f g h i. j."]


@pytest.mark.parametrize("budget", [1, 3, 7, 50])
def test_no_block_exceeds_the_budget_and_no_word_is_lost(budget: int) -> None:
    text = ("The Normans were a people. " * 3 + "A very long sentence with many words that goes on and on "
            "past any small budget. Short one.")
    blocks = chunk_text(text, budget, words)
    assert all(words(b) <= budget for b in blocks)
    assert " ".join(blocks).split() == text.split()


def test_a_sentence_longer_than_the_budget_is_split_on_words() -> None:
    assert chunk_text("one two three four five.", 2, words) == ["one two", "three four", "five."]


def test_empty_text_gives_no_blocks() -> None:
    assert chunk_text("", 10, words) == []
