"""A real HTTP server and a real browser for tests and benchmarks (never imported by the service).

Here rather than under tests/ so that ``bench/`` can serve an app and drive a browser without importing tests.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import uvicorn
from fastapi import FastAPI

from kvstore.bank import BankStore

from .settings import ServerSettings

if TYPE_CHECKING:
    from playwright.sync_api import Browser

MISSING_CHROMIUM = "Debian's chromium is missing: `sh scripts/install-browser.sh` (run by `make install`)"


@dataclass
class LiveServer:
    url: str
    app: FastAPI

    @property
    def settings(self) -> ServerSettings:
        return self.app.state.settings

    @property
    def store(self) -> BankStore:
        return self.app.state.store

    def client(self, key: str | None = None, **kwargs: Any) -> httpx.Client:
        """A client sending ``key`` as a bearer token (none when ``key`` is None)."""
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30.0, **kwargs)

    def admin(self) -> httpx.Client:
        return self.client(self.settings.admin_key)


@contextmanager
def serve(app: FastAPI) -> Iterator[LiveServer]:
    """Run ``app`` on 127.0.0.1:<free port> until the block ends."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield LiveServer(url=f"http://127.0.0.1:{port}", app=app)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@contextmanager
def chromium() -> Iterator[Browser]:
    """A headless Debian chromium for the block; FileNotFoundError naming the install command when absent."""
    if not CHROMIUM.exists():
        raise FileNotFoundError(MISSING_CHROMIUM)
    from playwright.sync_api import sync_playwright  # a dev dependency: imported only when a browser is wanted

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()
