"""Issue 26 hole 1, server side: a path with a dot segment is refused before routing (400, error shape) and
changes nothing, whatever the client or a proxy in front would have made of it."""

from __future__ import annotations

import http.client
import json
from urllib.parse import urlsplit

import pytest
from kvrag_client import KVRag

from server.path_guard import has_dot_segment
from tests.client.live import Live, live  # noqa: F401 - the fixture, by name

RAW_PATHS = [
    "/v1/banks/notes/documents/..",
    "/v1/banks/notes/documents/.",
    "/v1/banks/notes/documents/%2e%2e",
    "/v1/banks/notes/documents/%2E%2e",
    "/v1/banks/notes/documents/keep/../..",
    "/v1/banks/notes/sessions/..",
    "/v1/banks/notes/sessions/run-1/%2e%2e/..",
    "/v1/banks/notes/documents/a%2f..%2f..",
    "/v1/banks/notes/./documents/keep",
    "/mcp/..",
]


def _raw(server: Live, method: str, path: str) -> tuple[int, dict[str, object]]:
    """Send ``path`` byte for byte (http.client does not resolve dot segments; httpx would)."""
    url = urlsplit(server.url)
    conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=30)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        conn.putheader("Content-Length", "0")
        conn.endheaders()
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        conn.close()


@pytest.mark.parametrize("path", RAW_PATHS)
def test_raw_dot_segment_paths_are_refused_and_change_nothing(live: Live, path: str) -> None:  # noqa: F811
    with KVRag(live.url) as kv:
        kv.banks.create("notes")
        kv.documents.put("notes", "keep", "The Normans gave their name to Normandy.")
        kv.sessions.create("notes", "run-1")
        for method in ("DELETE", "GET", "PATCH"):
            status, body = _raw(live, method, path)
            assert status == 400, (method, path, status, body)
            assert body["code"] == "bad_request" and "segment" in str(body["detail"]) and body["request_id"]
        assert [b.name for b in kv.banks.list()] == ["notes"]
        assert [d.doc_id for d in kv.documents.list("notes")] == ["keep"]
        assert kv.sessions.get("notes", "run-1").session_id == "run-1"


def test_dot_segment_detection() -> None:
    for path in RAW_PATHS:
        assert has_dot_segment(path), path
    for path in ("/v1/banks/notes/documents/a.b", "/v1/banks/notes/documents/...", "/v1/banks/n/documents/.x",
                 "/v1/banks/notes/documents/x..", "/healthz", "/"):
        assert not has_dot_segment(path), path
