"""What the server tells a client about its failures names no credential and no server path (issue 26,
hole 10d): the map LLM's URL (with user:password and a query token) in context-map refresh reports, a blob
path in a block that cannot be rebuilt. The full detail stays in the server log."""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from sqlalchemy import select

from kvstore.storage.catalog import BankRow, BlockRow
from server.errors import redact
from tests.server_harness import LiveServer, live_server, wait_job

PASSWORD = "hunter2-map-password"
TOKEN = "topsecret-query-token"
TEXT = "The harbour ledger is kept in the archive under the third arch."


class _Refusing(BaseHTTPRequestHandler):
    """A real OpenAI-compatible endpoint that refuses every call (401)."""

    def do_POST(self) -> None:  # noqa: N802 - the http.server hook's name
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = b'{"error": {"message": "bad credentials"}}'
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def map_llm() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://mapuser:{PASSWORD}@127.0.0.1:{server.server_port}/v1?api_key={TOKEN}&model=x"
    server.shutdown()
    thread.join()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, tiny_llm, embedder, map_llm: str) -> Iterator[LiveServer]:
    with live_server("sqlite", tmp_path_factory.mktemp("redaction"), tiny_llm, embedder, map_llm_url=map_llm) as srv:
        with srv.admin() as c:
            for bank in ("maps", "blobs"):
                assert c.post("/v1/banks", json={"name": bank}).status_code == 201
                assert c.put(f"/v1/banks/{bank}/documents/d1", json={"text": TEXT}).status_code == 201
        yield srv


def _no_secret(text: str, live: LiveServer) -> None:
    for secret in (PASSWORD, TOKEN, str(live.settings.data_dir), "/blobs/"):
        assert secret not in text, (secret, text)


def test_a_refresh_report_never_shows_the_map_llms_credentials(live: LiveServer,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    with live.admin() as c:
        assert c.post("/v1/banks/maps/context-map/refresh").json()["status"] == "nothing_to_distill"
        r = c.post("/v1/banks/maps/context-map/refresh")
        _no_secret(r.text, live)
        assert c.post("/v1/banks/maps/query", json={"question": "Where is the ledger?", "max_new_tokens": 1}
                      ).status_code == 200
        r = c.post("/v1/banks/maps/context-map/refresh")
    assert r.status_code == 200, r.text
    report = r.json()
    assert report["status"] == "llm_error" and "401" in report["error"]
    _no_secret(r.text, live)
    assert "127.0.0.1" in report["llm"] and "***" in report["llm"]  # still says which endpoint failed
    assert PASSWORD in caplog.text and TOKEN in caplog.text  # the operator's log keeps the full detail


def test_an_unrebuildable_block_names_no_server_path(live: LiveServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    with live.store.session() as s:
        blob_id = s.scalars(select(BlockRow.blob_id).join(BankRow, BankRow.id == BlockRow.bank_id)
                            .where(BankRow.name == "blobs")).first()
    assert blob_id
    parent = live.settings.data_dir / "blobs" / blob_id[:2] / blob_id[2:4]
    shutil.rmtree(parent)
    parent.write_bytes(b"a file where the blob's directory was")
    with live.admin() as c:
        r = c.post("/v1/banks/blobs/maintenance", json={"rebuild": True, "merge": False})
        assert r.status_code == 202, r.text
        job = wait_job(c, r.json()["job_id"])
        listed = c.get("/v1/banks/blobs/jobs").text
    assert job["status"] == "failed" and job["error"].startswith("corrupt_block: "), job
    assert "could not be rebuilt" in job["error"]
    _no_secret(job["error"], live)
    _no_secret(listed, live)
    assert str(parent) in caplog.text


@pytest.mark.parametrize(("raw", "shown"), [
    ("Client error for url 'https://u:p@llm.example/v1/chat?key=abc&x=1'",
     "Client error for url 'https://***@llm.example/v1/chat?key=***&x=1'"),
    ("auth failed: Authorization: Bearer sk-live-123", "auth failed: Authorization: Bearer ***"),
    ("key kvr_AbCdEf0123456789 rejected", "key kvr_*** rejected"),
    ("[Errno 13] Permission denied: '/tmp/kvrag/blobs/ab/cd/abcd'", "[Errno 13] Permission denied: '<path>'"),
    ("cannot open file:///etc/kvrag/key", "cannot open file://<path>"),
    ("no route GET /v1/banks/x/nothing", "no route GET /v1/banks/x/nothing"),
    ("no route GET /nowhere/at/all", "no route GET /nowhere/at/all"),
    ("bank 'a' is bound to model '/usr/share/models/llama', not this one",
     "bank 'a' is bound to model '<path>', not this one"),
])
def test_redact(raw: str, shown: str) -> None:
    assert redact(raw) == shown
