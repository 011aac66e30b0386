"""Greedy decoding constrained to a JSON list of allowed integer ids: structured output from a small model.

Asked for ``{"needed": [ids]}``, a 135M model answers in prose. Forcing the object's opening and then
allowing only the tokens that keep the reply a prefix of ``id, id, ...]`` over the allowed ids (each at most
once) makes every reply parse, so what decides is which ids the model ranks likely, not its formatting.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from transformers import DynamicCache, PreTrainedTokenizerBase

from kvstore.model.compat import with_cache
from kvstore.model.runner import Runner

_LIST_PIECE = re.compile(r"[0-9, \]]+")


def list_prefix_ok(text: str, allowed: frozenset[str]) -> bool:
    """Whether ``text`` (what follows ``[``) is, or can still become, ``]`` or ``id(, id)*]`` with every id
    in ``allowed`` and none repeated."""
    closed = text.endswith("]")
    body = text[:-1] if closed else text
    if "]" in body:
        return False
    if closed and body == "":
        return True
    parts = body.split(",")
    done: set[str] = set()
    for i, part in enumerate(parts):
        item = part[1:] if i and part.startswith(" ") else part
        if " " in item:
            return False
        if i == len(parts) - 1 and not closed:
            return any(a.startswith(item) for a in allowed - done)
        if item not in allowed or item in done:
            return False
        done.add(item)
    return True


def list_tokens(tokenizer: PreTrainedTokenizerBase) -> dict[int, str]:
    """Every token whose text is made only of digits, commas, spaces and ``]``: the ones a list can use."""
    vocab = len(tokenizer)
    pieces = tokenizer.batch_decode([[i] for i in range(vocab)])
    return {i: p for i, p in enumerate(pieces) if _LIST_PIECE.fullmatch(p)}


@torch.inference_mode()
def greedy_id_list(runner: Runner, prompt_ids: Sequence[int], opening: str, allowed: Sequence[int],
                   pieces: dict[int, str]) -> str:
    """``opening`` (e.g. ``{"needed": [``), then the model's greedy choice among the tokens that keep a list of
    ``allowed`` ids well formed, closed with ``]}``: the whole reply. ``pieces`` comes from :func:`list_tokens`.
    The list names at least one id when there is one: an empty one asks to prune everything (refused)."""
    names = frozenset(str(i) for i in allowed)
    device = runner.llm.device
    ids = [*prompt_ids, *runner.tokenizer.encode(opening, add_special_tokens=False)]
    cache = DynamicCache()
    out = runner.model(input_ids=torch.tensor([ids], device=device), **with_cache(runner.model, cache), use_cache=True,
                       logits_to_keep=1)
    text = ""
    # Each id is at most a few tokens and none repeats, so the list closes well within this bound.
    for _ in range(8 * (len(names) + 1)):
        valid = [t for t, p in pieces.items()
                 if list_prefix_ok(text + p, names) and not (names and (text + p).startswith("]"))]
        scores = out.logits[0, -1, valid]  # [valid tokens]
        best = valid[int(scores.argmax())]
        text += pieces[best]
        if text.endswith("]"):
            break
        out = runner.model(input_ids=torch.tensor([[best]], device=device), **with_cache(runner.model, cache),
                           use_cache=True, logits_to_keep=1)
    return opening + text + "}"
