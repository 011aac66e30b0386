"""Drive ``serve_tiny``'s fork server from tests: start server lives, wait for readiness, kill them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.reliability.serve_tiny import ADMIN_KEY

ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 120.0  # the fork server imports torch and the embedder: slow on a busy machine


@dataclass
class ServerLife:
    """One server process started by the fork server."""

    pid: int
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, key: str | None = ADMIN_KEY, timeout: float = 30.0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until ``/readyz`` answers 200; kills the server and raises with its log when it does not (a server
        left running would hold its port and its database locks, and slow every later test)."""
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.url, timeout=2.0) as c:
            while time.monotonic() < deadline:
                if not self.alive():
                    break
                try:
                    if c.get("/readyz").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
        if self.alive():
            self.kill()
        raise RuntimeError(f"server {self.pid} did not become ready:\n{self.log_text()[-4000:]}")

    def signal(self, sig: signal.Signals) -> None:
        os.kill(self.pid, sig)

    def wait_dead(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() > deadline:
                raise RuntimeError(f"server {self.pid} did not exit")
            time.sleep(0.01)

    def kill(self) -> None:
        """SIGKILL: no handler runs, nothing is flushed."""
        self.signal(signal.SIGKILL)
        self.wait_dead()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class ForkServer:
    """The ``serve_tiny`` process: built once, forks one server per life."""

    def __init__(self, log_dir: Path) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir = log_dir
        cmd = [sys.executable, "-m", "tests.reliability.serve_tiny", "--log-dir", str(log_dir)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "client")])}
        self._stderr = open(log_dir / "forkserver.log", "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._stderr, text=True, bufsize=1)
        self.fingerprint = self._expect("ready", READY_TIMEOUT_S)[1]

    def _expect(self, word: str, timeout: float) -> list[str]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            parts = line.split()
            if parts and parts[0] == word:
                return parts
        raise RuntimeError(f"fork server did not answer {word!r}: {(self.log_dir / 'forkserver.log').read_text()}")

    def start(self, data_dir: Path, database_url: str | None = None, ready: bool = True,
              env: dict[str, str] | None = None, **settings: Any) -> ServerLife:
        """Fork a new server life on ``data_dir`` (and wait until it is ready unless told not to); ``env`` is added
        to the life's environment."""
        assert self.proc.stdin is not None
        spec = {"data_dir": str(data_dir), "database_url": database_url, "settings": settings, "env": env or {}}
        self.proc.stdin.write(f"serve {json.dumps(spec)}\n")
        self.proc.stdin.flush()
        parts = self._expect("pid", 30.0)
        life = ServerLife(pid=int(parts[1]), port=int(parts[3]), log=self.log_dir / f"server-{parts[1]}.log")
        if ready:
            life.wait_ready()
        return life

    def maintain(self, data_dir: Path, bank: str, database_url: str | None = None) -> dict[str, Any]:
        """Run ``BankStore.maintain(bank)`` (orphan collection with no grace period) in a child process
        on ``data_dir`` while no server runs; returns its report."""
        out = self.log_dir / f"maintain-{time.monotonic_ns()}.json"
        assert self.proc.stdin is not None
        spec = {"data_dir": str(data_dir), "database_url": database_url, "maintain": {"bank": bank, "out": str(out)}}
        self.proc.stdin.write(f"serve {json.dumps(spec)}\n")
        self.proc.stdin.flush()
        parts = self._expect("pid", 30.0)
        life = ServerLife(pid=int(parts[1]), port=int(parts[3]), log=self.log_dir / f"server-{parts[1]}.log")
        life.wait_dead(120.0)
        if not out.exists():
            raise RuntimeError(f"maintenance failed:\n{life.log_text()[-4000:]}")
        return json.loads(out.read_text())

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write("exit\n")
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._stderr.close()




def results_path() -> Path:
    """Where measured figures go: a temp file, so a test run never rewrites a tracked file;
    ``KVRAG_RELIABILITY_RESULTS=bench/results/reliability.json`` regenerates the published one."""
    chosen = os.environ.get("KVRAG_RELIABILITY_RESULTS")
    return Path(chosen) if chosen else Path(tempfile.gettempdir()) / "kvrag-reliability.json"


def record_figures(section: str, figures: dict[str, Any]) -> None:
    """Merge one test's measured figures into :func:`results_path` (docs/RELIABILITY.md shows the tracked copy)."""
    results = results_path()
    results.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(results.read_text()) if results.exists() else {}
    data[section] = {**figures, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    results.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
