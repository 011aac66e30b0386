"""Isolation over every operation of the OpenAPI schema (so routes added later are covered too):
revoked keys, keys of another bank and read-only keys, against a real server process.
tests/server/test_server_auth.py holds the per-route details (401 shapes, scopes, secrets not logged)."""

from __future__ import annotations

import inspect
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvstore.storage import keys
from kvstore.storage.catalog import open_catalog
from server import auth
from tests.reliability.procs import ForkServer, ServerLife
from tests.reliability.test_hostile import OPERATIONS

SECRET = "The vault combination is 31-41-59 and nobody else may read it."
OPEN = {"GET /healthz", "GET /readyz"}
PATH_VALUES = {"bank": "alpha", "doc_id": "d1", "session_id": "s1", "key_id": "abc", "job_id": "abc",
               "item_id": "cr-1"}
WRITES = {"PUT", "PATCH", "DELETE"}
# Valid bodies where the scope check needs one (creating bank "alpha", a key) or the bank is named in it.
BODIES: dict[str, dict[str, Any]] = {
    "POST /v1/banks": {"name": "alpha"},
    "POST /v1/keys": {"name": "x", "agent": "x", "role": "admin", "banks": ["*"]},
    "POST /v1/chat/completions": {"model": "kvrag:alpha", "messages": [{"role": "user", "content": "vault?"}]},
}


@pytest.fixture(scope="module")
def isolated(fork_server: ForkServer, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[tuple[ServerLife, dict[str, str]]]:
    life = fork_server.start(tmp_path_factory.mktemp("isolation"))
    with life.client() as c:
        for bank in ("alpha", "beta"):
            assert c.post("/v1/banks", json={"name": bank}).status_code == 201
        assert c.put("/v1/banks/alpha/documents/d1", json={"text": SECRET}).status_code == 201

        def key(role: str, banks: list[str]) -> dict[str, Any]:
            return c.post("/v1/keys", json={"name": role, "agent": role, "role": role, "banks": banks}).json()

        revoked = key("admin", ["*"])
        assert c.delete(f"/v1/keys/{revoked['id']}").status_code == 204
        secrets = {"revoked": revoked["key"], "other_bank": key("write", ["beta"])["key"],
                   "read_only": key("read", ["alpha"])["key"]}
    yield life, secrets
    life.signal(signal.SIGTERM)
    life.wait_dead()


def _call(life: ServerLife, label: str, key: str) -> Any:
    method, template = label.split(" ", 1)
    path = template.format(**PATH_VALUES)
    body = BODIES.get(label, {})
    with life.client(key=key) as c:
        return c.request(method, path, json=body if method != "GET" else None)


@pytest.mark.parametrize("label", sorted(set(OPERATIONS) - OPEN))
def test_a_revoked_key_is_refused_everywhere(isolated: tuple[ServerLife, dict[str, str]], label: str) -> None:
    life, secrets = isolated
    r = _call(life, label, secrets["revoked"])
    assert r.status_code == 401, r.text[:300]


@pytest.mark.parametrize("label", sorted(set(OPERATIONS) - OPEN))
def test_a_key_of_another_bank_sees_nothing_of_it(isolated: tuple[ServerLife, dict[str, str]], label: str) -> None:
    life, secrets = isolated
    r = _call(life, label, secrets["other_bank"])
    assert SECRET not in r.text and "vault" not in r.text.replace("vault?", "")
    if "{bank}" in label or "chat" in label:
        assert r.status_code in (403, 404), r.text[:300]  # 404: indistinguishable from a missing bank
    elif label in ("GET /v1/banks", "GET /v1/models"):
        assert "alpha" not in r.text
    else:
        assert r.status_code in (403, 404), r.text[:300]
    with life.client() as admin:  # and nothing of alpha changed
        assert admin.get("/v1/banks/alpha/documents/d1").json()["text"] == SECRET


@pytest.mark.parametrize("label", sorted(label for label in OPERATIONS if label.split()[0] in WRITES))
def test_a_read_only_key_writes_nothing(isolated: tuple[ServerLife, dict[str, str]], label: str) -> None:
    life, secrets = isolated
    r = _call(life, label, secrets["read_only"])
    assert r.status_code in (403, 404), r.text[:300]
    with life.client() as admin:
        assert admin.get("/v1/banks/alpha/documents/d1").json()["text"] == SECRET


def test_key_checks_are_constant_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """API keys are compared by hash with hmac.compare_digest; the admin key with compare_digest too."""
    sessions = open_catalog(f"sqlite:///{tmp_path / 'keys.sqlite3'}")
    _, secret = keys.create_key(sessions, name="k", agent="a", role="read", banks=["*"])
    compared: list[tuple[Any, Any]] = []
    real = keys.hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(keys.hmac, "compare_digest", spy)
    assert keys.verify_key(sessions, secret) is not None
    assert keys.verify_key(sessions, secret[:-1] + ("A" if secret[-1] != "A" else "B")) is None
    assert len(compared) == 2 and all(secret not in (a, b) for a, b in compared)  # hashes, never the secret
    assert "hmac.compare_digest(secret.encode(), admin_key.encode())" in inspect.getsource(auth.principal_for)
    sessions.kw["bind"].dispose()
