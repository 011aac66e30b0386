"""A TCP proxy in front of a real server that forwards a chosen request, waits for the server's whole answer
(so the write has committed), then closes the client's connection instead of passing the answer on: what a
client sees when a load balancer or the network drops an answer."""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass, field


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    dropped: bool


def _read_until(sock: socket.socket, buf: bytearray, marker: bytes) -> bool:
    while marker not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            return False
        buf += chunk
    return True


def _read_exact(sock: socket.socket, buf: bytearray, size: int) -> bool:
    while len(buf) < size:
        chunk = sock.recv(65536)
        if not chunk:
            return False
        buf += chunk
    return True


def read_message(sock: socket.socket, buf: bytearray, response: bool = False) -> bytes | None:
    """One HTTP/1.1 message (Content-Length or chunked body) from ``sock``; ``buf`` keeps what follows it."""
    if not _read_until(sock, buf, b"\r\n\r\n"):
        return None
    head_end = buf.index(b"\r\n\r\n") + 4
    head = bytes(buf[:head_end]).decode("latin-1")
    headers = {line.split(":", 1)[0].strip().lower(): line.split(":", 1)[1].strip()
               for line in head.split("\r\n")[1:] if ":" in line}
    status = head.split(" ", 2)[1] if response else ""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        end = head_end
        while True:
            if not _read_line_from(sock, buf, end):
                return None
            line_end = buf.index(b"\r\n", end)
            size = int(bytes(buf[end:line_end]).split(b";")[0], 16)
            end = line_end + 2 + size + 2
            if not _read_exact(sock, buf, end):
                return None
            if size == 0:
                break
    else:
        length = 0 if status in ("204", "304") else int(headers.get("content-length", "0"))
        end = head_end + length
        if not _read_exact(sock, buf, end):
            return None
    message = bytes(buf[:end])
    del buf[:end]
    return message


def _read_line_from(sock: socket.socket, buf: bytearray, start: int) -> bool:
    while b"\r\n" not in buf[start:]:
        chunk = sock.recv(65536)
        if not chunk:
            return False
        buf += chunk
    return True


@dataclass
class DroppingProxy:
    """Forwards to ``upstream`` (host, port); the first answer to each (method, path suffix) in ``drop`` is lost."""

    upstream: tuple[str, int]
    drop: set[tuple[str, str]] = field(default_factory=set)
    seen: list[Seen] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._lock = threading.Lock()
        self._closed = False
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _take_drop(self, method: str, path: str) -> bool:
        with self._lock:
            for rule in list(self.drop):
                if method == rule[0] and path.split("?", 1)[0].endswith(rule[1]):
                    self.drop.discard(rule)
                    return True
        return False

    def _serve(self, client: socket.socket) -> None:
        upstream = socket.create_connection(self.upstream)
        from_client, from_server = bytearray(), bytearray()
        try:
            while True:
                request = read_message(client, from_client)
                if request is None:
                    return
                lines = request.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
                method, path = lines[0].split(" ")[:2]
                headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ":" in ln)}
                dropped = self._take_drop(method, path)
                with self._lock:
                    self.seen.append(Seen(method, path, headers, dropped))
                upstream.sendall(request)
                answer = read_message(upstream, from_server, response=True)
                if answer is None or dropped:
                    return  # the server answered (the write committed); the client never hears it
                client.sendall(answer)
        finally:
            client.close()
            upstream.close()

    def requests(self, method: str, suffix: str) -> list[Seen]:
        return [s for s in self.seen if s.method == method and s.path.split("?", 1)[0].endswith(suffix)]

    def close(self) -> None:
        self._closed = True
        self._listener.close()
