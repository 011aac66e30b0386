"""The official ``openai`` package, unmodified, against a live kvrag server: plain and streamed chat
completions, models, and OpenAI-style errors with the right status."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

openai = pytest.importorskip("openai", reason="the OpenAI door tests need `openai` (pip install -e '.[dev]')")

from kvstore.model.loader import Embedder, LoadedModel  # noqa: E402
from tests.server_harness import LiveServer, live_server, make_key  # noqa: E402

DOCS = {
    "normans": "The Normans gave their name to Normandy, a region in France.",
    "paris": "Paris is the capital and most populous city of France. The Seine flows through it.",
}
ASK = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, tiny_llm: LoadedModel, embedder: Embedder) -> Iterator[LiveServer]:
    with live_server("sqlite", tmp_path_factory.mktemp("openai"), tiny_llm, embedder) as server:
        with server.admin() as admin:
            for bank in ("notes", "other"):
                assert admin.post("/v1/banks", json={"name": bank}).status_code == 201
            docs = [{"id": k, "text": v} for k, v in DOCS.items()]
            assert admin.post("/v1/banks/notes/documents", json={"documents": docs}).status_code == 200
        yield server


@pytest.fixture(scope="module")
def key(live: LiveServer) -> str:
    return make_key(live, role="read", banks=["notes"], name="chat")["key"]


def client(live: LiveServer, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key=key, max_retries=0, timeout=60)


def test_models_lists_the_banks_the_key_can_see(live: LiveServer, key: str) -> None:
    assert [m.id for m in client(live, key).models.list()] == ["kvrag:notes"]
    assert {m.id for m in client(live, live.settings.admin_key).models.list()} == {"kvrag:notes", "kvrag:other"}


def test_plain_completion(live: LiveServer, key: str) -> None:
    answer = client(live, key).chat.completions.create(model="kvrag:notes", messages=ASK, max_tokens=6,
                                                       temperature=0.2, top_p=0.9, seed=1, user="me",
                                                       extra_body={"k": 2, "some_future_field": True})
    assert answer.object == "chat.completion" and answer.model == "kvrag:notes" and answer.id.startswith("chatcmpl-")
    choice = answer.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    usage = answer.usage
    assert usage.completion_tokens <= 6 and usage.prompt_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    sources = answer.model_extra["kvrag"]["sources"]
    assert len(sources) == 2 and {s["doc_id"] for s in sources} <= set(DOCS)


def test_streamed_completion_matches_the_plain_one(live: LiveServer, key: str) -> None:
    oa = client(live, key)
    plain = oa.chat.completions.create(model="kvrag:notes", messages=ASK, max_completion_tokens=8)
    chunks = list(oa.chat.completions.create(model="kvrag:notes", messages=ASK, max_completion_tokens=8,
                                             stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == plain.choices[0].message.content
    finished = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finished == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_stream_ends_with_done(live: LiveServer, key: str) -> None:
    with httpx.Client(base_url=live.url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as http:
        r = http.post("/v1/chat/completions", json={"model": "kvrag:notes", "messages": ASK, "max_tokens": 3,
                                                    "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.text.strip().endswith("data: [DONE]")


def test_earlier_messages_are_context(live: LiveServer, key: str) -> None:
    oa = client(live, key)
    alone = oa.chat.completions.create(model="kvrag:notes", messages=ASK, max_tokens=1)
    conversation = [{"role": "system", "content": "Answer briefly."},
                    {"role": "user", "content": [{"type": "text", "text": "Tell me about Normandy."}]},
                    {"role": "assistant", "content": "It is a region in France."}, *ASK]
    with_history = oa.chat.completions.create(model="kvrag:notes", messages=conversation, max_tokens=1)
    assert with_history.usage.prompt_tokens > alone.usage.prompt_tokens


def test_stop_sequences_cut_the_answer(live: LiveServer, key: str) -> None:
    oa = client(live, key)
    full = oa.chat.completions.create(model="kvrag:notes", messages=ASK, max_tokens=12).choices[0].message.content
    if len(full) < 3:
        pytest.skip("the tiny model's answer is too short to cut")
    stop = full[1:3]
    cut = oa.chat.completions.create(model="kvrag:notes", messages=ASK, max_tokens=12, stop=[stop]).choices[0]
    assert cut.message.content == full[:full.find(stop)].strip() or cut.message.content == full[:full.find(stop)]
    assert cut.finish_reason == "stop"
    streamed = oa.chat.completions.create(model="kvrag:notes", messages=ASK, max_tokens=12, stop=stop, stream=True)
    assert stop not in "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)


def test_default_bank_setting(live: LiveServer, key: str) -> None:
    with pytest.raises(openai.NotFoundError):
        client(live, key).chat.completions.create(model="gpt-4o-mini", messages=ASK, max_tokens=1)
    live.settings.openai_default_bank = "notes"
    try:
        answer = client(live, key).chat.completions.create(model="gpt-4o-mini", messages=ASK, max_tokens=1)
        assert answer.model == "gpt-4o-mini" and answer.model_extra["kvrag"]["sources"]
    finally:
        live.settings.openai_default_bank = None


def error_of(exc: openai.APIStatusError) -> dict[str, Any]:
    body = exc.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "code", "param"}
    return body["error"]


@pytest.mark.parametrize(("model", "api_key", "status", "code"), [
    ("kvrag:missing", "key", 404, "model_not_found"),
    ("kvrag:other", "key", 404, "model_not_found"),  # outside the key's scope: indistinguishable from missing
    ("kvrag:notes", "kvr_not_a_real_key", 401, "unauthorized"),
])
def test_openai_errors(live: LiveServer, key: str, model: str, api_key: str, status: int, code: str) -> None:
    exc_class = {401: openai.AuthenticationError, 404: openai.NotFoundError}[status]
    with pytest.raises(exc_class) as caught:
        client(live, key if api_key == "key" else api_key).chat.completions.create(model=model, messages=ASK)
    assert caught.value.status_code == status and error_of(caught.value)["code"] == code


@pytest.mark.parametrize(("extra", "param"), [
    ({"n": 2}, "n"),
    ({"max_tokens": 10**6}, "max_tokens"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "messages"),
    ({"messages": []}, "messages"),
    ({"temperature": "hot"}, "temperature"),
])
def test_bad_parameters_are_400(live: LiveServer, key: str, extra: dict[str, Any], param: str) -> None:
    with httpx.Client(base_url=live.url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as http:
        r = http.post("/v1/chat/completions", json={"model": "kvrag:notes", "messages": ASK, **extra})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param


def test_unauthenticated_models_is_openai_401(live: LiveServer) -> None:
    with httpx.Client(base_url=live.url, timeout=30) as http:
        r = http.get("/v1/models")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
