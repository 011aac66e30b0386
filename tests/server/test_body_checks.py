"""The request middleware's body checks against a real uvicorn server: JSON checks whatever the case of the
media type (issue 26, hole 10b), and an oversize body answered 413 that the client actually receives (10a)."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from tests.server_harness import LiveServer, live_server

BODY_LIMIT = 64 << 10
BANK = "bodies"


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, tiny_llm, embedder) -> Iterator[LiveServer]:
    with live_server("sqlite", tmp_path_factory.mktemp("bodies"), tiny_llm, embedder,
                     max_body_bytes=BODY_LIMIT) as server:
        with server.admin() as c:
            assert c.post("/v1/banks", json={"name": BANK}).status_code == 201
        yield server


def _error(r: Any, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    assert set(r.json()) == {"detail", "code", "request_id"} and r.json()["code"] == code


def _stored(live: LiveServer) -> int:
    return live.store.stats(BANK).documents


# Media types FastAPI parses as JSON (it lowercases them): the middleware must check them all.
JSON_TYPES = ["APPLICATION/JSON", "Application/Json", "application/json; charset=UTF-8",
              "APPLICATION/JSON;CHARSET=utf-8", "application/vnd.kvrag+JSON"]


@pytest.mark.parametrize("content_type", JSON_TYPES)
def test_any_case_of_a_json_media_type_gets_the_json_checks(live: LiveServer, content_type: str) -> None:
    with live.admin() as c:
        r = c.put(f"/v1/banks/{BANK}/documents/sur", content=b'{"text": "broken \\ud800 text"}',
                  headers={"Content-Type": content_type})
        _error(r, 400, "bad_request")
        deep = b'{"text": "x", "metadata": ' + b'{"n": ' * 40 + b"1" + b"}" * 40 + b"}"
        _error(c.put(f"/v1/banks/{BANK}/documents/deep", content=deep, headers={"Content-Type": content_type}),
               422, "validation_error")
    assert _stored(live) == 0


OVERSIZE = 8 << 20  # far beyond the limit and beyond what the kernel's socket buffers absorb


def _raw_request(live: LiveServer, head: str, body: Iterator[bytes]) -> tuple[bytes, str | None]:
    """Send a request over a plain socket, all of its body, then read the answer to the end;
    returns (answer, the socket error met on the way or None)."""
    host, port = live.url.removeprefix("http://").split(":")
    problem = None
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        try:
            sock.sendall(head.encode())
            for chunk in body:
                sock.sendall(chunk)
        except OSError as exc:
            problem = f"sending: {exc!r}"
        answer = b""
        try:
            while chunk := sock.recv(1 << 16):
                answer += chunk
        except OSError as exc:
            problem = (problem or "") + f" reading: {exc!r}"
    return answer, problem


def _plain(size: int) -> Iterator[bytes]:
    for start in range(0, size, 1 << 16):
        yield b"a" * min(1 << 16, size - start)


def _chunked(size: int) -> Iterator[bytes]:
    for piece in _plain(size):
        yield f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    yield b"0\r\n\r\n"


def _head(live: LiveServer, version: str, framing: str) -> str:
    return (f"PUT /v1/banks/{BANK}/documents/big {version}\r\nHost: {live.url.removeprefix('http://')}\r\n"
            f"Authorization: Bearer {live.settings.admin_key}\r\nContent-Type: application/json\r\n"
            f"Connection: close\r\n{framing}\r\n")


@pytest.mark.parametrize("framing", ["content-length", "chunked", "http/1.0", "expect-100"])
def test_an_oversize_body_is_answered_413_and_the_client_reads_it(live: LiveServer, framing: str) -> None:
    """The server answers 413, then reads (and drops) what the client still sends before it closes, as nginx
    does: closing with unread data in the socket resets the connection, and the client loses the answer."""
    if framing == "chunked":
        head, body = _head(live, "HTTP/1.1", "Transfer-Encoding: chunked\r\n"), _chunked(OVERSIZE)
    elif framing == "expect-100":  # the client waits for 100 Continue, which never comes: it sends no body
        head, body = _head(live, "HTTP/1.1", f"Content-Length: {OVERSIZE}\r\nExpect: 100-continue\r\n"), iter(())
    else:
        version = "HTTP/1.0" if framing == "http/1.0" else "HTTP/1.1"
        head, body = _head(live, version, f"Content-Length: {OVERSIZE}\r\n"), _plain(OVERSIZE)
    answer, problem = _raw_request(live, head, body)
    assert problem is None, problem
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.split()[1] == b"413", answer[:300]
    payload = json.loads(rest.partition(b"\r\n\r\n")[2])
    assert payload["code"] == "payload_too_large" and set(payload) == {"detail", "code", "request_id"}
    assert _stored(live) == 0


def test_httpx_closing_after_an_oversize_body_gets_the_413(live: LiveServer) -> None:
    with live.admin() as c:
        r = c.put(f"/v1/banks/{BANK}/documents/big", content=b"a" * OVERSIZE,
                  headers={"Content-Type": "application/json", "Connection": "close"})
    _error(r, 413, "payload_too_large")
    assert _stored(live) == 0
