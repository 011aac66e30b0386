"""Auth over every route: missing/invalid/revoked keys, bank scopes, roles, secrets never stored or logged."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import select

from kvstore.storage.catalog import ApiKeyRow
from server import app as app_module
from server.app import create_app, is_loopback, run
from tests.server_harness import LiveServer, live_server, make_key, serve

TEXT = "The Normans were the people who gave their name to Normandy, a region in France."

# Every /v1 route with a body it would accept, so a 401 can only come from auth.
ROUTES: list[tuple[str, str, dict[str, Any] | None]] = [
    ("POST", "/v1/keys", {"name": "x", "agent": "x", "role": "read", "banks": ["*"]}),
    ("GET", "/v1/keys", None),
    ("DELETE", "/v1/keys/abc", None),
    ("POST", "/v1/banks", {"name": "zz"}),
    ("GET", "/v1/banks", None),
    ("GET", "/v1/banks/alpha", None),
    ("PATCH", "/v1/banks/alpha", {"budget_bytes": 1000}),
    ("DELETE", "/v1/banks/alpha", None),
    ("PUT", "/v1/banks/alpha/documents/d1", {"text": TEXT}),
    ("POST", "/v1/banks/alpha/documents", {"documents": [{"id": "d2", "text": TEXT}]}),
    ("GET", "/v1/banks/alpha/documents", None),
    ("GET", "/v1/banks/alpha/documents/d1", None),
    ("DELETE", "/v1/banks/alpha/documents/d1", None),
    ("POST", "/v1/banks/alpha/search", {"query": "Normans"}),
    ("POST", "/v1/banks/alpha/query", {"question": "Normans?", "max_new_tokens": 2}),
    ("GET", "/v1/jobs/abc", None),
    ("GET", "/metrics", None),
]
WRITES = [r for r in ROUTES if r[0] in ("PUT", "PATCH", "DELETE") or r[1].endswith("/documents") and r[0] == "POST"]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, tiny_llm, embedder) -> Iterator[LiveServer]:
    with live_server("sqlite", tmp_path_factory.mktemp("auth"), tiny_llm, embedder) as server:
        with server.admin() as c:
            for bank in ("alpha", "beta"):
                assert c.post("/v1/banks", json={"name": bank}).status_code == 201
            assert c.put("/v1/banks/alpha/documents/d1", json={"text": TEXT}).status_code == 201
            assert c.put("/v1/banks/beta/documents/secret", json={"text": TEXT}).status_code == 201
        yield server


def _send(live: LiveServer, key: str | None, method: str, path: str, body: dict[str, Any] | None,
          header: str = "bearer") -> Any:
    headers = {} if key is None else ({"Authorization": f"Bearer {key}"} if header == "bearer" else {"X-API-Key": key})
    with live.client() as c:
        return c.request(method, path, json=body, headers=headers)


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
def test_no_key_or_a_wrong_key_is_401(live: LiveServer, method: str, path: str, body: dict[str, Any] | None) -> None:
    for key in (None, "kvr_not-a-real-key-at-all", "wrong"):
        r = _send(live, key, method, path, body)
        assert r.status_code == 401, (key, r.text)
        assert r.json()["code"] == "unauthorized" and r.json()["request_id"] == r.headers["X-Request-ID"]


def test_open_routes_need_no_key(live: LiveServer) -> None:
    assert _send(live, None, "GET", "/healthz", None).status_code == 200
    assert _send(live, None, "GET", "/readyz", None).status_code == 200


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
def test_a_key_for_another_bank_sees_nothing(live: LiveServer, method: str, path: str,
                                             body: dict[str, Any] | None) -> None:
    key = make_key(live, role="write", banks=["beta"])["key"]
    r = _send(live, key, method, path, body, header="x-api-key")
    if "/banks/alpha" in path:
        assert r.status_code == 404 and r.json()["code"] == "not_found"
    elif path in ("/v1/banks",) and method == "GET":
        assert [b["name"] for b in r.json()["banks"]] == ["beta"]
    else:
        assert r.status_code in (403, 404), r.text
    assert _send(live, key, "GET", "/v1/banks/beta/documents/secret", None).status_code == 200


@pytest.mark.parametrize(("method", "path", "body"), WRITES)
def test_a_read_key_cannot_write(live: LiveServer, method: str, path: str, body: dict[str, Any] | None) -> None:
    key = make_key(live, role="read", banks=["alpha"])["key"]
    r = _send(live, key, method, path, body)
    assert r.status_code == 403 and r.json()["code"] == "forbidden"
    assert _send(live, key, "GET", "/v1/banks/alpha/documents/d1", None).json()["text"] == TEXT
    assert _send(live, key, "POST", "/v1/banks/alpha/search", {"query": "Normans"}).status_code == 200


def test_only_admin_manages_keys_and_reads_metrics(live: LiveServer) -> None:
    key = make_key(live, role="write", banks=["*"])["key"]
    for method, path, body in [r for r in ROUTES if r[1].startswith(("/v1/keys", "/metrics"))]:
        assert _send(live, key, method, path, body).status_code == 403
    scoped_admin = make_key(live, role="admin", banks=["alpha"])["key"]
    assert _send(live, scoped_admin, "GET", "/v1/keys", None).status_code == 403


def test_revoked_key_is_401_at_once(live: LiveServer) -> None:
    created = make_key(live, role="read", banks=["alpha"], name="short-lived")
    assert _send(live, created["key"], "GET", "/v1/banks/alpha", None).status_code == 200
    with live.admin() as c:
        listed = c.get("/v1/keys").json()["keys"]
        assert created["id"] in {k["id"] for k in listed} and all("key" not in k for k in listed)
        assert c.delete(f"/v1/keys/{created['id']}").status_code == 204
        assert c.delete(f"/v1/keys/{created['id']}").status_code == 404
        assert created["id"] not in {k["id"] for k in c.get("/v1/keys").json()["keys"]}
    assert _send(live, created["key"], "GET", "/v1/banks/alpha", None).status_code == 401


def test_writes_are_attributed_to_the_key_agent(live: LiveServer) -> None:
    key = make_key(live, role="write", banks=["alpha"], agent="scribe")["key"]
    r = _send(live, key, "PUT", "/v1/banks/alpha/documents/by-scribe", {"text": TEXT + " Scribe."})
    assert r.status_code == 201 and r.json()["document"]["agent"] == "scribe"


def test_secrets_are_never_stored_or_logged(live: LiveServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    created = make_key(live, role="write", banks=["alpha"], name="audited")
    secret = created["key"]
    assert secret.startswith("kvr_") and secret.startswith(created["prefix"]) and len(secret) > 40
    for header in ("bearer", "x-api-key"):
        assert _send(live, secret, "GET", "/v1/banks/alpha", None, header=header).status_code == 200
    _send(live, secret + "x", "GET", "/v1/banks/alpha", None)
    with live.store.session() as s:
        row = s.scalars(select(ApiKeyRow).where(ApiKeyRow.id == created["id"])).one()
        stored = [str(getattr(row, col.key)) for col in ApiKeyRow.__table__.columns]
    assert all(secret not in value for value in stored) and row.prefix == created["prefix"]
    assert len(row.key_hash) == 64 and row.key_hash != secret
    logged = "\n".join(r.getMessage() for r in caplog.records) + caplog.text
    assert secret not in logged and live.settings.admin_key not in logged


def test_without_an_admin_key_loopback_is_open(tmp_path, tiny_llm, embedder) -> None:
    with live_server("sqlite", tmp_path, tiny_llm, embedder, admin_key=None) as server, server.client() as c:
        assert c.post("/v1/banks", json={"name": "open"}).status_code == 201
        assert c.get("/v1/keys").status_code == 200


def test_run_refuses_a_public_address_without_an_admin_key(tmp_path) -> None:
    from server.settings import ServerSettings

    with pytest.raises(SystemExit, match="KVRAG_ADMIN_KEY"):
        run(ServerSettings(data_dir=tmp_path), host="0.0.0.0", port=1)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.com")


def test_readyz_is_503_until_the_store_has_loaded(tmp_path, tiny_llm, embedder, monkeypatch) -> None:
    from kvstore.bank import BankStore
    from server.settings import ServerSettings

    release = threading.Event()
    settings = ServerSettings(data_dir=tmp_path, admin_key="root-key")

    def slow_store(s: ServerSettings, **wiring: Any) -> BankStore:  # the app passes its wait hook
        release.wait(30)
        return BankStore(s, llm=tiny_llm, embedder=embedder, **wiring)

    monkeypatch.setattr(app_module, "BankStore", slow_store)
    app = create_app(settings)
    with serve(app) as live, live.client("root-key") as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["code"] == "unavailable" and r.headers["Retry-After"]
        assert c.get("/v1/banks").status_code == 503
        assert c.get("/healthz").status_code == 200
        release.set()
        for _ in range(300):
            if c.get("/readyz").status_code == 200:
                break
            threading.Event().wait(0.05)
        assert c.get("/readyz").json()["status"] == "ready"
        assert c.get("/v1/banks").json() == {"banks": []}
