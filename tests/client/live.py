"""A real kvrag server (uvicorn, a background thread, a free loopback port) over a tiny-model store, for the
SDK, CLI and MCP tests; ``running`` starts one and stops it when the block ends."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import uvicorn

from kvstore.bank import BankStore
from server.app import create_app

ADMIN = "root-secret-for-sdk-tests"


@dataclass
class Live:
    url: str
    store: BankStore
    admin_key: str | None


@contextmanager
def running(store: BankStore) -> Iterator[Live]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(store.settings, store=store), log_level="warning",
                                           lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield Live(f"http://127.0.0.1:{sock.getsockname()[1]}", store, store.settings.admin_key)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture
def live(make_store: Callable[..., BankStore]) -> Iterator[Live]:
    """A server in open mode (no admin key) over a fresh tiny-model store."""
    with running(make_store()) as server:
        yield server
