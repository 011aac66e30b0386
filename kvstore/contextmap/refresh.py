"""What a context-map refresh asks its LLM for: the prompt, the edit JSON schema, the hint of what is new,
the calls.

The schema is built per refresh from the map it edits (a small model free to choose only copies or
rewrites the first item):

- each recent question no item covers yet opens with a required ``add`` to ``reusable_results`` whose
  content starts ``Q: <question> A:``; the model writes the answer (from the recorded answers in the
  prompt), so a refresh with something new makes the map gain a reusable result;
- ``delete`` and ``replace`` may name only items with evidence against them (more harmful than helpful
  votes, or stale) and never a pinned one; feedback may name any item of the map;
- sizes are bounded (edits, feedback, characters) so that the reply always closes within the decode cap.

- **Local model**: greedy decoding constrained to the schema (:mod:`kvstore.model.schema_decode`): every
  reply parses.
- **Endpoint** (``KVRAG_MAP_LLM_URL``): asks for ``response_format: json_schema``; an endpoint that
  refuses it (400/422) is asked for ``json_object``, then for plain text, and the reply is parsed
  strictly as before.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from kvstore.config import Settings
    from kvstore.contextmap.state import MapState
    from kvstore.model.runner import Runner
    from kvstore.storage.catalog import ContextMapQueryRow

REFRESH_EDITS = 3  # edits one refresh may propose: a small map changes a little at a time
REFRESH_FEEDBACK = 3
ITEM_CHARS = 160  # characters of one item a refresh writes (the API's own edits allow more)
QUESTION_CHARS = 120  # of a question quoted at the start of a required add
ANSWER_CHARS = 100  # the model's answer after it
# An item starts with a letter, digit or bracket and holds printable ASCII: bounded tokens per character, so
# the worst case fits the decode cap, and no control characters in the rendered map.
ITEM_PATTERN = r"^[A-Za-z0-9(\[][ -~]*$"
_WORD = re.compile(r"[a-z0-9]+")
_STOP = frozenset("what which when where whom whose does that this with from have were into about they their "
                  "there these those been also more most many much some such than then them only very will would "
                  "could should being other over under after before while".split())
_REFUSED = (400, 404, 415, 422, 501)  # how endpoints say they do not know a response_format


DISTILL_SYSTEM = (
    "You maintain a context map of a document memory: a short list of items in three sections. roadmap (cr-N): "
    "what is where in the memory. understanding (cu-N): facts, conventions and pitfalls learned. "
    "reusable_results (rr-N): answers worth keeping. Given the current map and recent questions with their "
    "answers and sources, reply with ONLY a JSON object {\"edits\": [...], \"feedback\": [...]}. An edit is "
    "{\"op\": \"add\", \"section\": ..., \"content\": ...}, {\"op\": \"replace\", \"id\": ..., \"content\": ...} "
    "or {\"op\": \"delete\", \"id\": ...}; feedback is {\"id\": ..., \"tag\": \"helpful\"|\"harmful\"|"
    "\"neutral\"|\"stale\"}. Keep items short; the map has a token budget."
)


def distill_prompt(state: MapState, records: Sequence[ContextMapQueryRow]) -> str:
    """The user message of a refresh: the map with its feedback counts, then the recent queries."""
    lines = [f"Token budget: {state.budget_tokens}", "Current map:"]
    lines += [f"- {i.id} [{i.section}] (helpful {i.helpful}, harmful {i.harmful}{', stale' if i.stale else ''}): "
              f"{i.content}" for i in state.ordered()] or ["(empty)"]
    lines.append("Recent queries:")
    for r in records:
        lines.append(f"- Q: {r.question[:300]}\n  A: {r.answer[:300]}\n  sources: {', '.join(r.sources or [])}")
    return "\n".join(lines)


@dataclass(frozen=True)
class RefreshAsk:
    """One refresh's request: the schema, and the recent questions no item covers yet."""

    schema: dict[str, Any]
    uncovered: list[str]


def content_words(text: str) -> set[str]:
    """Lower-case words of four letters or more that carry meaning (no question words, no fillers)."""
    return {w for w in _WORD.findall(text.lower()) if len(w) >= 4 and w not in _STOP}


def uncovered_questions(state: MapState, questions: Sequence[str]) -> list[str]:
    """The questions none of whose items holds all of their content words: what the map does not know yet."""
    items = [content_words(i.content) for i in state.items.values()]
    out: list[str] = []
    for q in questions:
        words = content_words(q)
        if words and not any(words <= have for have in items) and q not in out:
            out.append(q)
    return out


def _add_schema() -> dict[str, Any]:
    return {"type": "object", "additionalProperties": False, "required": ["op", "section", "content"],
            "properties": {"op": {"const": "add"},
                           "section": {"enum": ["reusable_results", "understanding", "roadmap"]},
                           "content": {"type": "string", "minLength": 8, "maxLength": ITEM_CHARS,
                                       "pattern": ITEM_PATTERN}}}


def question_add(question: str) -> dict[str, Any]:
    """An ``add`` of a reusable result that starts with ``question``: the model writes only the answer."""
    quoted = " ".join(question.split())[:QUESTION_CHARS]
    lead = f"Q: {quoted} A: "
    return {"type": "object", "additionalProperties": False, "required": ["op", "section", "content"],
            "properties": {"op": {"const": "add"}, "section": {"const": "reusable_results"},
                           "content": {"type": "string", "maxLength": len(lead) + ANSWER_CHARS,
                                       "pattern": "^" + re.escape(lead) + r"[A-Za-z0-9(\[][ -~]*$"}}}


def _disputed(item: Any) -> bool:
    return not item.pinned and (item.stale or item.harmful > item.helpful)


def edit_schema(state: MapState, uncovered: Sequence[str] = ()) -> dict[str, Any]:
    """The JSON schema of ``{"edits": [...], "feedback": [...]}`` for this map (see the module doc)."""
    ids = [i.id for i in state.ordered()]
    unpinned = [i.id for i in state.ordered() if _disputed(i)]
    add = _add_schema()
    choices: list[dict[str, Any]] = [add]
    if unpinned:
        choices.append({"type": "object", "additionalProperties": False, "required": ["op", "id", "content"],
                        "properties": {"op": {"const": "replace"}, "id": {"enum": unpinned},
                                       "content": add["properties"]["content"]}})
        choices.append({"type": "object", "additionalProperties": False, "required": ["op", "id"],
                        "properties": {"op": {"const": "delete"}, "id": {"enum": unpinned}}})
    required = [question_add(q) for q in uncovered[:REFRESH_EDITS]]
    edits: dict[str, Any] = {"type": "array", "maxItems": max(REFRESH_EDITS, len(required)),
                             "items": choices[0] if len(choices) == 1 else {"anyOf": choices}}
    if required:
        edits.update(prefixItems=required, minItems=len(required))
    feedback: dict[str, Any] = {"type": "array", "maxItems": min(REFRESH_FEEDBACK, len(ids))}
    if ids:
        feedback["items"] = {"type": "object", "additionalProperties": False, "required": ["id", "tag"],
                             "properties": {"id": {"enum": ids},
                                            "tag": {"enum": ["helpful", "harmful", "neutral", "stale"]}}}
    return {"type": "object", "additionalProperties": False, "required": ["edits", "feedback"],
            "properties": {"edits": edits, "feedback": feedback}}


def ask_for(state: MapState, records: Sequence[ContextMapQueryRow]) -> RefreshAsk:
    uncovered = uncovered_questions(state, [r.question for r in records])
    return RefreshAsk(edit_schema(state, uncovered), uncovered)


def new_hint(ask: RefreshAsk) -> str:
    """The end of the user message: what the map is missing and what the answer must start with."""
    if not ask.uncovered:
        return "\nThe map already covers these questions: add only what is new, or nothing."
    listed = "\n".join(f"- {q[:200]}" for q in ask.uncovered[:8])
    return ("\nQuestions the map does not cover yet:\n" + listed + "\nStart with one add per question: a "
            "reusable_results item \"Q: <question> A: <the short answer found>\".")


def decode_cap(settings: Settings) -> int:
    """Tokens a constrained local reply may need at most: the schema's worst case (escapes count twice)."""
    item = max(ITEM_CHARS, QUESTION_CHARS + ANSWER_CHARS + 8)
    worst = 64 + REFRESH_EDITS * (2 * item + 32) + REFRESH_FEEDBACK * 24
    return max(settings.map_llm_max_tokens, worst)


def complete_remote(settings: Settings, system: str, user: str, schema: dict[str, Any]) -> str:
    """One chat completion from ``KVRAG_MAP_LLM_URL``, asking for the schema first (see the module doc)."""
    assert settings.map_llm_url
    url = settings.map_llm_url.rstrip("/")
    if not url.endswith("/chat/completions"):
        url += "/chat/completions"
    headers = {"Authorization": f"Bearer {settings.map_llm_api_key}"} if settings.map_llm_api_key else {}
    body: dict[str, Any] = {"model": settings.map_llm_model, "temperature": 0,
                            "max_tokens": settings.map_llm_max_tokens,
                            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]}
    formats: list[dict[str, Any] | None] = [
        {"type": "json_schema", "json_schema": {"name": "context_map_edits", "schema": schema}},
        {"type": "json_object"}, None]
    for fmt in formats:
        sent = {**body, "response_format": fmt} if fmt is not None else body
        response = httpx.post(url, headers=headers, timeout=settings.map_llm_timeout_s, json=sent)
        if response.status_code in _REFUSED and fmt is not None:
            continue  # this endpoint does not take that response_format: ask with the next, plainer one
        response.raise_for_status()
        content = response.json()["choices"][0]["message"]["content"]
        if not isinstance(content, str):
            raise TypeError("the endpoint's message content is not a string")
        return content
    raise AssertionError("unreachable: the last format is plain text")


def complete_local(runner: Runner, settings: Settings, system: str, user: str, schema: dict[str, Any]) -> str:
    """The loaded model's reply, decoded constrained to ``schema``. Callers hold the model lock."""
    from kvstore.model.schema_decode import greedy_json

    tokenizer = runner.tokenizer
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": user}],
                                            add_generation_prompt=True, tokenize=True, return_dict=False)
        ids = list(ids["input_ids"]) if isinstance(ids, dict) else list(ids)
    else:
        ids = runner.tokenize(f"{system}\n\n{user}\n\nJSON:", add_special=True)
    return greedy_json(runner, ids, schema, decode_cap(settings))
