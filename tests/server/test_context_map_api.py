"""The context map over HTTP (a real uvicorn server on the tiny model): REST routes, the SDK and the CLI."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest
from kvrag_client import AsyncKVRag, KVRag, VersionMismatch
from typer.testing import CliRunner

from kvrag.cli import app
from tests.engine.contextmap.test_context_map import NORMANS, PARIS, PHOTO, StubLLM
from tests.server_harness import BACKENDS, LiveServer, live_server, make_key


@pytest.fixture(scope="module")
def stub() -> Iterator[StubLLM]:
    server = StubLLM()
    yield server
    server.close()


@pytest.fixture(scope="module", params=BACKENDS)
def live(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_llm, embedder,
         stub: StubLLM) -> Iterator[LiveServer]:
    with live_server(request.param, tmp_path_factory.mktemp("cmap-api"), tiny_llm, embedder,
                     map_llm_url=stub.url) as server:
        yield server


def test_rest_contract(live: LiveServer, stub: StubLLM) -> None:
    with live.admin() as c:
        r = c.post("/v1/banks", json={"name": "atlas", "context_map_budget_tokens": 300})
        assert r.status_code == 201 and r.json()["context_map_budget_tokens"] == 300
        assert c.post("/v1/banks", json={"name": "tiny", "context_map_budget_tokens": 3}).status_code == 422
        for doc_id, text in (("normans", NORMANS), ("paris", PARIS), ("photo", PHOTO)):
            assert c.put(f"/v1/banks/atlas/documents/{doc_id}", json={"text": text}).status_code == 201

        cmap = c.get("/v1/banks/atlas/context-map").json()
        assert set(cmap) >= {"version", "budget_tokens", "tokens", "frozen", "items"}
        assert cmap["budget_tokens"] == 300 and 0 < cmap["tokens"] <= 300 and not cmap["frozen"]
        assert [i["id"] for i in cmap["items"]] == ["cr-1", "cr-2", "cr-3"]  # bootstrapped at ingest
        assert set(cmap["items"][0]) >= {"id", "section", "content", "helpful", "harmful", "score", "agent",
                                         "updated_at"}

        r = c.post("/v1/banks/atlas/context-map/edits", json={
            "base_version": cmap["version"],
            "edits": [{"op": "add", "section": "understanding", "content": "Normandy is in France."}],
            "feedback": [{"id": "cr-1", "tag": "helpful"}]})
        assert r.status_code == 200, r.text
        edited = r.json()
        assert edited["version"] == cmap["version"] + 1 and edited["evicted"] == []
        assert {"op": "add", "id": "cu-1"} in edited["applied"] and edited["tokens"] <= 300

        # A stale base: fine for items unchanged since, 409 version_mismatch for items changed since.
        ok = c.post("/v1/banks/atlas/context-map/edits", json={
            "base_version": cmap["version"], "feedback": [{"id": "cr-2", "tag": "harmful"}]})
        assert ok.status_code == 200
        stale = c.post("/v1/banks/atlas/context-map/edits", json={
            "base_version": cmap["version"], "edits": [{"op": "delete", "id": "cu-1"}]})
        assert stale.status_code == 409 and stale.json()["code"] == "version_mismatch"
        for bad in ({"edits": [{"op": "add", "content": "no section"}]}, {"edits": [{"op": "drop", "id": "cr-1"}]},
                    {"feedback": [{"id": "cr-1", "tag": "love"}]}, {"edits": [], "extra": 1},
                    {"edits": [{"op": "replace", "id": "cr-1", "content": "x" * 1001}]}):
            r = c.post("/v1/banks/atlas/context-map/edits", json=bad)
            assert r.status_code == 422, (bad, r.text)
        assert c.post("/v1/banks/atlas/context-map/edits", json={"edits": [
            {"op": "delete", "id": "rr-5"}]}).json()["code"] == "not_found"
        current = c.get("/v1/banks/atlas/context-map").json()
        assert current["version"] == edited["version"] + 1  # refused edits changed nothing

        old = c.get("/v1/banks/atlas/context-map", params={"version": cmap["version"]}).json()
        assert old["version"] == cmap["version"] and old["items"] == cmap["items"]
        assert c.get("/v1/banks/atlas/context-map", params={"version": 999}).status_code == 404

        # Query with the map: prefilled once, then reused.
        first = c.post("/v1/banks/atlas/query", json={"question": "Who were the Normans?", "k": 1,
                                                      "max_new_tokens": 2, "context_map": True}).json()
        second = c.post("/v1/banks/atlas/query", json={"question": "Where is Paris?", "k": 1,
                                                       "max_new_tokens": 2, "context_map": True}).json()
        plain = c.post("/v1/banks/atlas/query", json={"question": "Where is Paris?", "k": 1,
                                                      "max_new_tokens": 2}).json()
        assert first["usage"]["map_prefill_tokens"] == current["tokens"] > 0
        assert second["usage"]["map_prefill_tokens"] == 0 and plain["usage"]["map_prefill_tokens"] == 0
        assert second["usage"]["context_tokens"] == plain["usage"]["context_tokens"] + current["tokens"]

        # Refresh through the stub OpenAI-compatible endpoint; garbage changes nothing.
        stub.reply = json.dumps([{"op": "add", "section": "reusable_results", "content": "Paris: on the Seine."}])
        report = c.post("/v1/banks/atlas/context-map/refresh").json()
        assert report["status"] == "applied" and report["records"] == 3 and report["applied"][0]["id"] == "rr-1"
        after = c.get("/v1/banks/atlas/context-map").json()
        c.post("/v1/banks/atlas/query", json={"question": "Seine?", "k": 1, "max_new_tokens": 1})
        stub.reply = "The map looks great, no changes needed."
        report = c.post("/v1/banks/atlas/context-map/refresh").json()
        assert report["status"] == "unparseable" and report["raw"] == stub.reply
        assert c.get("/v1/banks/atlas/context-map").json() == after

        # Freeze (refresh refused), budget via the map and via the bank.
        r = c.patch("/v1/banks/atlas/context-map", json={"frozen": True})
        assert r.status_code == 200 and r.json()["frozen"]
        assert c.post("/v1/banks/atlas/context-map/refresh").json()["code"] == "conflict"
        small = c.patch("/v1/banks/atlas/context-map", json={"budget_tokens": 40}).json()
        assert small["tokens"] <= 40 and small["budget_tokens"] == 40
        detail = c.patch("/v1/banks/atlas", json={"context_map_budget_tokens": 500}).json()
        assert detail["context_map_budget_tokens"] == 500
        assert c.get("/v1/banks/atlas").json()["context_map_budget_tokens"] == 500
        assert c.patch("/v1/banks/atlas/context-map", json={"budget_tokens": 10}).status_code == 422


def test_scopes_and_authors(live: LiveServer) -> None:
    with live.admin() as c:
        assert c.post("/v1/banks", json={"name": "scoped"}).status_code == 201
    reader = make_key(live, role="read", banks=["scoped"], name="r")["key"]
    writer = make_key(live, role="write", banks=["scoped"], agent="cartographer", name="w")["key"]
    other = make_key(live, role="write", banks=["elsewhere"], name="o")["key"]
    edit = {"edits": [{"op": "add", "section": "understanding", "content": "Scoped fact."}]}
    with live.client(reader) as c:
        assert c.get("/v1/banks/scoped/context-map").status_code == 200
        assert c.post("/v1/banks/scoped/context-map/edits", json=edit).status_code == 403
        assert c.post("/v1/banks/scoped/context-map/refresh").status_code == 403
        assert c.patch("/v1/banks/scoped/context-map", json={"frozen": True}).status_code == 403
    with live.client(other) as c:
        assert c.get("/v1/banks/scoped/context-map").status_code == 404
    with live.client(writer) as c:
        assert c.post("/v1/banks/scoped/context-map/edits", json=edit).status_code == 200
        assert c.get("/v1/banks/scoped/context-map").json()["items"][0]["agent"] == "cartographer"
    with live.client() as c:
        assert c.get("/v1/banks/scoped/context-map").status_code == 401
    with live.admin() as c:
        assert c.get("/v1/banks/nope/context-map").status_code == 404


def test_sdk_sync_and_async(live: LiveServer) -> None:
    with KVRag(live.url, api_key=live.settings.admin_key) as kv:
        kv.banks.create("sdkmap", context_map_budget_tokens=256)
        kv.documents.put("sdkmap", "paris", PARIS)
        cmap = kv.context_map.get("sdkmap")
        assert cmap.budget_tokens == 256 and cmap.items[0].id == "cr-1"
        result = kv.context_map.edit("sdkmap", [{"op": "add", "section": "understanding", "content": "A fact."}],
                                     feedback=[{"id": "cr-1", "tag": "helpful"}], base_version=cmap.version)
        assert result.version == cmap.version + 1 and result.applied[0] == {"op": "add", "id": "cu-1"}
        with pytest.raises(VersionMismatch):
            kv.context_map.edit("sdkmap", [{"op": "replace", "id": "cu-1", "content": "x"}],
                                base_version=cmap.version)
        assert kv.context_map.get("sdkmap", version=cmap.version).items == cmap.items
        assert kv.context_map.update("sdkmap", frozen=True).frozen
        first = kv.query("sdkmap", "Where is Paris?", k=1, max_new_tokens=1, context_map=True)
        again = kv.query("sdkmap", "Where is Paris?", k=1, max_new_tokens=1, context_map=True)
        assert first.usage.map_prefill_tokens > 0 and again.usage.map_prefill_tokens == 0

    async def run() -> None:
        async with AsyncKVRag(live.url, api_key=live.settings.admin_key) as kv:
            got = await kv.context_map.get("sdkmap")
            done = await kv.context_map.edit("sdkmap", feedback=[{"id": "cu-1", "tag": "stale"}])
            assert done.version == got.version + 1
            updated = await kv.context_map.update("sdkmap", frozen=False, budget_tokens=512)
            assert not updated.frozen and updated.budget_tokens == 512
            assert next(i for i in updated.items if i.id == "cu-1").stale
            report = await kv.context_map.refresh("sdkmap")
            assert report.status in ("applied", "unchanged", "unparseable")

    asyncio.run(run())


def test_cli_map_commands(live: LiveServer, stub: StubLLM) -> None:
    runner = CliRunner()
    env = {"KVRAG_URL": live.url, "KVRAG_API_KEY": live.settings.admin_key}
    with KVRag(live.url, api_key=live.settings.admin_key) as kv:
        kv.banks.create("climap")
        kv.documents.put("climap", "normans", NORMANS)
    r = runner.invoke(app, ["map", "edit", "-b", "climap", "--add", "understanding=Normans came from Norway.",
                            "--helpful", "cr-1"], env=env)
    assert r.exit_code == 0, r.output
    assert "applied: add cu-1, feedback cr-1 helpful" in r.output and "[understanding]" in r.output
    r = runner.invoke(app, ["map", "show", "-b", "climap"], env=env)
    assert r.exit_code == 0 and "cr-1  (+1/-0, score 1.00)" in r.output and "cu-1" in r.output
    r = runner.invoke(app, ["map", "show", "-b", "climap", "--json", "--version", "1"], env=env)
    assert r.exit_code == 0 and json.loads(r.output)["version"] == 1
    r = runner.invoke(app, ["map", "edit", "-b", "climap", "--add", "nowhere=x"], env=env)
    assert r.exit_code == 2 and "section must be one of" in r.output  # a bad value: a usage error
    r = runner.invoke(app, ["map", "edit", "-b", "climap", "--freeze", "--budget", "4000"], env=env)
    assert r.exit_code == 0 and "frozen" in r.output
    runner.invoke(app, ["map", "edit", "-b", "climap", "--unfreeze"], env=env)
    runner.invoke(app, ["query", "Who were the Normans?", "-b", "climap", "-k", "1", "--max-new-tokens", "1",
                        "--context-map"], env=env)
    stub.reply = '{"edits": [{"op": "add", "section": "reusable_results", "content": "Norse origin."}]}'
    r = runner.invoke(app, ["map", "refresh", "-b", "climap"], env=env)
    assert r.exit_code == 0 and "applied" in r.output and "rr-1" in r.output
    stub.reply = "no json here"
    r = runner.invoke(app, ["query", "Who?", "-b", "climap", "-k", "1", "--max-new-tokens", "1"], env=env)
    r = runner.invoke(app, ["map", "refresh", "-b", "climap"], env=env)
    assert r.exit_code == 1 and "unparseable" in r.output
