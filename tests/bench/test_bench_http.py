"""The HTTP benchmarks' client side (bench/live.py, bench/load.py) against a real server on the tiny model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.live import LiveServer, ingest_http, streamed_query
from bench.load import run_point, summarise
from bench.squad import BANK, Question
from bench.ttft_http import measure_server
from kvstore.model.loader import Embedder, LoadedModel
from tests.server_harness import ADMIN_KEY, live_server

PARAGRAPHS = ["The Normans gave their name to Normandy, a region in France.",
              "Paris is the capital of France. The Seine flows through it."]
QUESTIONS = [Question(qid=str(i), text=t, answers=("x",), paragraph=0)
             for i, t in enumerate(["Who gave their name to Normandy?", "What flows through Paris?"])]


def test_streamed_queries_and_a_load_point(tmp_path: Path, tiny_llm: LoadedModel, embedder: Embedder) -> None:
    with live_server("sqlite", tmp_path, tiny_llm, embedder) as live:
        server = LiveServer(url=live.url, key=ADMIN_KEY, log=tmp_path / "unused.log")
        ingest_http(server, PARAGRAPHS)
        assert live.store.stats(BANK).documents == 2
        with server.client() as c:
            for mode in ("kv", "text"):
                got = streamed_query(c, QUESTIONS[0].text, k=2, mode=mode, max_new_tokens=2)
                assert 0 < got.ttft_ms <= got.total_ms
                assert got.server["mode"] == mode and got.server["usage"]["context_tokens"] > 0
                assert got.server["timings"]["ttft_ms"] <= got.ttft_ms  # the server's clock starts later
        point = run_point(server, "kv", "on", clients=3, questions=QUESTIONS, queries=5, duration_s=60,
                          max_new_tokens=2)
    row = summarise(point)
    assert row["answered"] == 5 and row["errors"] == {}
    assert row["qps"] > 0 and 0 < row["p50_ms"] <= row["p99_ms"]


def test_each_floor_is_timed_right_after_its_warm_question(tmp_path: Path, tiny_llm: LoadedModel,
                                                            embedder: Embedder) -> None:
    """The floor meets the box in the warm rows' state: after each warm question, over the blocks its first touch
    used (issue 33)."""
    floors: list[tuple[str, list[str]]] = []

    def floor(q: Question, sources: list[str]) -> dict[str, Any]:
        floors.append((q.qid, list(sources)))
        return {"variant": "floor: question forward, in process", "qid": q.qid, "ttft_ms": 1.0}

    with live_server("sqlite", tmp_path, tiny_llm, embedder) as live:
        server = LiveServer(url=live.url, key=ADMIN_KEY, log=tmp_path / "unused.log")
        ingest_http(server, PARAGRAPHS)
        samples = measure_server(server, QUESTIONS, floor=floor)
    order = [(s["variant"], s["qid"]) for s in samples]
    assert order == [("kv, first touch", "0"), ("text, first touch", "0"), ("kv, first touch", "1"),
                     ("text, first touch", "1"), ("kv, warm", "0"), ("text, warm", "0"),
                     ("floor: question forward, in process", "0"), ("kv, warm", "1"), ("text, warm", "1"),
                     ("floor: question forward, in process", "1")]
    first = {s["qid"]: s["sources"] for s in samples if s["variant"] == "kv, first touch"}
    assert floors == [("0", first["0"]), ("1", first["1"])] and all(first.values())
