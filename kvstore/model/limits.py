"""Token caps on what a caller asks the model to read, and the model's position budget (issue 26, hole 3).

A question, a session brief's task, a session segment and one append each have a token cap
(``KVRAG_MAX_QUESTION_TOKENS`` and friends). A text over its cap is refused with ``413 payload_too_large``
before anything else happens: no embedding, no retrieval, no prefill, no queueing behind model work.

Checking is cheap whatever the size: no token spells less than one UTF-8 byte, so a text of fewer bytes than
the cap fits without tokenizing (every ordinary question: the hot path pays a ``len``); no token spells more
than ``longest_token_chars`` characters, so a text longer than ``cap * longest_token_chars`` characters cannot
fit and is refused without tokenizing it; anything between is tokenized exactly (at most a few tens of
kilobytes: 82 ms for a worst-case 41 kB question with SmolLM2's tokenizer).

A kv or text query keeps its assembled context within the model's maximum positions by *trimming retrieval*:
the lowest-ranked blocks that would not fit (after the prefix, the context map, the question and the
``max_new_tokens`` it may generate) are left out, and the answer's ``sources`` lists only the blocks it read.
A session brief does the same with its ``include_documents`` after the trajectory. (A session's own positions
keep growing with its appends; they are not capped here.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

from kvstore.errors import PayloadTooLarge

if TYPE_CHECKING:
    from kvstore.config import Settings
    from kvstore.model.loader import LoadedModel
    from kvstore.model.runner import Runner

# A tokenizer whose normalizer composes characters (NFC, NFKC) may spell one token from more characters than
# its vocabulary string has; doubling keeps the bound an upper bound for them.
_NORMALIZER_SLACK = 2
_MIN_TOKEN_CHARS = 16


@dataclass(frozen=True)
class TokenCaps:
    """Caps in tokens, from the settings."""

    question: int
    task: int
    segment: int
    append: int


def longest_token_chars(tokenizer: object) -> int:
    """The most characters of input text one token can stand for (an upper bound)."""
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    longest = max((len(token) for token in vocab), default=0)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    slack = _NORMALIZER_SLACK if backend is not None and getattr(backend, "normalizer", None) is not None else 1
    return max(_MIN_TOKEN_CHARS, longest * slack)


class PromptLimits:
    """Checks of one store's caller texts against the caps; the facade makes one (``BankStore.limits``)."""

    def __init__(self, settings: Settings, runner: Runner, llm: LoadedModel) -> None:
        self.caps = TokenCaps(question=settings.max_question_tokens, task=settings.max_task_tokens,
                              segment=settings.max_segment_tokens, append=settings.max_append_tokens)
        self._tokenize = runner.tokenize
        self._tokenizer = llm.tokenizer
        config = llm.model.config
        self.max_positions: int | None = getattr(config, "max_position_embeddings", None)

    @cached_property
    def chars_per_token(self) -> int:
        """Read from the vocabulary on first need (a quarter of a second for SmolLM2's 49k tokens)."""
        return longest_token_chars(self._tokenizer)

    def tokens(self, what: str, text: str, cap: int, exact: bool = False) -> int:
        """An upper bound of the tokens of ``text``, or :class:`PayloadTooLarge` above ``cap``: a text of fewer
        UTF-8 bytes than the cap fits without tokenizing (no token spells less than a byte; one more for a
        SentencePiece word-start marker), one longer than ``cap`` tokens could spell is refused by its length
        alone, anything between is counted exactly (and everything with ``exact``)."""
        if not isinstance(text, str):
            return 0  # the caller's own validation answers for the type
        if len(text) < cap and not exact:
            size = len(text.encode("utf-8", "surrogatepass")) + 1
            if size <= cap:
                return size  # the common case costs no tokenization: the hot path stays as it was
        if len(text) > cap * self.chars_per_token:
            raise PayloadTooLarge(f"{what} is longer than {cap} tokens ({len(text)} characters); "
                                  f"split it or shorten it")
        count = len(self._tokenize(text))
        if count > cap:
            raise PayloadTooLarge(f"{what} is {count} tokens; at most {cap} are accepted")
        return count

    def check_question(self, question: str) -> int:
        return self.tokens("question", question, self.caps.question)

    def check_task(self, task: str) -> int:
        return self.tokens("task", task, self.caps.task)

    def check_segments(self, texts: Sequence[str]) -> int:
        """Each segment within the segment cap and all of one append within the append cap."""
        total = sum(self.tokens("segment text", text, self.caps.segment) for text in texts)
        if total > self.caps.append:  # the bounds say it may not fit: count (each text is bounded by now)
            total = sum(self.tokens("segment text", text, self.caps.segment, exact=True) for text in texts)
            if total > self.caps.append:
                raise PayloadTooLarge(f"one append is {total} tokens; at most {self.caps.append} are accepted, "
                                      f"append in parts")
        return total

    def blocks_that_fit(self, block_tokens: Sequence[int], fixed_tokens: int) -> int:
        """How many of the ranked blocks (their token counts, best first) fit in the model's positions after
        ``fixed_tokens`` (prefix, map, question and the answer's budget). At least one block is never
        promised: a context with no room gets none."""
        if self.max_positions is None:
            return len(block_tokens)
        room, kept = self.max_positions - fixed_tokens, 0
        for tokens in block_tokens:
            if tokens > room:
                break
            room -= tokens
            kept += 1
        return kept

