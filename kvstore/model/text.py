"""The text around the model's tokens: where blocks and the question sit in the prompt (from the model's chat
template), and generated tokens streamed back as text."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

_MARK = "\u2063KVRAG\u2063"


@dataclass(frozen=True)
class PromptLayout:
    """How a query is laid out: ``prefix | block ... block | question``."""

    prefix: str
    question_prefix: str
    question_suffix: str


def prompt_layout(tokenizer, system_prompt: str) -> PromptLayout:
    """Split the model's chat template around the user turn so blocks sit inside the user message."""
    template = getattr(tokenizer, "chat_template", None)
    if template:
        rendered = tokenizer.apply_chat_template(
            [{"role": "system", "content": system_prompt}, {"role": "user", "content": _MARK}],
            tokenize=False, add_generation_prompt=True,
        )
        if isinstance(rendered, str) and rendered.count(_MARK) == 1:
            before, after = rendered.split(_MARK)
            return PromptLayout(prefix=before + "Passages:\n", question_prefix="\nQuestion: ",
                                question_suffix=after)
    return PromptLayout(prefix=f"{system_prompt}\n\nPassages:\n", question_prefix="\nQuestion: ",
                        question_suffix="\nAnswer:")


class TokenStream:
    """Sends the text of generated tokens to ``on_token`` as it grows, never half a character."""

    def __init__(self, tokenizer, on_token: Callable[[str], None] | None) -> None:
        self.tokenizer = tokenizer
        self.on_token = on_token
        self.emitted = ""

    def push(self, tokens: list[int]) -> None:
        """``tokens``: everything generated so far."""
        if self.on_token is None:
            return
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        if len(text) > len(self.emitted) and not text.endswith("\ufffd"):
            self.on_token(text[len(self.emitted):])
            self.emitted = text

    def finish(self, tokens: list[int]) -> str:
        """Send what is left; the whole answer, stripped."""
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        if self.on_token is not None and len(text) > len(self.emitted):
            self.on_token(text[len(self.emitted):])
        return text.strip()
