"""A remote prune judge never holds the model worker during its network call (issue 26, hole 10j).

With ``KVRAG_MAP_LLM_URL`` set, a ``model`` prune asks that endpoint which segments are still needed. The call
may take up to ``map_llm_timeout_s``; it used to run on the one model worker, so every query, append and brief
of every tenant waited behind it. Here the judge takes 3 s to answer: a query sent meanwhile is answered at once,
and the prune still applies the judge's reply.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from kvstore.model.loader import Embedder, LoadedModel
from tests.server_harness import LiveServer, live_server, make_key

JUDGE_DELAY_S = 3.0


class _SlowJudge(BaseHTTPRequestHandler):
    """An OpenAI-compatible endpoint that thinks for a while, then keeps segment 0."""

    def do_POST(self) -> None:  # noqa: N802 - the http.server API
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        time.sleep(JUDGE_DELAY_S)
        body = json.dumps({"choices": [{"message": {"content": '{"needed": [0]}'}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture(scope="module")
def judge_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _SlowJudge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, tiny_llm: LoadedModel, embedder: Embedder,
         judge_url: str) -> Iterator[LiveServer]:
    with live_server("sqlite", tmp_path_factory.mktemp("judge"), tiny_llm, embedder, map_llm_url=judge_url,
                     map_llm_timeout_s=30.0) as server:
        with server.admin() as c:
            assert c.post("/v1/banks", json={"name": "kb"}).status_code == 201
            assert c.put("/v1/banks/kb/documents/d", json={"text": "Paris is the capital of France."}).status_code in (
                200, 201)
        yield server


def test_a_query_is_answered_while_the_remote_judge_thinks(live: LiveServer) -> None:
    key = make_key(live, banks=["kb"], agent="agent-a")["key"]
    with live.client(key) as c:
        assert c.post("/v1/banks/kb/sessions", json={"session_id": "s"}).status_code == 201
        segments = [{"role": "tool", "text": "The build failed."}, {"role": "note", "text": "Retry with -j1."}]
        assert c.post("/v1/banks/kb/sessions/s/append", json={"segments": segments}).status_code == 200
        c.post("/v1/banks/kb/query", json={"question": "What is the capital?", "max_new_tokens": 2})  # warm up

    pruned: dict[str, object] = {}

    def prune() -> None:
        with live.client(key) as pc:
            r = pc.post("/v1/banks/kb/sessions/s/prune", json={"policy": "model", "goal": "finish the build"})
            pruned["status"], pruned["body"] = r.status_code, r.json()

    t0 = time.perf_counter()
    worker = threading.Thread(target=prune)
    worker.start()
    time.sleep(0.5)  # the prune is waiting for the judge now
    with live.client(key) as c:
        r = c.post("/v1/banks/kb/query", json={"question": "What is the capital?", "max_new_tokens": 2})
        answered_after = time.perf_counter() - t0
    assert r.status_code == 200, r.text
    worker.join(timeout=30)
    assert answered_after < JUDGE_DELAY_S - 0.5, f"the query waited {answered_after:.2f} s behind the judge"
    assert pruned["status"] == 200, pruned
    body = pruned["body"]
    assert isinstance(body, dict) and body["pruned"] == [1] and body["needed"] == [0] and body["error"] is None
