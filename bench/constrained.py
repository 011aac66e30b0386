"""What constraining a refresh's reply to the edit schema costs per token, by library, on SmolLM2's tokenizer.

The schema is the one a refresh builds (``kvstore.contextmap.refresh.edit_schema``) for a map of 23 roadmap items
(as the SQuAD bank's bootstrap leaves it) and two uncovered questions. A valid reply is tokenized and fed
token by token: before each token the library computes the mask of allowed next tokens (the cost that
rides on every decode step), then the token is consumed. Reported: median and p90 ms per token, and the
one-off setup (tokenizer preparation, grammar compile). Libraries not installed are skipped and said so
(only llguidance is a dependency of kvrag; the others are installed by hand for this comparison).

    .venv/bin/python -m bench.constrained            # writes bench/results/constrained.json
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from bench.squad import machine_info, write_json
from kvstore.config import Settings
from kvstore.contextmap.refresh import edit_schema
from kvstore.contextmap.state import Item, MapState
from kvstore.model.schema_decode import JSON_OPTIONS

QUESTIONS = ["In what country is Normandy located?", "Who was the Norse leader?"]


def example(schema: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """A map-shaped state's schema and a reply valid under it."""
    reply = {"edits": [{"op": "add", "section": "reusable_results", "content": f"Q: {q} A: {a}"}
                       for q, a in zip(QUESTIONS, ("France.", "Rollo."), strict=True)],
             "feedback": [{"id": "cr-1", "tag": "helpful"}]}
    return schema, json.dumps(reply, separators=(", ", ": "))


def state() -> MapState:
    stamp = datetime.now(UTC).isoformat()
    items = {f"cr-{n}": Item(f"cr-{n}", "roadmap", f"Paragraph {n} of the article about the Normans. (doc p{n:03d})",
                             None, stamp, stamp, 1) for n in range(1, 24)}
    return MapState(items=items, seq={"cr": 23, "cu": 0, "rr": 0})


Stepper = tuple[Callable[[], None], Callable[[int], None]]  # (compute the mask, consume a token)


def llguidance_stepper(tok: PreTrainedTokenizerBase, schema: dict[str, Any]) -> Stepper:
    import llguidance
    import llguidance.hf

    from kvstore.model.schema_decode import allowed_tokens

    ll = llguidance.hf.from_tokenizer(tok)  # type: ignore[arg-type]
    matcher = llguidance.LLMatcher(ll, llguidance.LLMatcher.grammar_from_json_schema(
        schema, defaults=JSON_OPTIONS), log_level=0)  # type: ignore[arg-type]
    vocab = len(tok)

    def mask() -> None:
        allowed_tokens(matcher, vocab)

    def consume(token: int) -> None:
        matcher.consume_token(token)

    return mask, consume


def xgrammar_stepper(tok: PreTrainedTokenizerBase, schema: dict[str, Any]) -> Stepper:
    import xgrammar  # type: ignore[import-not-found]

    info = xgrammar.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok))
    compiled = xgrammar.GrammarCompiler(info).compile_json_schema(json.dumps(schema), any_whitespace=False,
                                                                  separators=(", ", ": "))
    matcher = xgrammar.GrammarMatcher(compiled)
    bitmask = xgrammar.allocate_token_bitmask(1, info.vocab_size)

    def mask() -> None:
        matcher.fill_next_token_bitmask(bitmask)

    def consume(token: int) -> None:
        matcher.accept_token(token)

    return mask, consume


def lmfe_stepper(tok: PreTrainedTokenizerBase, schema: dict[str, Any]) -> Stepper:
    # The transformers integration of lm-format-enforcer 0.11 does not import on transformers 5: its token list
    # is built here the way that integration builds it.
    from lmformatenforcer import JsonSchemaParser, TokenEnforcer  # type: ignore[import-not-found]
    from lmformatenforcer.tokenenforcer import TokenEnforcerTokenizerData  # type: ignore[import-not-found]

    zero = tok.encode("0")[-1]
    special = set(tok.all_special_ids)
    regular = []
    for i in range(len(tok)):
        if i in special:
            continue
        after_zero = tok.decode([zero, i])[1:]
        regular.append((i, after_zero, len(after_zero) > len(tok.decode([i]))))
    data = TokenEnforcerTokenizerData(regular, lambda ids: tok.decode(ids).rstrip("\ufffd"), tok.eos_token_id,
                                      False, len(tok))
    enforcer = TokenEnforcer(data, JsonSchemaParser(schema))
    prefix: list[int] = []

    def mask() -> None:
        enforcer.get_allowed_tokens(prefix)

    return mask, prefix.append


def measure(name: str, build: Callable[[PreTrainedTokenizerBase, dict[str, Any]], Stepper],
            tok: PreTrainedTokenizerBase, schema: dict[str, Any], tokens: list[int]) -> dict[str, Any]:
    try:
        t0 = time.perf_counter()
        mask, consume = build(tok, schema)
        setup_ms = (time.perf_counter() - t0) * 1000
    except ImportError as exc:
        return {"library": name, "skipped": f"not installed ({exc.name or exc})"}
    steps = []
    try:
        for t in tokens:
            t0 = time.perf_counter()
            mask()
            steps.append((time.perf_counter() - t0) * 1000)
            consume(t)
    except Exception as exc:  # noqa: BLE001 - a library that cannot take the schema is a result, not a crash
        return {"library": name, "setup_ms": round(setup_ms, 1), "unsupported": f"{type(exc).__name__}: {exc}"}
    ordered = sorted(steps)
    return {"library": name, "tokens": len(steps), "setup_ms": round(setup_ms, 1),
            "mask_ms_median": round(statistics.median(steps), 3),
            "mask_ms_p90": round(ordered[int(0.9 * (len(ordered) - 1))], 3)}


def main() -> None:
    converted = Settings().resolved_model_cache_dir() / "smollm2-135m-instruct"
    if not converted.is_dir():
        raise SystemExit(f"the packaged SmolLM2 is not converted yet ({converted}): start kvrag once first")
    tok = AutoTokenizer.from_pretrained(str(converted))
    schema, reply = example(edit_schema(state(), QUESTIONS))
    tokens = tok.encode(reply, add_special_tokens=False)
    rows = [measure(name, build, tok, schema, tokens) for name, build in (
        ("llguidance", llguidance_stepper), ("xgrammar", xgrammar_stepper), ("lm-format-enforcer", lmfe_stepper))]
    for row in rows:
        print(row)
    path = write_json("constrained", {"benchmark": "constrained", "reply_tokens": len(tokens), "rows": rows,
                                      "machine": machine_info("SmolLM2-135M-Instruct tokenizer")})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
