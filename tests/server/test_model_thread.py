"""Torch runs on the model worker's threads only (issue 33).

A thread that once runs a parallel torch op keeps an OpenMP team of helper threads for as long as it lives. On a
2-core box one such team beyond the model worker's puts the OpenMP runtime over its core count, where it stops
spinning between parallel regions: every query's forward then took ~1.4x as long, until the request thread that
had created a bank (reading the codec calibration into tensors) happened to end (server.worker.ModelWorker).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

from tests.server_harness import live_server

REPO = Path(__file__).resolve().parents[2]
OURS = (str(REPO / "kvstore"), str(REPO / "server"))
TEXT = "The Normans were the people who gave their name to Normandy, a region in France."


class TorchOffWorker:
    """A profiler of new threads: each torch C function called, under our code, by a thread that is not the model
    worker's."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, frame: FrameType, event: str, arg: Any) -> None:
        if event != "c_call" or threading.current_thread().name.startswith("kvrag-model"):
            return
        owner = getattr(arg, "__self__", None)
        module = getattr(arg, "__module__", None) or (type(owner).__module__ if owner is not None else "")
        if not str(module).startswith("torch"):
            return
        caller: FrameType | None = frame
        while caller is not None:
            if caller.f_code.co_filename.startswith(OURS):
                self.calls.append(f"{threading.current_thread().name}: {getattr(arg, '__qualname__', arg)} "
                                  f"from {caller.f_code.co_filename}:{caller.f_lineno}")
                return
            caller = caller.f_back


@pytest.fixture
def torch_off_worker() -> Iterator[TorchOffWorker]:
    profiler = TorchOffWorker()
    threading.setprofile(profiler)  # threads started from here on: the server's loop, its request threads, the worker
    try:
        yield profiler
    finally:
        threading.setprofile(None)  # type: ignore[arg-type]  # typeshed lacks None; the stdlib documents it


def test_requests_run_torch_on_the_model_worker_only(tmp_path: Path, tiny_llm, embedder,
                                                     torch_off_worker: TorchOffWorker) -> None:
    assert sys.getprofile() is None  # the test's own thread is not profiled, only the server's
    with live_server("sqlite", tmp_path, tiny_llm, embedder) as live, live.admin() as c:
        assert c.post("/v1/banks", json={"name": "kb"}).status_code == 201
        assert c.patch("/v1/banks/kb", json={"codec": "int8"}).status_code == 200
        assert c.put("/v1/banks/kb/documents/normans", json={"text": TEXT}).status_code == 201
        assert c.get("/v1/banks/kb").json()["documents"] == 1
        assert c.get("/v1/banks/kb/documents/normans").json()["text"] == TEXT
        assert c.get("/v1/banks/kb/documents").status_code == 200
        assert c.post("/v1/banks/kb/search", json={"query": "Who were the Normans?", "k": 1}).json()["hits"]
        for mode in ("kv", "text"):
            r = c.post("/v1/banks/kb/query", json={"question": "Who were the Normans?", "k": 1, "mode": mode,
                                                  "max_new_tokens": 2})
            assert r.status_code == 200 and r.json()["sources"][0]["doc_id"] == "normans"
        assert c.delete("/v1/banks/kb/documents/normans").status_code == 204
        assert c.delete("/v1/banks/kb").status_code == 204
    assert torch_off_worker.calls == []


def test_bank_create_and_update_run_on_the_model_worker(tmp_path: Path, tiny_llm, embedder) -> None:
    """Choosing a codec reads the model's calibration into tensors: the tiny model has none, so the thread is
    checked directly."""
    threads: list[str] = []
    with live_server("sqlite", tmp_path, tiny_llm, embedder) as live, live.admin() as c:
        store = live.store
        create, update = store.create_bank, store.update_bank

        def create_here(*args: Any, **kwargs: Any) -> Any:
            threads.append(threading.current_thread().name)
            return create(*args, **kwargs)

        def update_here(*args: Any, **kwargs: Any) -> Any:
            threads.append(threading.current_thread().name)
            return update(*args, **kwargs)

        store.create_bank, store.update_bank = create_here, update_here  # type: ignore[method-assign]
        assert c.post("/v1/banks", json={"name": "kb"}).status_code == 201
        assert c.patch("/v1/banks/kb", json={"codec": "int8"}).status_code == 200
    assert len(threads) == 2 and all(name.startswith("kvrag-model") for name in threads), threads


def test_sessions_and_context_map_run_torch_on_the_model_worker_only(tmp_path: Path, tiny_llm, embedder,
                                                                     torch_off_worker: TorchOffWorker) -> None:
    segments = [{"role": "tool", "text": "The Normans gave their name to Normandy."},
                {"role": "note", "text": "Rollo was their first ruler."},
                {"role": "tool", "text": "Paris is the capital of France."}]
    with live_server("sqlite", tmp_path, tiny_llm, embedder, block_tokens=16) as live, live.admin() as c:
        assert c.post("/v1/banks", json={"name": "kb"}).status_code == 201
        assert c.put("/v1/banks/kb/documents/normans", json={"text": TEXT}).status_code == 201
        assert c.post("/v1/banks/kb/sessions", json={"session_id": "run"}).status_code == 201
        assert c.post("/v1/banks/kb/sessions/run/append", json={"segments": segments}).status_code == 200
        assert c.get("/v1/banks/kb/sessions/run").json()["tokens"] > 0
        assert c.post("/v1/banks/kb/sessions/run/brief", json={"task": "Who?", "max_new_tokens": 2}).status_code == 200
        # the attention policy needs no model and runs off the worker, as a restore does: neither may run torch
        pruned = c.post("/v1/banks/kb/sessions/run/prune", json={"policy": "attention", "threshold": 1.0}).json()
        assert pruned["pruned"] and pruned["tokens_after"] < pruned["tokens_before"]
        assert c.post("/v1/banks/kb/sessions/run/restore", json={}).json()["restored"] == pruned["pruned"]
        assert c.get("/v1/banks/kb/context-map").json()["items"]
    assert torch_off_worker.calls == []
