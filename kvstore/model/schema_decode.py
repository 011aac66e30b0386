"""Greedy decoding constrained to a JSON schema (llguidance): a small local model's reply always parses.

Asked for edit JSON, SmolLM2-135M answered prose or broken JSON on every context-map refresh. Here each
step's logits are masked to the tokens that keep the reply a prefix of some document valid under the
schema, so what the model decides is the content, never the syntax. llguidance is used because it
honours the whole schema (bounded lengths next to patterns) at a mask cost far below a decode step
(``bench/constrained.py``; the comparison is in docs/research/context-map.md). Tokens the grammar forces
(keys, punctuation) are fed to the model in one forward instead of one by one.

The schema must bound the reply (``maxItems``, ``maxLength``) so that it closes within ``max_tokens``;
a reply cut by the cap is reported as such (:class:`ConstrainedError`), never returned half-written.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any
from weakref import WeakKeyDictionary

import llguidance
import llguidance.hf
import numpy as np
import torch
from transformers import DynamicCache, PreTrainedTokenizerBase

from kvstore.model.compat import with_cache
from kvstore.model.runner import Runner

# Compact JSON: a flexible-whitespace grammar lets a small model pad forever with spaces and newlines.
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

_TOKENIZERS: WeakKeyDictionary[PreTrainedTokenizerBase, llguidance.LLTokenizer] = WeakKeyDictionary()
_TOKENIZERS_LOCK = threading.Lock()


class ConstrainedError(ValueError):
    """The schema did not compile, or the reply did not close within the token cap."""


def ll_tokenizer(tokenizer: PreTrainedTokenizerBase) -> llguidance.LLTokenizer:
    """llguidance's view of a (fast) HF tokenizer; built once per tokenizer (it takes about a second)."""
    with _TOKENIZERS_LOCK:
        found = _TOKENIZERS.get(tokenizer)
        if found is None:
            found = _TOKENIZERS[tokenizer] = llguidance.hf.from_tokenizer(tokenizer)  # type: ignore[arg-type]
        return found


def matcher_for(tokenizer: PreTrainedTokenizerBase, schema: dict[str, Any]) -> llguidance.LLMatcher:
    """A fresh matcher of ``schema``; a schema llguidance cannot compile is a :class:`ConstrainedError`."""
    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)  # type: ignore[arg-type]
    matcher = llguidance.LLMatcher(ll_tokenizer(tokenizer), grammar, log_level=0)
    if matcher.is_error():
        raise ConstrainedError(f"the schema does not compile: {matcher.get_error()}")
    return matcher


def allowed_tokens(matcher: llguidance.LLMatcher, vocab: int) -> np.ndarray:
    """The next step's mask as booleans over the model's ``vocab`` logits (ids past the tokenizer: never)."""
    bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
    mask = np.zeros(vocab, dtype=bool)
    n = min(vocab, bits.size)
    mask[:n] = bits[:n].astype(bool)
    return mask


@torch.inference_mode()
def greedy_json(runner: Runner, prompt_ids: Sequence[int], schema: dict[str, Any], max_tokens: int) -> str:
    """The model's greedy reply to ``prompt_ids`` under ``schema``: always a complete, valid document.
    Callers hold the model lock. Raises :class:`ConstrainedError` if it does not close within ``max_tokens``."""
    tokenizer = runner.tokenizer
    matcher = matcher_for(tokenizer, schema)
    device = runner.llm.device
    cache = DynamicCache()
    produced: list[int] = []
    feed = list(prompt_ids)
    while True:
        forced = matcher.compute_ff_tokens()
        if forced:  # what the grammar allows only one way: checked, then prefilled together with ``feed``
            if not matcher.consume_tokens(forced):
                raise ConstrainedError(f"the grammar refused its own forced tokens: {matcher.get_error()}")
            feed += forced
            produced += forced
        if matcher.is_stopped() or len(produced) >= max_tokens:
            break
        out = runner.model(input_ids=torch.tensor([feed], device=device), **with_cache(runner.model, cache),
                           use_cache=True, logits_to_keep=1)
        logits = out.logits[0, -1].float()
        mask = torch.from_numpy(allowed_tokens(matcher, logits.shape[0])).to(logits.device)
        best = int(logits.masked_fill(~mask, float("-inf")).argmax())
        if not matcher.consume_token(best):
            raise ConstrainedError(f"the grammar refused the token it allowed: {matcher.get_error()}")
        produced.append(best)
        feed = [best]
        if matcher.is_stopped():
            break
    if not matcher.is_accepting():
        raise ConstrainedError(f"the reply did not close within {max_tokens} tokens")
    return str(tokenizer.decode([t for t in produced if t not in runner.stop_ids], skip_special_tokens=True))
