"""A real kvrag server for the HTTP benchmarks: ``kvrag serve`` in a subprocess on a free loopback port.

Embedded defaults (SQLite in a temporary data dir, packaged SmolLM2 + MiniLM), an admin key of its own,
and ``KVRAG_TORCH_THREADS`` as the benchmark asks. The SQuAD paragraphs go in through the HTTP API.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from bench.squad import BANK, REPO_ROOT

READY_TIMEOUT_S = 300.0  # the first start converts the packaged GGUF (~30 s, minutes on a loaded box)


@dataclass(frozen=True)
class LiveServer:
    """A started server: where it listens and the key that may do anything."""

    url: str
    key: str
    log: Path

    def client(self, timeout: float = 600.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.key}"}, timeout=timeout)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_ready(proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    with httpx.Client(base_url=url, timeout=2.0) as c:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if c.get("/readyz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
    raise RuntimeError(f"kvrag serve did not become ready (exit {proc.poll()}):\n{log.read_text()[-4000:]}")


@contextmanager
def live_server(threads: int | None, root: Path | None = None, **settings: Any) -> Iterator[LiveServer]:
    """``kvrag serve`` with ``KVRAG_<NAME>`` for each keyword; stopped with SIGTERM (graceful) at the end.
    ``threads`` None: the server's own default (what ``make serve`` gets), nothing set. ``root``: serve another
    checkout's code (e.g. a git worktree of an older commit) with this venv, for a before/after in one run."""
    with tempfile.TemporaryDirectory(prefix="kvrag-bench-live-") as tmp:
        port, key = _free_port(), secrets.token_urlsafe(24)
        env = {**os.environ, "KVRAG_DATA_DIR": str(Path(tmp) / "data"), "KVRAG_ADMIN_KEY": key,
               "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
        if threads is not None:
            env.update(KVRAG_TORCH_THREADS=str(threads), OMP_NUM_THREADS=str(max(threads, 1)))
        env.update({f"KVRAG_{name.upper()}": str(value) for name, value in settings.items()})
        if root is not None:
            env["PYTHONPATH"] = os.pathsep.join([str(root), str(root / "client")])
        log = Path(tmp) / "server.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "kvrag.cli", "serve", "--port", str(port)],
                                    cwd=root or REPO_ROOT,
                                    env=env, stdout=out, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_ready(proc, url, log)
            yield LiveServer(url=url, key=key, log=log)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def ingest_http(server: LiveServer, paragraphs: Sequence[str], bank: str = BANK) -> None:
    """Create ``bank`` and PUT every paragraph as its own document through the API."""
    with server.client() as c:
        c.post("/v1/banks", json={"name": bank}).raise_for_status()
        for i, text in enumerate(tqdm(paragraphs, desc="ingest (HTTP)", unit="doc")):
            c.put(f"/v1/banks/{bank}/documents/p{i:03d}", json={"text": text}).raise_for_status()


@dataclass
class StreamedQuery:
    """One streamed query timed by the client: first token event and the end of the stream."""

    ttft_ms: float  # request sent -> first `token` event (or `done`, when the first token was the end)
    total_ms: float
    server: dict[str, Any]  # the `done` event's answer: timings and usage as the server measured them


def streamed_query(client: httpx.Client, question: str, bank: str = BANK, **body: Any) -> StreamedQuery:
    """POST a streamed query and time it from the client's side."""
    t0 = time.perf_counter()
    first: float | None = None
    event = ""
    done: dict[str, Any] = {}
    with client.stream("POST", f"/v1/banks/{bank}/query", json={"question": question, "stream": True, **body}) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
                if first is None and event in ("token", "done"):
                    first = time.perf_counter()
            elif line.startswith("data: ") and event == "done":
                done = json.loads(line[6:])
            elif line.startswith("data: ") and event == "error":
                raise RuntimeError(f"query failed: {line[6:]}")
    end = time.perf_counter()
    return StreamedQuery(ttft_ms=((first or end) - t0) * 1000, total_ms=(end - t0) * 1000, server=done)
