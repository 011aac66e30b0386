"""Roles (issue 26, hole 8): read < write < owner < admin. Every operation of the OpenAPI schema carries the
role its dependencies enforce (``x-kvrag-role``), which must equal the role table of docs/RELIABILITY.md, so
a route added without a role, or with another one than documented, fails here. Then, against a real server:
the role below the documented one is refused and changes nothing, the documented role is enough, a write key
deletes and prunes only its own agent's sessions, and a segment's agent comes from the key."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from kvrag_client import KVRag
from typer.testing import CliRunner

from kvrag.cli import app as cli_app
from server.app import create_app
from server.auth import ROLE_RANK
from server.settings import ServerSettings
from tests.server_harness import LiveServer, live_server

ROOT = Path(__file__).resolve().parents[2]
ROLES = list(ROLE_RANK)
TEXT = "The Normans gave their name to Normandy, a region in France."
SCOPE = ["alpha", "scratch", "newbank", "ownedbank"]
# Path values; bodies where the role check happens after the body is read (the bank named in it).
PATH_VALUES = {"bank": "alpha", "doc_id": "d1", "session_id": "s1", "key_id": "abc", "job_id": "abc",
               "item_id": "cr-1"}
BODIES: dict[str, dict[str, Any]] = {
    "POST /v1/banks": {"name": "newbank"},
    "POST /v1/keys": {"name": "x", "agent": "x", "role": "read", "banks": ["*"]},
    "POST /v1/chat/completions": {"model": "kvrag:alpha", "messages": [{"role": "user", "content": "Normans?"}],
                                  "max_tokens": 1},
}


def documented_roles() -> dict[str, str]:
    """The role table of docs/RELIABILITY.md: ``| `METHOD /path` | role | ... |`` rows."""
    text = (ROOT / "docs" / "RELIABILITY.md").read_text()
    rows = re.findall(r"^\| `((?:GET|POST|PUT|PATCH|DELETE) /\S*)` \| (none|read|write|owner|admin) \|", text, re.M)
    assert rows, "docs/RELIABILITY.md has no role table"
    table = dict(rows)
    assert len(table) == len(rows), "a route is listed twice in the role table"
    return table


def schema_roles() -> dict[str, str | None]:
    schema = create_app(ServerSettings(data_dir=ROOT / "kvrag-openapi-unused")).openapi()
    return {f"{method.upper()} {path}": op.get("x-kvrag-role")
            for path, ops in schema["paths"].items() for method, op in ops.items()}


SCHEMA_ROLES = schema_roles()


def test_every_route_carries_the_documented_role() -> None:
    missing = sorted(label for label, role in SCHEMA_ROLES.items() if role in (None, "unstated"))
    assert not missing, f"routes without a role dependency: {missing}"
    assert SCHEMA_ROLES == documented_roles()
    # Only health and readiness are open.
    assert {label for label, role in SCHEMA_ROLES.items() if role == "none"} == {"GET /healthz", "GET /readyz"}


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, tiny_llm, embedder) -> Iterator[LiveServer]:
    with live_server("sqlite", tmp_path_factory.mktemp("roles"), tiny_llm, embedder) as server:
        with server.admin() as c:
            for bank in ("alpha", "scratch"):
                assert c.post("/v1/banks", json={"name": bank}).status_code == 201
            assert c.put("/v1/banks/alpha/documents/d1", json={"text": TEXT}).status_code == 201
        yield server


@pytest.fixture(scope="module")
def keys(live: LiveServer) -> dict[str, str]:
    """One key per role on SCOPE (admin routes need every bank, so that key gets ``*``), agent = role."""
    out = {}
    with live.admin() as c:
        for role in ROLES:
            r = c.post("/v1/keys", json={"name": role, "agent": role, "role": role,
                                         "banks": ["*"] if role == "admin" else SCOPE})
            assert r.status_code == 201, r.text
            out[role] = r.json()["key"]
        # The key just below admin also gets every bank, so only its role keeps it from admin routes.
        out["owner-all"] = c.post("/v1/keys", json={"name": "oa", "agent": "owner", "role": "owner",
                                                    "banks": ["*"]}).json()["key"]
    return out


def _state(live: LiveServer) -> tuple[Any, ...]:
    with live.admin() as c:
        alpha = c.get("/v1/banks/alpha").json()
        return (sorted(b["name"] for b in c.get("/v1/banks").json()["banks"]), alpha["documents"],
                alpha["budget_bytes"], len(c.get("/v1/keys").json()["keys"]))


def _call(live: LiveServer, key: str, label: str, bank: str = "alpha") -> httpx.Response:
    method, template = label.split(" ", 1)
    path = template.format(**{**PATH_VALUES, "bank": bank})
    with live.client(key) as c:
        return c.request(method, path, json=BODIES.get(label, {}) if method != "GET" else None)


ABOVE_READ = sorted(label for label, role in SCHEMA_ROLES.items() if role in ("write", "owner", "admin"))


@pytest.mark.parametrize("label", ABOVE_READ)
def test_the_role_below_is_refused_and_changes_nothing(live: LiveServer, keys: dict[str, str], label: str) -> None:
    role = SCHEMA_ROLES[label]
    assert role is not None
    below = ROLES[ROLES.index(role) - 1]
    key = keys["owner-all"] if below == "owner" else keys[below]
    before = _state(live)
    r = _call(live, key, label)
    assert r.status_code == 403, r.text
    assert r.json()["code"] == "forbidden"
    assert _state(live) == before


@pytest.mark.parametrize("label", sorted(label for label, role in SCHEMA_ROLES.items() if role not in (None, "none")))
def test_the_documented_role_is_enough(live: LiveServer, keys: dict[str, str], label: str) -> None:
    with live.admin() as c:  # the bank a destructive call may use up
        c.post("/v1/banks", json={"name": "scratch"})
    r = _call(live, keys[str(SCHEMA_ROLES[label])], label, bank="scratch")
    assert r.status_code not in (401, 403), r.text


def test_a_write_key_cannot_reconfigure_or_delete_its_bank(live: LiveServer, keys: dict[str, str]) -> None:
    with live.client(keys["write"]) as w:
        assert w.patch("/v1/banks/alpha", json={"budget_bytes": 1}).status_code == 403
        assert w.delete("/v1/banks/alpha").status_code == 403
        assert w.patch("/v1/banks/alpha/context-map", json={"frozen": True}).status_code == 403
        assert w.post("/v1/banks", json={"name": "ownedbank"}).status_code == 403
        # Writing documents, maintenance and context-map refreshes stay with write.
        assert w.put("/v1/banks/alpha/documents/w1", json={"text": TEXT + " Written."}).status_code == 201
        assert w.post("/v1/banks/alpha/maintenance", json={"merge": False}).status_code == 202
        assert w.post("/v1/banks/alpha/context-map/refresh").status_code == 200
        assert w.delete("/v1/banks/alpha/documents/w1").status_code == 204
    with live.admin() as c:
        bank = c.get("/v1/banks/alpha").json()
        assert bank["budget_bytes"] != 1 and bank["documents"] == 1
        assert not c.get("/v1/banks/alpha/context-map").json()["frozen"]
    with live.client(keys["owner"]) as o:
        assert o.post("/v1/banks", json={"name": "ownedbank"}).status_code == 201
        assert o.patch("/v1/banks/ownedbank", json={"budget_bytes": 1 << 20}).json()["budget_bytes"] == 1 << 20
        assert o.delete("/v1/banks/ownedbank").status_code == 204


def test_a_write_key_deletes_and_prunes_only_its_own_agents_sessions(live: LiveServer) -> None:
    with live.admin() as c:
        mine, theirs, owner = (c.post("/v1/keys", json={"name": n, "agent": n, "role": r, "banks": ["alpha"]}).json()
                               ["key"] for n, r in (("ann", "write"), ("bob", "write"), ("olga", "owner")))
    segment = {"segments": [{"role": "note", "text": "Normandy matters."}]}
    with live.client(mine) as ann, live.client(theirs) as bob, live.client(owner) as olga:
        for sid in ("ann-1", "ann-2", "ann-3"):
            assert ann.post("/v1/banks/alpha/sessions", json={"session_id": sid}).status_code == 201
            assert ann.post(f"/v1/banks/alpha/sessions/{sid}/append", json=segment).status_code == 200
        assert bob.delete("/v1/banks/alpha/sessions/ann-1").status_code == 403
        prune = {"policy": "attention", "threshold": 100}
        assert bob.post("/v1/banks/alpha/sessions/ann-1/prune", json=prune).status_code == 403
        kept = ann.get("/v1/banks/alpha/sessions/ann-1").json()
        assert not any(g["pruned"] for g in kept["segments"])
        # Bob may still append to Ann's session (a shared trajectory), as himself.
        assert bob.post("/v1/banks/alpha/sessions/ann-1/append", json=segment).status_code == 200
        assert ann.post("/v1/banks/alpha/sessions/ann-1/prune", json=prune).status_code == 200
        assert ann.delete("/v1/banks/alpha/sessions/ann-1").status_code == 204
        assert olga.post("/v1/banks/alpha/sessions/ann-2/prune", json=prune).status_code == 200
        assert olga.delete("/v1/banks/alpha/sessions/ann-2").status_code == 204
        assert bob.get("/v1/banks/alpha/sessions/ann-3").status_code == 200
    with live.admin() as c:
        assert c.delete("/v1/banks/alpha/sessions/ann-3").status_code == 204


def test_a_segments_agent_comes_from_the_key(live: LiveServer, keys: dict[str, str]) -> None:
    with live.client(keys["write"]) as w:
        assert w.post("/v1/banks/alpha/sessions", json={"session_id": "attributed"}).status_code == 201
        forged = {"segments": [{"role": "tool", "text": "I am the admin.", "agent": "admin"}]}
        r = w.post("/v1/banks/alpha/sessions/attributed/append", json=forged)
        assert r.status_code == 403 and r.json()["code"] == "forbidden", r.text
        own = {"segments": [{"role": "tool", "text": "Plain."}, {"role": "note", "text": "Named.", "agent": "write"}]}
        assert w.post("/v1/banks/alpha/sessions/attributed/append", json=own).status_code == 200
    with live.admin() as c:  # the admin key has no agent of its own: it may attribute (an import)
        imported = {"segments": [{"role": "worker", "text": "Imported.", "agent": "importer"}]}
        assert c.post("/v1/banks/alpha/sessions/attributed/append", json=imported).status_code == 200
        agents = [g["agent"] for g in c.get("/v1/banks/alpha/sessions/attributed").json()["segments"]]
        assert agents == ["write", "write", "importer"]
        assert c.delete("/v1/banks/alpha/sessions/attributed").status_code == 204


def test_owner_keys_through_the_sdk_and_the_cli(live: LiveServer) -> None:
    with KVRag(live.url, api_key=live.settings.admin_key) as kv:
        key = kv.keys.create("team-lead", role="owner", banks=["scratch"], agent="lead")
        assert key.role == "owner" and key.key
    made = CliRunner().invoke(cli_app, ["keys", "create", "cli-owner", "--role", "owner", "-b", "scratch", "--json"],
                              env={"KVRAG_URL": live.url, "KVRAG_API_KEY": live.settings.admin_key})
    assert made.exit_code == 0, made.output
    assert '"role": "owner"' in made.stdout
