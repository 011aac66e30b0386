"""Sessions over the REST API (a real uvicorn server over the tiny model): scopes, append, brief, prune."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.server_harness import BACKENDS, LiveServer, live_server, make_key, sse_events

SEGMENTS = [
    {"role": "orchestrator", "text": "Find out who the Normans were."},
    {"role": "tool", "text": "The Normans gave their name to Normandy, a region in France."},
    {"role": "note", "text": "Photosynthesis converts light energy into chemical energy."},
]


@pytest.fixture(scope="module", params=BACKENDS)
def live(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_llm, embedder
         ) -> Iterator[LiveServer]:
    with live_server(request.param, tmp_path_factory.mktemp("sessions"), tiny_llm, embedder,
                     block_tokens=16) as server:
        with server.admin() as c:
            assert c.post("/v1/banks", json={"name": "team"}).status_code == 201
        yield server


def test_session_lifecycle_with_write_and_read_keys(live: LiveServer) -> None:
    orchestrator = make_key(live, role="write", banks=["team"], agent="orch", name="orch")["key"]
    worker = make_key(live, role="read", banks=["team"], agent="w1", name="w1")["key"]
    with live.client(orchestrator) as orch, live.client(worker) as work:
        r = orch.post("/v1/banks/team/sessions", json={"session_id": "run-1", "metadata": {"goal": "normans"}})
        assert r.status_code == 201, r.text
        assert r.json()["tokens"] == 0 and r.json()["agent"] == "orch"
        assert orch.post("/v1/banks/team/sessions", json={"session_id": "run-1"}).json()["code"] == "conflict"
        assert work.post("/v1/banks/team/sessions", json={}).status_code == 403

        first = orch.post("/v1/banks/team/sessions/run-1/append", json={"segments": SEGMENTS[:2]})
        assert first.status_code == 200, first.text
        assert first.json()["segment_ids"] == [0, 1] and len(first.json()["token_counts"]) == 2
        second = orch.post("/v1/banks/team/sessions/run-1/append", json={"segments": SEGMENTS[2:]}).json()
        assert second["segment_ids"] == [2] and second["tokens"] == first.json()["tokens"] + second["token_counts"][0]
        assert work.post("/v1/banks/team/sessions/run-1/append", json={"segments": SEGMENTS}).status_code == 403

        info = work.get("/v1/banks/team/sessions/run-1").json()
        assert [g["agent"] for g in info["segments"]] == ["orch"] * 3
        assert info["tokens"] == second["tokens"] and info["stored_bytes"] > 0

        full = work.post("/v1/banks/team/sessions/run-1/brief", json={"task": "Who were the Normans?",
                                                                       "max_new_tokens": 4})
        assert full.status_code == 200, full.text
        assert full.json()["kept_tokens"] == full.json()["session_tokens"] == info["tokens"]
        assert set(full.json()["timings"]) >= {"load_ms", "compaction_ms", "prefill_ms", "ttft_ms", "total_ms"}
        small = work.post("/v1/banks/team/sessions/run-1/brief", json={"task": "Who were the Normans?",
                                                                        "budget_tokens": 10, "max_new_tokens": 2})
        assert small.json()["kept_tokens"] <= 10

        assert work.post("/v1/banks/team/sessions/run-1/prune", json={"policy": "attention"}).status_code == 403
        pruned = orch.post("/v1/banks/team/sessions/run-1/prune", json={"policy": "attention", "threshold": 0})
        assert pruned.status_code == 200 and pruned.json()["pruned"] == []
        assert pruned.json()["tokens_before"] == pruned.json()["tokens_after"] == info["tokens"]

        assert work.delete("/v1/banks/team/sessions/run-1").status_code == 403
        assert orch.delete("/v1/banks/team/sessions/run-1").status_code == 204
        assert work.get("/v1/banks/team/sessions/run-1").json()["code"] == "not_found"


def test_brief_streams_tokens_then_done(live: LiveServer) -> None:
    with live.admin() as c:
        c.post("/v1/banks/team/sessions", json={"session_id": "stream"})
        c.post("/v1/banks/team/sessions/stream/append", json={"segments": SEGMENTS})
        r = c.post("/v1/banks/team/sessions/stream/brief", json={"task": "Who?", "max_new_tokens": 3,
                                                                  "stream": True, "tau": 0.5})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.text)
        assert events[-1][0] == "done"
        done = json.loads(events[-1][1])
        assert "".join(json.loads(d)["text"] for e, d in events if e == "token").strip() == done["answer"]
        assert done["kept_tokens"] <= done["session_tokens"]
        missing = c.post("/v1/banks/team/sessions/nope/brief", json={"task": "Who?", "stream": True})
        assert missing.status_code == 404


def test_bad_input_is_rejected(live: LiveServer) -> None:
    with live.admin() as c:
        c.post("/v1/banks/team/sessions", json={"session_id": "bad"})
        for body in ({"segments": []}, {"segments": [{"role": "boss", "text": "x"}]},
                     {"segments": [{"role": "note", "text": ""}]}, {"segments": SEGMENTS, "extra": 1}):
            assert c.post("/v1/banks/team/sessions/bad/append", json=body).status_code == 422, body
        assert c.post("/v1/banks/team/sessions/bad/brief", json={"task": "x", "budget_tokens": -1}).status_code == 422
        assert c.post("/v1/banks/team/sessions/bad/brief", json={"task": "x", "selection": "all"}).status_code == 422
        assert c.post("/v1/banks/team/sessions/bad/prune", json={"policy": "random"}).status_code == 422
        assert c.post("/v1/banks/team/sessions", json={"session_id": "no spaces"}).status_code == 422
        assert c.post("/v1/banks/nobank/sessions", json={}).status_code == 404
        assert c.get("/v1/banks/team/sessions/bad").json()["tokens"] == 0


def test_sdk_sessions_sync_and_async(live: LiveServer) -> None:
    import asyncio

    from kvrag_client import AsyncKVRag, KVRag, NotFound

    with KVRag(live.url, api_key=live.settings.admin_key) as kv:
        created = kv.sessions.create("team", metadata={"goal": "normans"})
        appended = kv.sessions.append("team", created.session_id, SEGMENTS)
        assert appended.segment_ids == [0, 1, 2]
        brief = kv.sessions.brief("team", created.session_id, "Who were the Normans?", budget_tokens=12,
                                  max_new_tokens=2)
        assert brief.kept_tokens <= 12 and brief.session_tokens == appended.tokens
        tokens = kv.sessions.brief("team", created.session_id, "Who were the Normans?", budget_tokens=12,
                                   max_new_tokens=2, selection="tokens")
        assert tokens.kept_tokens == brief.kept_tokens
        assert kv.sessions.prune("team", created.session_id, policy="attention", threshold=0).pruned == []
        assert kv.sessions.get("team", created.session_id).tokens == appended.tokens

    async def run() -> None:
        async with AsyncKVRag(live.url, api_key=live.settings.admin_key) as akv:
            await akv.sessions.append("team", created.session_id, [{"role": "worker", "text": "Normandy."}])
            got = await akv.sessions.get("team", created.session_id)
            assert [g.id for g in got.segments] == [0, 1, 2, 3]
            assert (await akv.sessions.brief("team", created.session_id, "Who?", max_new_tokens=1)).answer is not None
            briefed = await akv.sessions.brief("team", created.session_id, "Who?", budget_tokens=6, max_new_tokens=1,
                                               selection="tokens")
            assert briefed.kept_tokens == 6
            await akv.sessions.delete("team", created.session_id)
            try:
                await akv.sessions.get("team", created.session_id)
                raise AssertionError("the session should be gone")
            except NotFound:
                pass

    asyncio.run(run())


def test_cli_sessions(live: LiveServer) -> None:
    from typer.testing import CliRunner

    from kvrag.cli import app

    cli = CliRunner()
    env = {"KVRAG_URL": live.url, "KVRAG_API_KEY": live.settings.admin_key}
    created = cli.invoke(app, ["sessions", "create", "-b", "team", "cli-run"], env=env)
    assert created.exit_code == 0 and created.stdout.strip() == "cli-run", created.output
    appended = cli.invoke(app, ["sessions", "append", "-b", "team", "cli-run", SEGMENTS[1]["text"], "--role", "tool"],
                          env=env)
    assert appended.exit_code == 0 and appended.stdout.startswith("segment 0:"), appended.output
    brief = cli.invoke(app, ["sessions", "brief", "-b", "team", "cli-run", "Who?", "--budget-tokens", "5",
                             "--max-new-tokens", "2", "--json"], env=env)
    assert brief.exit_code == 0 and json.loads(brief.stdout)["kept_tokens"] <= 5, brief.output
    tokens = cli.invoke(app, ["sessions", "brief", "-b", "team", "cli-run", "Who?", "--budget-tokens", "5",
                              "--selection", "tokens", "--max-new-tokens", "2", "--json"], env=env)
    assert tokens.exit_code == 0 and json.loads(tokens.stdout)["kept_tokens"] <= 5, tokens.output
    pruned = cli.invoke(app, ["sessions", "prune", "-b", "team", "cli-run", "--policy", "attention"], env=env)
    assert pruned.exit_code == 0 and "tokens" in pruned.stdout, pruned.output
    assert json.loads(cli.invoke(app, ["sessions", "get", "-b", "team", "cli-run"], env=env).stdout)["tokens"] > 0
    assert cli.invoke(app, ["sessions", "delete", "-b", "team", "cli-run"], env=env).exit_code == 0
    missing = cli.invoke(app, ["sessions", "get", "-b", "team", "cli-run"], env=env)
    assert missing.exit_code == 1 and "not_found" in missing.output
