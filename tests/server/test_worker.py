"""Where the model worker runs its calls: one long-lived primary thread, short-lived threads only for calls that
arrive while it is busy (issue 33: every thread that does model work keeps an OpenMP team of its own)."""

from __future__ import annotations

import asyncio
import gc
import os
import threading
from typing import Any

import torch

from server.worker import ModelWorker


def _threads_in_process() -> int:
    return len(os.listdir("/proc/self/task"))


def test_calls_one_at_a_time_all_run_on_the_primary_thread() -> None:
    async def scenario() -> list[int]:
        worker = ModelWorker(queue_size=4, threads=4)
        try:
            return [await worker.run(threading.get_ident) for _ in range(5)]
        finally:
            worker.shutdown()

    idents = asyncio.run(scenario())
    assert len(set(idents)) == 1 and idents[0] != threading.get_ident()


def test_a_call_arriving_while_the_primary_is_busy_gets_a_thread_that_ends_with_it() -> None:
    async def scenario() -> None:
        worker = ModelWorker(queue_size=4, threads=2)
        gate = threading.Event()
        entered = threading.Event()
        primary_ident = await worker.run(threading.get_ident)

        def hold() -> int:
            entered.set()
            with worker.released():  # as a batched question waits for its batch: the turn is free meanwhile
                gate.wait(5)
            return threading.get_ident()

        def model_work() -> tuple[int, str]:
            # Parallel torch work: this thread's OpenMP team of helpers is created here.
            torch.ones(512, 512) @ torch.ones(512, 512)
            return threading.get_ident(), threading.current_thread().name

        held = worker.submit(hold)
        await asyncio.to_thread(entered.wait, 5)
        before = _threads_in_process()
        ident, name = await worker.run(model_work)
        assert ident != primary_ident and name == "kvrag-model-overflow"
        third = worker.submit(threading.get_ident)  # the one extra slot is free again: it ran and ended
        assert await third != primary_ident
        for _ in range(100):  # the overflow threads, and the OpenMP helpers they started, are gone
            if _threads_in_process() <= before:
                break
            await asyncio.sleep(0.02)
        assert _threads_in_process() <= before
        gate.set()
        assert await held == primary_ident
        worker.shutdown()

    asyncio.run(scenario())


def test_with_every_thread_busy_a_call_queues_behind_the_primary() -> None:
    async def scenario() -> None:
        worker = ModelWorker(queue_size=4, threads=2)
        gate = threading.Event()
        started = threading.Semaphore(0)
        primary_ident = await worker.run(threading.get_ident)

        def hold() -> int:
            started.release()
            with worker.released():
                gate.wait(5)
            return threading.get_ident()

        first = worker.submit(hold)  # the primary
        await asyncio.to_thread(started.acquire)
        second = worker.submit(hold)  # the only overflow slot
        await asyncio.to_thread(started.acquire)
        third = worker.submit(threading.get_ident)  # no slot left: behind the first call, on the primary
        await asyncio.sleep(0.05)
        assert not third.done() and worker.waiting == 1
        gate.set()
        assert await first == primary_ident and await second != primary_ident
        assert await third == primary_ident
        worker.shutdown()

    asyncio.run(scenario())


def test_the_server_loads_its_store_on_the_thread_that_answers_its_calls(tmp_path, tiny_llm, embedder,
                                                                        monkeypatch) -> None:
    """The store's model work at startup (the prefix's prefill, the embedder) runs where the queries will, so the
    process keeps one OpenMP team; what startup made is kept out of the garbage collector's full collections."""
    from kvstore.bank import BankStore
    from server import app as app_module
    from server.app import create_app
    from server.settings import ServerSettings
    from tests.server_harness import serve

    threads: dict[str, int] = {}

    def store(settings: ServerSettings, **wiring: Any) -> BankStore:
        threads["load"] = threading.get_ident()
        built = BankStore(settings, llm=tiny_llm, embedder=embedder, **wiring)
        search = built.search

        def recorded(*args: Any, **kwargs: Any) -> Any:
            threads["search"] = threading.get_ident()
            return search(*args, **kwargs)

        built.search = recorded  # type: ignore[method-assign]
        return built

    monkeypatch.setattr(app_module, "BankStore", store)
    gc.unfreeze()
    with serve(create_app(ServerSettings(data_dir=tmp_path, admin_key="root-key"))) as live, \
            live.client("root-key") as c:
        for _ in range(300):
            if c.get("/readyz").status_code == 200:
                break
            threading.Event().wait(0.05)
        assert c.post("/v1/banks", json={"name": "kb"}).status_code == 201
        assert c.post("/v1/banks/kb/search", json={"query": "anything", "k": 1}).status_code == 200
        assert gc.get_freeze_count() > 0
    gc.unfreeze()
    assert threads["load"] == threads["search"] != threading.get_ident()
