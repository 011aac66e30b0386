"""The ``kvrag`` command as click/typer users expect it: exit 2 for a usage error and 1 for a failure, each
with one ``error:`` line and no traceback; fixed choices completed by the shell; ``--json`` on every command
that prints; ``--version``; the documents, jobs and db commands."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from kvrag_client import KVRag
from typer.testing import CliRunner, Result

from kvrag import __version__
from kvrag.cli import app
from kvstore.bank import BankStore
from tests.client.live import Live, running

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[2]
DEAD = "http://127.0.0.1:9"  # nothing listens on the discard port: every request fails to connect


def _one_error_line(result: Result, code: int) -> str:
    assert result.exit_code == code, (result.exit_code, result.output)
    stderr = result.stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


USAGE_ERRORS = [
    ["query", "q", "-b", "notes", "--mode", "vector"],
    ["search", "q", "-b", "notes", "--retrieval", "nearest"],
    ["banks", "create", "notes", "--eviction", "fifo"],
    ["banks", "create", "notes", "--codec", "int4"],  # a server preset, not one the CLI offers
    ["banks", "update", "notes", "--codec", "zip"],
    ["sessions", "prune", "-b", "notes", "run", "--policy", "random"],
    ["sessions", "append", "-b", "notes", "run", "text", "--role", "boss"],
    ["sessions", "brief", "-b", "notes", "run", "task", "--selection", "all"],
    ["keys", "create", "bot", "--role", "root"],
    ["query", "q", "-b", "notes", "--recompute", "2"],
    ["query", "q", "-b", "notes", "--no-such-option"],
    ["query", "-b", "notes"],  # missing argument
    ["no-such-command"],
    ["documents", "rm", "..", "-b", "notes", "--yes"],  # refused by the SDK: an id the server would refuse
    ["documents", "get", "a/b", "-b", "notes"],
    ["sessions", "delete", "-b", "notes", "."],
    ["banks", "get", "Not_A_Bank"],
    ["jobs", "get", "../x"],
    ["map", "edit", "-b", "notes", "--add", "nowhere=text"],
    ["map", "edit", "-b", "notes"],  # nothing to do
    ["ingest", "/no/such/folder", "-b", "notes"],
]


@pytest.mark.parametrize("args", USAGE_ERRORS, ids=lambda a: " ".join(a))
def test_usage_errors_exit_2_with_one_error_line(args: list[str]) -> None:
    # DEAD as the server: a usage error must be found before anything is sent (else it would exit 1).
    _one_error_line(runner.invoke(app, args, env={"KVRAG_URL": DEAD}), 2)


@pytest.mark.parametrize("args", [["banks"], ["query", "q", "-b", "notes"], ["documents", "ls", "-b", "notes"],
                                  ["jobs", "wait", "abc123"], ["keys", "list"]], ids=" ".join)
def test_failures_exit_1_with_one_error_line(args: list[str]) -> None:
    line = _one_error_line(runner.invoke(app, args, env={"KVRAG_URL": DEAD}), 1)
    assert "connection" in line


def test_version() -> None:
    out = runner.invoke(app, ["--version"])
    assert out.exit_code == 0 and out.stdout.strip() == f"kvrag {__version__} (kvrag-client 0.1.0)"
    with open(ROOT / "pyproject.toml", "rb") as f:
        import tomllib

        assert tomllib.load(f)["project"]["version"] == __version__


def _complete(words: str) -> list[str]:
    cword = len(words.split()) - (0 if words.endswith(" ") else 1)
    env = {"_KVRAG_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(cword)}
    out = runner.invoke(app, [], env=env, prog_name="kvrag")
    assert out.exit_code == 0, out.output
    return out.stdout.split()


@pytest.mark.parametrize(("words", "choices"), [
    ("kvrag query q --mode ", ["kv", "text"]),
    ("kvrag search q --retrieval ", ["embedding", "kv", "hybrid", "hybrid_kv"]),
    ("kvrag banks create n --eviction ", ["lru", "importance", "hybrid"]),
    ("kvrag banks create n --codec ", ["auto", "fp16", "int8", "tklt5"]),
    ("kvrag banks update n --codec ", ["auto", "fp16", "int8", "tklt5"]),
    ("kvrag sessions prune -b b s --policy ", ["model", "attention"]),
    ("kvrag sessions append -b b s t --role ", ["orchestrator", "tool", "worker", "note"]),
    ("kvrag sessions brief -b b s t --selection ", ["segments", "tokens"]),
    ("kvrag keys create k --role ", ["read", "write", "owner", "admin"]),
    ("kvrag query q --mode t", ["text"]),
    ("kvrag jo", ["jobs"]),
])
def test_shell_completion_offers_the_choices(words: str, choices: list[str]) -> None:
    assert _complete(words) == choices


def _commands(group: object, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], object]]:
    for name, command in getattr(group, "commands", {}).items():
        path = (*prefix, name)
        if getattr(command, "commands", None):
            yield from _commands(command, path)
        else:
            yield path, command


def test_every_command_that_prints_has_json() -> None:
    root = typer.main.get_command(app)
    quiet = {("serve",), ("mcp",)}  # a server in the foreground prints no answer
    missing = [" ".join(path) for path, command in _commands(root)
               if path not in quiet and "--json" not in {o for p in getattr(command, "params", []) for o in p.opts}]
    assert missing == []
    assert "--json" in {o for p in root.commands["banks"].params for o in p.opts}  # `kvrag banks` alone lists


@pytest.fixture
def served(make_store: Callable[..., BankStore]) -> Iterator[Live]:
    with running(make_store(batch_job_threshold=2)) as live:
        yield live


def test_json_output_of_every_command_parses(served: Live, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"KVRAG_URL": served.url}
    monkeypatch.delenv("KVRAG_DATABASE_URL", raising=False)
    (tmp_path / "docs").mkdir()
    for i in range(3):
        (tmp_path / "docs" / f"d{i}.txt").write_text(f"Document {i} says the Normans came from Normandy, part {i}.")

    def js(*args: str, code: int = 0) -> Any:
        out = runner.invoke(app, [*args, "--json"], env=env)
        assert out.exit_code == code, (args, out.output)
        return json.loads(out.stdout)

    assert js("banks", "create", "notes", "--codec", "int8", "--eviction", "hybrid")["codec"] == "int8"
    assert js("ingest", str(tmp_path / "docs"), "-b", "notes")["created"] == 3
    assert [b["name"] for b in js("banks")] == ["notes"] and [b["name"] for b in js("banks", "list")] == ["notes"]
    assert js("banks", "get", "notes")["documents"] == 3
    assert js("banks", "update", "notes", "--max-blocks", "100")["max_blocks"] == 100
    assert js("banks", "maintain", "notes", "--no-merge")["bank"] == "notes"
    docs = js("documents", "ls", "-b", "notes", "--limit", "2")
    assert [d["doc_id"] for d in docs] == ["d0.txt", "d1.txt", "d2.txt"]
    assert "Normans" in js("documents", "get", "d1.txt", "-b", "notes")["text"]
    assert js("documents", "rm", "d2.txt", "-b", "notes", "--yes") == {"deleted": "d2.txt", "bank": "notes"}
    assert js("search", "Normandy", "-b", "notes", "-k", "1")[0]["doc_id"].startswith("d")
    assert "answer" in js("query", "Where did the Normans settle?", "-b", "notes", "-k", "1", "--max-new-tokens", "2")
    assert js("sessions", "create", "-b", "notes", "run")["session_id"] == "run"
    assert js("sessions", "append", "-b", "notes", "run", "A step.", "--role", "tool")["segment_ids"]
    assert js("sessions", "brief", "-b", "notes", "run", "What?", "--max-new-tokens", "1")["kept_tokens"] >= 0
    assert js("sessions", "prune", "-b", "notes", "run", "--policy", "attention")["policy"] == "attention"
    assert js("sessions", "get", "-b", "notes", "run")["session_id"] == "run"
    assert js("sessions", "delete", "-b", "notes", "run") == {"deleted": "run"}
    assert js("map", "edit", "-b", "notes", "--add", "understanding=About Normans.")["map"]["version"] >= 1
    assert js("map", "show", "-b", "notes")["items"]
    # A refresh that applies or changes nothing succeeds (exit 0; exit 1 is for unparseable/llm_error, see
    # tests/server/test_context_map_api.py). Decoding is constrained, so even the tiny random model writes valid edits,
    # and the recorded question the map does not cover yet makes the first edit an add of its answer.
    refreshed = js("map", "refresh", "-b", "notes")
    assert refreshed["status"] == "applied" and refreshed["applied"][0]["op"] == "add", refreshed
    key = js("keys", "create", "bot", "--role", "write", "-b", "notes")
    assert key["role"] == "write" and key["key"]
    assert any(k["id"] == key["id"] for k in js("keys", "list"))
    assert js("keys", "revoke", key["id"]) == {"revoked": key["id"]}

    with KVRag(served.url) as kv:  # a batch over the threshold (2) becomes a job, as the ingest above did
        kv.documents.put_many("notes", [{"id": f"j{i}", "text": f"Job document {i}."} for i in range(4)])
    listed = js("jobs", "ls", "-b", "notes")
    assert [(j["kind"], j["status"], j["total"]) for j in listed] == [  # newest first; maintenance: 5 steps
        ("ingest", "succeeded", 4), ("maintenance", "succeeded", 5), ("ingest", "succeeded", 3)]
    jobs = [j for j in listed if j["kind"] == "ingest"]
    assert js("jobs", "get", jobs[1]["id"])["total"] == 3
    assert js("jobs", "wait", jobs[0]["id"])["done"] == 4
    assert js("banks", "delete", "notes", "--yes") == {"deleted": "notes"}

    data = ["--data-dir", str(tmp_path / "catalog")]
    assert js("db", "current", *data) == {**js("db", "current", *data), "current": [], "up_to_date": False}
    upgraded = js("db", "upgrade", *data)
    current = js("db", "current", *data)
    assert current["up_to_date"] and current["current"] == current["head"] == upgraded["current"]
    history = js("db", "history", *data)
    assert history[0]["revision"] == current["head"][0] and all(r["applied"] for r in history)
    assert history[-1]["down_revision"] is None


def test_documents_and_jobs_commands_print_for_people(served: Live) -> None:
    env = {"KVRAG_URL": served.url}
    with KVRag(served.url) as kv:
        kv.banks.create("notes")
        job = kv.documents.put_many("notes", [{"id": f"d{i}", "text": f"Fact number {i}."} for i in range(3)])
    assert len(job) == 3
    listed = runner.invoke(app, ["documents", "ls", "-b", "notes"], env=env)
    assert listed.exit_code == 0 and [ln.split("\t")[0] for ln in listed.stdout.splitlines()] == ["d0", "d1", "d2"]
    shown = runner.invoke(app, ["documents", "get", "d1", "-b", "notes"], env=env)
    assert shown.stdout.strip() == "Fact number 1." and "v1" in shown.stderr
    assert runner.invoke(app, ["documents", "rm", "d1", "-b", "notes"], input="n\n", env=env).exit_code == 1
    assert runner.invoke(app, ["documents", "rm", "d1", "-b", "notes"], input="y\n", env=env).exit_code == 0
    missing = runner.invoke(app, ["documents", "get", "d1", "-b", "notes"], env=env)
    assert "404 not_found" in _one_error_line(missing, 1)
    jobs = runner.invoke(app, ["jobs", "ls", "-b", "notes"], env=env)
    job_id, kind, status, progress = jobs.stdout.split("\t")[:4]
    assert (kind, status, progress) == ("ingest", "succeeded", "3/3")
    waited = runner.invoke(app, ["jobs", "wait", job_id], env=env)
    assert waited.exit_code == 0 and "3/3" in waited.stdout and "job" in waited.stderr  # the progress bar
    assert "404 not_found" in _one_error_line(runner.invoke(app, ["jobs", "get", "f" * 32], env=env), 1)
    # Maintenance is a job: a progress bar in steps on stderr, the report on stdout; finished jobs cannot be cancelled.
    maintained = runner.invoke(app, ["banks", "maintain", "notes", "--no-merge"], env=env)
    assert maintained.exit_code == 0 and json.loads(maintained.stdout)["bank"] == "notes"
    assert "step" in maintained.stderr and "5/5" in maintained.stderr, maintained.stderr
    queued = runner.invoke(app, ["banks", "maintain", "notes", "--no-wait"], env=env)
    maint_id = json.loads(queued.stdout)["job_id"]
    assert runner.invoke(app, ["jobs", "wait", maint_id], env=env).exit_code == 0
    assert "409 conflict" in _one_error_line(runner.invoke(app, ["jobs", "cancel", maint_id], env=env), 1)
