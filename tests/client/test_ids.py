"""Issue 26 hole 1: a dot-segment id must never reach the server as a path to the parent resource.

httpx resolves ``.``/``..`` path segments, so before the SDK checked ids, ``documents.delete(bank, "..")``
was sent as ``DELETE /v1/banks/{bank}`` and deleted the whole bank. Now the SDK refuses every id the
server would refuse before sending anything, the CLI and the MCP ``forget`` tool inherit that, and the
server refuses any path with a dot segment before routing.
"""

from __future__ import annotations

import asyncio

import pytest
from kvrag_client import AsyncKVRag, InvalidId, KVRag, ValidationError
from typer.testing import CliRunner

from kvrag.cli import app
from tests.client.live import Live, live  # noqa: F401 - the fixture, by name

DOT_IDS = ["..", ".", "../..", "%2e%2e", "a/../.."]


def _seed(kv: KVRag) -> None:
    kv.banks.create("notes")
    kv.documents.put("notes", "keep", "The Normans gave their name to Normandy.")
    kv.sessions.create("notes", "run-1")


def _intact(kv: KVRag) -> None:
    assert [b.name for b in kv.banks.list()] == ["notes"]
    assert [d.doc_id for d in kv.documents.list("notes")] == ["keep"]
    assert kv.sessions.get("notes", "run-1").session_id == "run-1"


@pytest.mark.parametrize("bad", DOT_IDS)
def test_sdk_refuses_dot_ids_before_sending(live: Live, bad: str) -> None:  # noqa: F811
    with KVRag(live.url) as kv:
        _seed(kv)
        for call in (lambda: kv.documents.delete("notes", bad), lambda: kv.documents.get("notes", bad),
                     lambda: kv.documents.put("notes", bad, "x"), lambda: kv.sessions.delete("notes", bad),
                     lambda: kv.sessions.append("notes", bad, [{"role": "note", "text": "x"}]),
                     lambda: kv.banks.delete(bad), lambda: kv.keys.delete(bad), lambda: kv.jobs.get(bad)):
            with pytest.raises(InvalidId) as caught:
                call()
            assert isinstance(caught.value, ValidationError) and caught.value.request_id is None
        _intact(kv)


def test_async_sdk_refuses_dot_ids(live: Live) -> None:  # noqa: F811
    async def main() -> None:
        async with AsyncKVRag(live.url) as kv:
            for bad in ("..", "."):
                with pytest.raises(InvalidId):
                    await kv.documents.delete("notes", bad)
                with pytest.raises(InvalidId):
                    await kv.sessions.delete("notes", bad)

    with KVRag(live.url) as kv:
        _seed(kv)
        asyncio.run(main())
        _intact(kv)


def test_cli_refuses_dot_ids(live: Live) -> None:  # noqa: F811
    runner = CliRunner()
    env = {"KVRAG_URL": live.url}
    with KVRag(live.url) as kv:
        _seed(kv)
        for args in (["documents", "rm", "..", "-b", "notes", "--yes"], ["sessions", "delete", "-b", "notes", ".."],
                     ["sessions", "delete", "-b", "notes", "."]):
            result = runner.invoke(app, args, env=env)
            assert result.exit_code == 2, result.output  # a bad value is a usage error
            assert result.stderr.startswith("error: ") and "not valid" in result.stderr
        _intact(kv)


def test_mcp_forget_refuses_dot_ids(live: Live) -> None:  # noqa: F811
    from kvrag_client.mcp import build_server, stdio_connector
    from mcp import Client

    async def main() -> list[dict[str, object]]:
        failures = []
        async with Client(build_server(stdio_connector(live.url, None, "notes"))) as client:
            for bad in ("..", "."):
                result = await client.call_tool("forget", {"doc_id": bad})
                assert result.is_error and result.structured_content is not None
                failures.append(result.structured_content)
        return failures

    with KVRag(live.url) as kv:
        _seed(kv)
        failures = asyncio.run(main())
        assert [f["code"] for f in failures] == ["validation_error", "validation_error"]
        _intact(kv)
