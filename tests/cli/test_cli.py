"""The ``kvrag`` command line, through typer's CliRunner, against a real server over the tiny model."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from kvrag_client import KVRag
from typer.testing import CliRunner

from kvrag.cli import app, collect_documents, doc_id_for
from tests.client.test_sdk_e2e import ADMIN, LiveServer, live_server  # noqa: F401 - the fixture is used by name

runner = CliRunner()

COMMANDS = [[], ["serve"], ["db"], ["db", "upgrade"], ["ingest"], ["query"], ["search"], ["banks"],
            ["banks", "list"], ["banks", "create"], ["banks", "get"], ["banks", "update"],
            ["banks", "maintain"], ["banks", "delete"], ["keys"],
            ["keys", "create"], ["keys", "list"], ["keys", "revoke"], ["documents", "ls"], ["documents", "get"],
            ["documents", "rm"], ["jobs", "ls"], ["jobs", "get"], ["jobs", "wait"], ["db", "current"],
            ["db", "history"]]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "kvrag")
def test_every_command_explains_itself(command: list[str]) -> None:
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
    help_text = result.output.split("Usage:", 1)[1]
    assert len(help_text.split("Options")[0].split()) > 6  # a sentence of description, not only the usage line


def test_doc_ids_from_paths() -> None:
    assert doc_id_for("notes/intro page.md") == "notes_intro_page.md"
    assert doc_id_for("../ä/..x.txt") == "x.txt"  # ids start with a letter or digit: no '..' survives
    assert doc_id_for("./.hidden") == "hidden"
    assert len(doc_id_for("a" * 300)) == 128


def _corpus(root: Path) -> Path:
    folder = root / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "normans.txt").write_text("The Normans gave their name to Normandy, a region in France.")
    (folder / "sub" / "paris page.md").write_text("# Paris\nParis is the capital of France.")
    (folder / "facts.jsonl").write_text(
        json.dumps({"id": "photo", "text": "Photosynthesis makes glucose from light.", "tags": ["bio"]}) + "\n\n"
        + json.dumps({"id": 7, "text": "Number seven.", "metadata": {"n": 7}}) + "\n")
    (folder / "notes.csv").write_text("not,taken")
    (folder / "empty.md").write_text("   ")
    return folder


def test_collect_documents(tmp_path: Path) -> None:
    folder = _corpus(tmp_path)
    docs = {d.id: d for d in collect_documents([folder], None)}
    assert set(docs) == {"normans.txt", "sub_paris_page.md", "photo", "7", "empty.md"}
    assert docs["photo"].extra == {"tags": ["bio"]} and docs["7"].extra == {"metadata": {"n": 7}}
    assert [d.id for d in collect_documents([folder], "**/*.md")] == ["empty.md", "sub_paris_page.md"]
    assert [d.id for d in collect_documents([folder / "normans.txt"], None)] == ["normans.txt"]


def test_ingest_search_query_and_banks(live_server: Callable[..., LiveServer], tmp_path: Path) -> None:  # noqa: F811
    srv = live_server()
    env = {"KVRAG_URL": srv.url}
    folder = _corpus(tmp_path)

    out = runner.invoke(app, ["ingest", str(folder), "--bank", "notes", "--create", "--batch-size", "2"], env=env)
    assert out.exit_code == 0, out.output
    assert "4 documents into notes: 4 new" in out.stdout and "tokens/s" in out.stdout
    assert "skipped" in out.stderr and "doc/s" in out.stderr  # the empty file, and tqdm's rate
    with KVRag(srv.url) as kv:
        stored = {d.doc_id: d for d in kv.documents.list("notes")}
    assert set(stored) == {"normans.txt", "sub_paris_page.md", "photo", "7"}
    assert stored["photo"].tags == ["bio"] and stored["7"].metadata == {"n": 7}

    again = runner.invoke(app, ["ingest", str(folder / "normans.txt"), "-b", "notes"], env=env)
    assert again.exit_code == 0 and "0 new, 0 updated, 1 unchanged" in again.stdout

    found = runner.invoke(app, ["search", "Which region did the Normans name?", "-b", "notes", "-k", "1"], env=env)
    assert found.exit_code == 0 and found.stdout.split()[1] == "normans.txt#0"

    for args in (["--mode", "kv"], ["--mode", "text"], ["--stream"]):
        answered = runner.invoke(app, ["query", "Capital of France?", "-b", "notes", "-k", "2",
                                       "--max-new-tokens", "3", *args], env=env)
        assert answered.exit_code == 0, answered.output
        assert "ttft" in answered.stderr and "#0" in answered.stderr
    as_json = runner.invoke(app, ["query", "Capital of France?", "-b", "notes", "-k", "2", "--max-new-tokens", "2",
                                  "--json"], env=env)
    result = json.loads(as_json.stdout)
    assert result["mode"] == "kv" and len(result["sources"]) == 2 and "ttft_ms" in result["timings"]
    tuned = runner.invoke(app, ["query", "Capital of France?", "-b", "notes", "-k", "2", "--max-new-tokens", "2",
                                "--retrieval", "embedding", "--recompute", "1.0", "--budget-tokens", "12", "--json"],
                          env=env)
    usage = json.loads(tuned.stdout)["usage"]
    assert usage["recomputed_tokens"] > 0 and 0 < usage["kept_tokens"] <= 12
    wrong = runner.invoke(app, ["search", "Normans", "-b", "notes", "--retrieval", "nearest"], env=env)
    assert wrong.exit_code == 2 and "'nearest' is not one of" in wrong.stderr  # a bad value is a usage error

    assert runner.invoke(app, ["banks", "create", "other", "--eviction", "importance"], env=env).exit_code == 0
    listed = runner.invoke(app, ["banks"], env=env)
    assert [line.split("\t")[0] for line in listed.stdout.splitlines()] == ["notes", "other"]
    stats = json.loads(runner.invoke(app, ["banks", "get", "notes"], env=env).stdout)
    assert stats["documents"] == 4 and stats["blocks"] >= 4
    updated = json.loads(runner.invoke(app, ["banks", "update", "notes", "--max-blocks", "1"], env=env).stdout)
    assert updated["max_blocks"] == 1 and updated["tiers"]["warm"]["blocks"] == 1
    report = json.loads(runner.invoke(app, ["banks", "maintain", "notes", "--no-merge", "--rebuild"], env=env).stdout)
    assert report["bank"] == "notes" and report["merged"] == 0 and report["verify"] is not None
    assert runner.invoke(app, ["banks", "delete", "other"], input="n\n", env=env).exit_code == 1  # aborted
    assert runner.invoke(app, ["banks", "delete", "other", "--yes"], env=env).exit_code == 0

    missing = runner.invoke(app, ["query", "anything", "-b", "other"], env=env)
    assert missing.exit_code == 1 and "404 not_found" in missing.stderr


def test_keys_create_list_revoke(live_server: Callable[..., LiveServer]) -> None:  # noqa: F811
    srv = live_server(admin_key=ADMIN)
    env = {"KVRAG_URL": srv.url, "KVRAG_API_KEY": ADMIN}
    assert runner.invoke(app, ["banks", "create", "shared"], env=env).exit_code == 0

    created = runner.invoke(app, ["keys", "create", "bot", "--role", "write", "-b", "shared", "--agent", "agent-1",
                                  "--json"], env=env)
    assert created.exit_code == 0, created.output
    key = json.loads(created.stdout)
    assert key["role"] == "write" and key["banks"] == ["shared"] and key["key"]

    listed = runner.invoke(app, ["keys", "list"], env=env)
    assert key["id"] in listed.stdout and key["key"] not in listed.stdout

    as_bot = {**env, "KVRAG_API_KEY": key["key"]}
    assert runner.invoke(app, ["banks", "list"], env=as_bot).stdout.startswith("shared")
    denied = runner.invoke(app, ["keys", "list"], env=as_bot)
    assert denied.exit_code == 1 and "403 forbidden" in denied.stderr

    assert runner.invoke(app, ["keys", "revoke", key["id"]], env=env).exit_code == 0
    revoked = runner.invoke(app, ["banks", "list"], env=as_bot)
    assert revoked.exit_code == 1 and "401 unauthorized" in revoked.stderr


def test_db_upgrade_creates_the_catalog(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KVRAG_DATABASE_URL", raising=False)
    out = runner.invoke(app, ["db", "upgrade", "--data-dir", str(tmp_path / "d")])
    assert out.exit_code == 0, out.output
    assert (tmp_path / "d" / "catalog.sqlite3").exists() and "catalog up to date: sqlite" in out.stdout


def test_serve_passes_its_options_to_the_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import server.app
    from server.settings import ServerSettings

    calls: list[tuple[object, str, int]] = []
    monkeypatch.setattr(server.app, "run", lambda settings, host, port: calls.append((settings, host, port)))
    out = runner.invoke(app, ["serve", "--port", "8123", "--data-dir", str(tmp_path)])
    assert out.exit_code == 0, out.output
    settings, host, port = calls[0]
    assert (host, port, settings.data_dir) == ("127.0.0.1", 8123, tmp_path)  # type: ignore[attr-defined]
    assert isinstance(settings, ServerSettings)  # the server reads its own knobs (admin key, CORS, ...) too
