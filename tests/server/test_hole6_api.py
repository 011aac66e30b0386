"""Issue 26, hole 6, over HTTP: pins (owner only; an edit naming a pinned item is a 409 and changes nothing; a
refresh passes it over), bounded refresh deletions, session restore (own agent's sessions with a write key), and
the SDK and CLI doors to them (the MCP tools: tests/server/test_integrations_mcp.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest
from kvrag_client import AsyncKVRag, KVRag
from typer.testing import CliRunner

from kvrag.cli import app as cli_app
from tests.engine.contextmap.test_context_map import NORMANS, PARIS, StubLLM
from tests.server_harness import LiveServer, live_server, make_key

SEGMENTS = [{"role": "note", "text": f"Step {i}: read about {w}."} for i, w in enumerate(["Rollo", "Rouen", "Seine",
                                                                                           "Paris"])]


@pytest.fixture(scope="module")
def stub() -> Iterator[StubLLM]:
    server = StubLLM()
    yield server
    server.close()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, tiny_llm, embedder, stub: StubLLM) -> Iterator[LiveServer]:
    with live_server("sqlite", tmp_path_factory.mktemp("hole6"), tiny_llm, embedder, map_llm_url=stub.url) as server:
        with server.admin() as c:
            assert c.post("/v1/banks", json={"name": "kb"}).status_code == 201
            for doc_id, text in (("normans", NORMANS), ("paris", PARIS)):
                assert c.put(f"/v1/banks/kb/documents/{doc_id}", json={"text": text}).status_code in (200, 201)
            facts = [{"op": "add", "section": "understanding", "content": f"Fact {i} about Normandy."}
                     for i in range(6)]
            assert c.post("/v1/banks/kb/context-map/edits", json={"edits": facts}).status_code == 200
        yield server


def test_pins_are_an_owner_decision_that_edits_and_refreshes_respect(live: LiveServer, stub: StubLLM) -> None:
    writer = make_key(live, role="write", agent="w", banks=["kb"], name="w")["key"]
    owner = make_key(live, role="owner", agent="o", banks=["kb"], name="o")["key"]
    with live.client(writer) as w, live.client(owner) as o:
        before = w.get("/v1/banks/kb/context-map").json()
        r = w.post("/v1/banks/kb/context-map/items/cu-1/pin")
        assert r.status_code == 403 and w.get("/v1/banks/kb/context-map").json() == before
        assert o.post("/v1/banks/kb/context-map/items/cu-99/pin").status_code == 404
        assert o.post("/v1/banks/kb/context-map/items/..%2Fx/pin").status_code == 400  # the path guard
        assert o.post("/v1/banks/kb/context-map/items/zz-1/pin").status_code == 422
        pinned = o.post("/v1/banks/kb/context-map/items/cu-1/pin")
        assert pinned.status_code == 200 and next(i for i in pinned.json()["items"] if i["id"] == "cu-1")["pinned"]
        refused = w.post("/v1/banks/kb/context-map/edits", json={"edits": [{"op": "delete", "id": "cu-2"},
                                                                           {"op": "delete", "id": "cu-1"}]})
        assert refused.status_code == 409 and "pinned" in refused.json()["detail"]
        assert {i["id"] for i in w.get("/v1/banks/kb/context-map").json()["items"]} >= {"cu-1", "cu-2"}
        # A refresh told to delete everything: the pinned item is refused, the rest bounded to 25% of the items.
        assert w.post("/v1/banks/kb/query", json={"question": "Who was Rollo?", "k": 1, "max_new_tokens": 1}).is_success
        items = [i["id"] for i in w.get("/v1/banks/kb/context-map").json()["items"]]
        stub.reply = json.dumps({"edits": [{"op": "delete", "id": i} for i in items]})
        report = w.post("/v1/banks/kb/context-map/refresh").json()
        deleted = [a["id"] for a in report["applied"] if a["op"] == "delete"]
        assert report["status"] == "applied" and len(deleted) == len(items) // 4 and "cu-1" not in deleted
        assert {"id": "cu-1", "op": "delete", "reason": "item cu-1 is pinned"} in report["rejected"]
        assert o.post("/v1/banks/kb/context-map/items/cu-1/unpin").status_code == 200
        assert w.post("/v1/banks/kb/context-map/edits",
                      json={"edits": [{"op": "delete", "id": "cu-1"}]}).status_code == 200


def test_restore_brings_pruned_segments_back_for_their_own_agent(live: LiveServer) -> None:
    ann = make_key(live, role="write", agent="ann", banks=["kb"], name="ann")["key"]
    bob = make_key(live, role="write", agent="bob", banks=["kb"], name="bob")["key"]
    with live.client(ann) as a, live.client(bob) as b:
        assert a.post("/v1/banks/kb/sessions", json={"session_id": "run"}).status_code == 201
        assert a.post("/v1/banks/kb/sessions/run/append", json={"segments": SEGMENTS}).status_code == 200
        full = a.get("/v1/banks/kb/sessions/run").json()["tokens"]
        pruned = a.post("/v1/banks/kb/sessions/run/prune", json={"policy": "attention", "threshold": 0}).json()
        assert pruned["pruned"] == []  # no evidence: nothing to restore yet
        assert b.post("/v1/banks/kb/sessions/run/restore", json={}).status_code == 403
        assert a.post("/v1/banks/kb/sessions/run/restore", json={"segments": [99]}).status_code == 404
        assert a.post("/v1/banks/kb/sessions/run/restore", json={"segments": "all"}).status_code == 422
        assert a.post("/v1/banks/kb/sessions/run/restore", json={"segments": [2**40]}).status_code == 422
        live.store.agent_sessions.prune("kb", "run", policy="model", judge=lambda _p, _ids: '{"needed": [0, 1]}')
        assert a.get("/v1/banks/kb/sessions/run").json()["tokens"] < full
        restored = a.post("/v1/banks/kb/sessions/run/restore", json={"segments": [2]})
        assert restored.status_code == 200 and restored.json()["restored"] == [2]
        rest = a.post("/v1/banks/kb/sessions/run/restore", json={}).json()
        assert rest == {"restored": [3], "tokens": full, "expired": []}
        assert not any(g["pruned"] for g in a.get("/v1/banks/kb/sessions/run").json()["segments"])


def test_sdk_cli_and_mcp_pin_and_restore(live: LiveServer) -> None:
    owner = make_key(live, role="owner", agent="sdk", banks=["kb"], name="sdk")["key"]
    with KVRag(live.url, api_key=owner) as kv:
        assert next(i for i in kv.context_map.pin("kb", "cu-3").items if i.id == "cu-3").pinned
        assert not next(i for i in kv.context_map.unpin("kb", "cu-3").items if i.id == "cu-3").pinned
        kv.sessions.create("kb", "sdk-run")
        kv.sessions.append("kb", "sdk-run", SEGMENTS)
        assert kv.sessions.restore("kb", "sdk-run").restored == []

    async def run() -> None:
        async with AsyncKVRag(live.url, api_key=owner) as kv:
            assert next(i for i in (await kv.context_map.pin("kb", "cu-4")).items if i.id == "cu-4").pinned
            assert (await kv.sessions.restore("kb", "sdk-run", [0])).restored == []

    asyncio.run(run())
    cli = CliRunner()
    args = ["--url", live.url, "--api-key", owner]
    shown = cli.invoke(cli_app, ["map", "unpin", "cu-4", "--bank", "kb", *args])
    assert shown.exit_code == 0, shown.output
    assert cli.invoke(cli_app, ["map", "pin", "cu-4", "--bank", "kb", "--json", *args]).exit_code == 0
    restore = ["sessions", "restore", "sdk-run", "--bank", "kb", "--segment", "1", "--json"]
    restored = cli.invoke(cli_app, [*restore, *args])
    assert restored.exit_code == 0 and json.loads(restored.output)["restored"] == []
