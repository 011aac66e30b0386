"""The prune judge of the ``model`` policy: an auxiliary model call that names the segments a session still
needs for its goal. Its tokens never enter a session.

Stored text reaches the judge's prompt, so its reply is parsed strictly (:func:`parse_needed`) and an
unusable one prunes nothing (the bounds on what a reply may prune: :mod:`kvstore.sessions.restore`).
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Sequence
from typing import Protocol

import httpx

from kvstore.config import Settings
from kvstore.model.constrained import greedy_id_list, list_tokens
from kvstore.model.runner import Runner

JUDGE_SNIPPET_CHARS = 400  # how much of each segment the prune judge reads


class Judge(Protocol):
    """An auxiliary model call: a prompt and the live segment ids in, the model's reply text out. Its tokens
    never enter a session."""

    def __call__(self, prompt: str, live_ids: Sequence[int]) -> str: ...


class JudgeError(ValueError):
    """The judge's reply was unusable (or the endpoint failed): the prune then drops nothing."""


def judge_prompt(goal: str | None, segments: Sequence[tuple[int, str, str]]) -> str:
    """The question the judge answers, listing ``(id, role, text)`` of the live segments."""
    lines = [f"[{sid}] {role}: {text[:JUDGE_SNIPPET_CHARS].strip()}" for sid, role, text in segments]
    return (
        "You manage the working memory of an AI agent. Its goal: "
        f"{goal.strip() if goal and goal.strip() else 'continue its current task'}\n\n"
        "Memory segments:\n" + "\n".join(lines) + "\n\n"
        "Which segments does the agent still need for its goal? Reply with JSON only, exactly "
        '{"needed": [<segment ids>]}.'
    )


def parse_needed(reply: str, live_ids: Sequence[int]) -> list[int]:
    """The judge's ``{"needed": [ids]}``, strictly: one JSON object (a code fence around it is allowed),
    only that key, integer ids of live segments. Anything else raises ``JudgeError``."""
    text = reply.strip()
    fence = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", text, flags=re.DOTALL)
    if fence:
        text = fence.group(1)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise JudgeError(f"the judge's reply is not JSON: {exc.msg}") from None
    if not isinstance(data, dict) or set(data) != {"needed"} or not isinstance(data["needed"], list):
        raise JudgeError('the judge\'s reply must be exactly {"needed": [<segment ids>]}')
    needed = data["needed"]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in needed):
        raise JudgeError("the judge's segment ids must be integers")
    unknown = sorted(set(needed) - set(live_ids))
    if unknown:
        raise JudgeError(f"the judge named segments that are not live: {unknown}")
    return sorted(set(needed))


class LocalJudge:
    """The loaded model, over a fresh cache (nothing of any session), greedy and constrained to the reply's
    JSON (:mod:`kvstore.model.constrained`): a small local model's prose would never parse."""

    def __init__(self, runner: Runner, lock: threading.Lock) -> None:
        self.runner, self.lock = runner, lock
        self._pieces: dict[int, str] | None = None

    def __call__(self, prompt: str, live_ids: Sequence[int]) -> str:
        tok = self.runner.tokenizer
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True)
            ids = self.runner.tokenize(text)
        else:
            ids = self.runner.tokenize(prompt + "\nAnswer: ", add_special=True)
        with self.lock:
            if self._pieces is None:
                self._pieces = list_tokens(tok)
            return greedy_id_list(self.runner, ids, '{"needed": [', live_ids, self._pieces)


class HttpJudge:
    """An OpenAI-compatible chat completions endpoint (``base_url`` like ``http://host:port/v1``)."""

    def __init__(self, base_url: str, model: str = "default", api_key: str | None = None,
                 timeout_s: float = 60.0) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key, self.timeout_s = model, api_key, timeout_s

    def __call__(self, prompt: str, live_ids: Sequence[int]) -> str:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        body = {"model": self.model, "temperature": 0, "response_format": {"type": "json_object"},
                "messages": [{"role": "user", "content": prompt}]}
        try:
            response = httpx.post(self.url, json=body, headers=headers, timeout=self.timeout_s)
            response.raise_for_status()
            return str(response.json()["choices"][0]["message"]["content"])
        except (httpx.HTTPError, KeyError, IndexError, TypeError, ValueError) as exc:
            raise JudgeError(f"the judge endpoint failed: {type(exc).__name__}") from None


def default_judge(settings: Settings, runner: Runner, model_lock: threading.Lock) -> Judge:
    """The ``KVRAG_MAP_LLM_URL`` endpoint when that setting is there and set, else the loaded model."""
    url = getattr(settings, "map_llm_url", None)
    if url:
        return HttpJudge(str(url), model=str(getattr(settings, "map_llm_model", None) or "default"),
                         api_key=getattr(settings, "map_llm_api_key", None),
                         timeout_s=float(getattr(settings, "map_llm_timeout_s", 60.0)))
    return LocalJudge(runner, model_lock)


def judge_needs_model(settings: Settings, policy: str) -> bool:
    """Whether a prune with ``policy`` and the default judge runs the loaded model. Only then does it belong
    on the model worker: a remote judge's network call (up to ``map_llm_timeout_s``) must not hold it."""
    return policy == "model" and not getattr(settings, "map_llm_url", None)
