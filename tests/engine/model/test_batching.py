"""Batched questions (kvstore.model.batching): every row answers as it would alone, on any RoPE decoder."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from kvstore.model.batching import BatchRequest, QuestionBatcher, answer_alone, answer_batch, prefill_batch
from kvstore.model.compaction import prefill_attention
from kvstore.model.loader import Embedder, LoadedModel
from kvstore.model.runner import Runner
from tests.conftest import build_tiny
from tests.server_harness import LiveServer, live_server, sse_events

FAMILIES = ("llama", "qwen2")


@pytest.fixture(scope="module", params=FAMILIES)
def runner(request: pytest.FixtureRequest) -> Runner:
    return Runner(build_tiny(request.param), "You answer from the passages.")


def _requests(runner: Runner, seed: int = 0, record: bool = False) -> list[BatchRequest]:
    """Contexts of 0 to 3 blocks of different lengths, questions of different lengths, different budgets."""
    gen = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(5, 600, (n,), generator=gen).tolist()

    shapes = [([], 3, 6), ([17], 9, 4), ([30, 11], 5, 8), ([7, 25, 19], 12, 1)]  # blocks, question, max_new
    return [BatchRequest(runner.encode([ids(n) for n in blocks]) if blocks else [], ids(q), max_new, record=record)
            for blocks, q, max_new in shapes]


def test_first_token_logits_equal_alone(runner: Runner) -> None:
    requests = _requests(runner)
    batch = prefill_batch(runner, requests)
    for row, r in enumerate(requests):
        ctx = runner.assemble(r.blocks)
        alone = runner.logits(ctx, r.question_ids)[-1]
        assert batch.context_tokens[row] == ctx.context_tokens
        torch.testing.assert_close(batch.logits[row].float(), alone, atol=1e-4, rtol=1e-4)


def test_greedy_answers_equal_alone(runner: Runner) -> None:
    requests = _requests(runner, seed=1)
    batched = answer_batch(runner, requests)
    for r, got in zip(requests, batched, strict=True):
        alone = answer_alone(runner, r)
        assert got.generation.token_ids == alone.generation.token_ids
        assert len(got.generation.token_ids) == r.max_new_tokens  # rows stop at their own budget
        assert got.generation.text == alone.generation.text
        assert got.batch_size == len(requests)


def test_rows_stop_at_eos_independently(runner: Runner) -> None:
    requests = _requests(runner, seed=2)
    first = [answer_alone(runner, r).generation.token_ids for r in requests]
    stop = first[2][1]  # the third row's second token ends it; the others go on unless they meet it too
    runner.stop_ids.add(stop)
    try:
        batched = answer_batch(runner, requests)
        for r, got in zip(requests, batched, strict=True):
            assert got.generation.token_ids == answer_alone(runner, r).generation.token_ids
        assert batched[2].generation.token_ids == first[2][:1]
    finally:
        runner.stop_ids.discard(stop)


def test_streamed_pieces_add_up_to_each_answer(runner: Runner) -> None:
    pieces: list[list[str]] = [[] for _ in range(3)]
    requests = _requests(runner, seed=3)[1:]
    for i, r in enumerate(requests):
        r.on_token = pieces[i].append
    for i, got in enumerate(answer_batch(runner, requests)):
        assert "".join(pieces[i]).strip() == got.generation.text


def test_recorded_votes_equal_alone(runner: Runner) -> None:
    requests = _requests(runner, seed=4, record=True)[1:]
    batched = answer_batch(runner, requests)
    for r, got in zip(requests, batched, strict=True):
        ctx = runner.assemble(r.blocks)
        with prefill_attention(runner, ctx) as recorded:
            runner.generate(ctx, r.question_ids, 1)
        alone = recorded()
        votes = got.votes()
        assert alone is not None and votes is not None
        torch.testing.assert_close(votes, alone, atol=1e-5, rtol=1e-4)


def test_batcher_runs_a_lone_request_at_once_and_batches_the_waiting(runner: Runner) -> None:
    lock = threading.Lock()
    batcher = QuestionBatcher(runner, lock, max_batch=8)
    requests = _requests(runner, seed=5)
    expected = [answer_alone(runner, r).generation.token_ids for r in requests]
    assert batcher.answer(requests[0]).batch_size == 1  # the model was free: no wait for company
    results: dict[int, list[int]] = {}
    sizes: dict[int, int] = {}

    def ask(i: int) -> None:
        got = batcher.answer(requests[i])
        results[i], sizes[i] = got.generation.token_ids, got.batch_size

    # The model is busy: all four queue up and run as one batch once it is free.
    _queue_behind_busy_model(batcher, lock, [lambda i=i: ask(i) for i in range(len(requests))])
    assert results == dict(enumerate(expected))
    assert set(sizes.values()) == {len(requests)}
    assert batcher.stats.largest == len(requests)


def _queue_behind_busy_model(batcher: QuestionBatcher, lock: threading.Lock, asks: list[Callable[[], object]],
                             wait_s: float = 10, join_s: float = 30) -> None:
    """Run ``asks`` on threads while ``lock`` (the model) is held until all of them wait in the batcher, then
    let the model go and wait for every answer."""
    with lock:
        threads = [threading.Thread(target=ask) for ask in asks]
        for t in threads:
            t.start()
        deadline = time.monotonic() + wait_s
        while len(batcher._pending) < len(asks) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(batcher._pending) == len(asks)
    for t in threads:
        t.join(join_s)


def test_batcher_respects_the_max_batch_size(runner: Runner) -> None:
    lock = threading.Lock()
    batcher = QuestionBatcher(runner, lock, max_batch=2)
    requests = _requests(runner, seed=6)
    sizes: list[int] = []
    _queue_behind_busy_model(batcher, lock, [lambda r=r: sizes.append(batcher.answer(r).batch_size) for r in requests])
    assert sorted(sizes) == [2, 2, 2, 2]


@pytest.mark.parametrize(("kind", "overrides"), [
    ("gemma3_text", {"sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"], "head_dim": 16}),
    ("mistral", {"sliding_window": 8}),  # no per-layer types: the configured window is enough
])
def test_sliding_window_models_do_not_batch(kind: str, overrides: dict[str, object]) -> None:
    runner = Runner(build_tiny(kind, **overrides), "You answer from the passages.")
    assert not QuestionBatcher(runner, threading.Lock(), max_batch=8).enabled


PASSAGES = {
    "normans": "The Normans were the people who in the 10th and 11th centuries gave their name to Normandy.",
    "paris": "Paris is the capital and most populous city of France, on the Seine river.",
    "photo": "Photosynthesis is the process by which plants turn light, water and carbon dioxide into sugar.",
    "alps": "The Alps are the highest and most extensive mountain range lying entirely in Europe.",
}
QUESTIONS = [("Who were the Normans?", 1, 5, False), ("What is the capital of France?", 2, 3, True),
             ("How do plants make sugar?", 3, 6, False), ("Which mountains are the highest in Europe?", 2, 4, True)]


def _ask(live: LiveServer, question: str, k: int, max_new: int, stream: bool) -> dict[str, Any]:
    body = {"question": question, "k": k, "max_new_tokens": max_new, "stream": stream}
    with live.admin() as c:
        if not stream:
            r = c.post("/v1/banks/batch/query", json=body)
            assert r.status_code == 200, r.text
            return r.json()
        with c.stream("POST", "/v1/banks/batch/query", json=body) as r:
            assert r.status_code == 200
            events = sse_events(r.read().decode())
    assert events[-1][0] == "done" and {e for e, _ in events[:-1]} <= {"token"}
    done: dict[str, Any] = json.loads(events[-1][1])
    assert "".join(json.loads(d)["text"] for e, d in events if e == "token").strip() == done["answer"]
    return done


def _bank_of_passages(live: LiveServer) -> None:
    with live.admin() as c:
        c.post("/v1/banks", json={"name": "batch"}).raise_for_status()
        for doc_id, text in PASSAGES.items():
            c.put(f"/v1/banks/batch/documents/{doc_id}", json={"text": text}).raise_for_status()


def test_concurrent_http_queries_are_batched_and_answer_as_alone(tmp_path: Path, tiny_llm: LoadedModel,
                                                                  embedder: Embedder) -> None:
    with live_server("sqlite", tmp_path, tiny_llm, embedder, batch_max_size=8) as live:
        _bank_of_passages(live)
        alone = [_ask(live, *q) for q in QUESTIONS]  # one at a time: each runs alone
        store = live.store
        assert store.batcher.stats.largest == 1
        answers: dict[int, dict[str, Any]] = {}
        # The model is busy: the queries retrieve, load and queue for one batch.
        asks = [lambda i=i, q=q: answers.__setitem__(i, _ask(live, *q)) for i, q in enumerate(QUESTIONS)]
        _queue_behind_busy_model(store.batcher, store.model_lock, asks, wait_s=30, join_s=60)
        assert store.batcher.stats.largest == len(QUESTIONS)
        with live.admin() as c:
            metrics = c.get("/metrics").text
        assert f"kvrag_question_batch_largest {float(len(QUESTIONS))}" in metrics
        assert f"kvrag_question_batch_requests_total {float(2 * len(QUESTIONS))}" in metrics
        assert f"kvrag_question_batches_total {float(len(QUESTIONS) + 1)}" in metrics
        for i, before in enumerate(alone):
            got = answers[i]
            assert got["answer"] == before["answer"]
            assert got["usage"] == before["usage"]
            assert [s["doc_id"] for s in got["sources"]] == [s["doc_id"] for s in before["sources"]]
            assert 0 < got["timings"]["ttft_ms"] <= got["timings"]["total_ms"]


def test_more_waiting_queries_than_catalog_connections_all_reach_the_batcher(tmp_path: Path, tiny_llm: LoadedModel,
                                                                             embedder: Embedder) -> None:
    """A query waiting for its batch holds no catalog connection: 16 of them outnumber SQLite's pool (5 + 10)."""
    with live_server("sqlite", tmp_path, tiny_llm, embedder, batch_max_size=8) as live:
        _bank_of_passages(live)
        store, n = live.store, 16
        answers: list[dict[str, Any]] = []
        asks = [lambda q=QUESTIONS[i % len(QUESTIONS)]: answers.append(_ask(live, *q)) for i in range(n)]
        _queue_behind_busy_model(store.batcher, store.model_lock, asks, wait_s=60, join_s=60)
        assert len(answers) == n
        assert store.batcher.stats.largest == 8
