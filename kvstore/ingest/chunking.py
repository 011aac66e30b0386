"""Split a document into blocks of at most ~``budget`` tokens on sentence boundaries."""

from __future__ import annotations

import re
from collections.abc import Callable

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n{2,}")


def split_sentences(text: str) -> list[str]:
    return [s for s in (p.strip() for p in _SENTENCE_END.split(text)) if s]


def chunk_text(text: str, budget: int, count_tokens: Callable[[str], int]) -> list[str]:
    """Greedy packing of whole sentences; a sentence longer than the budget is split on words."""
    pieces: list[str] = []
    for sentence in split_sentences(text):
        if count_tokens(sentence) <= budget:
            pieces.append(sentence)
            continue
        words = sentence.split()
        current: list[str] = []
        for word in words:
            if current and count_tokens(" ".join(current + [word])) > budget:
                pieces.append(" ".join(current))
                current = []
            current.append(word)
        if current:
            pieces.append(" ".join(current))
    blocks: list[str] = []
    current_text = ""
    for piece in pieces:
        candidate = f"{current_text} {piece}" if current_text else piece
        if current_text and count_tokens(candidate) > budget:
            blocks.append(current_text)
            current_text = piece
        else:
            current_text = candidate
    if current_text:
        blocks.append(current_text)
    return blocks
