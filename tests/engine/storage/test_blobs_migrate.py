"""``kvrag blobs migrate --to s3://...``: an existing bank's local blobs move into a real object store (SeaweedFS),
checked, idempotent and resumable; the bank then serves from the store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kvrag.cli import app
from kvstore.bank import BankStore
from kvstore.config import Settings
from kvstore.model.loader import Embedder, LoadedModel
from tests.seaweed import Seaweed


def _blob_files(data_dir: Path) -> list[Path]:
    return sorted(p for p in (data_dir / "blobs").glob("*/*/*") if not p.name.startswith("."))


def _migrate(data_dir: Path, url: str, *extra: str) -> tuple[int, dict]:
    result = CliRunner().invoke(app, ["blobs", "migrate", "--to", url, "--data-dir", str(data_dir), "--json", *extra])
    return result.exit_code, (json.loads(result.stdout) if result.stdout.strip().startswith("{") else
                              {"output": result.output})


def test_blobs_move_into_the_object_store_and_the_bank_serves_from_there(
        tmp_path: Path, tiny_llm: LoadedModel, embedder: Embedder, seaweed: Seaweed, s3_bucket: str,
        s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in s3_env.items():
        monkeypatch.setenv(key, value)
    data_dir = tmp_path / "data"
    store = BankStore(Settings(data_dir=data_dir), llm=tiny_llm, embedder=embedder)
    store.create_bank("old")
    for i, text in enumerate(["The Normans gave their name to Normandy.", "Paris is the capital of France.",
                              "Photosynthesis converts light energy into chemical energy."]):
        store.put_document("old", f"d{i}", text)
    answer = store.query("old", "Where is Normandy?", k=2, max_new_tokens=3)
    store.close()
    files = _blob_files(data_dir)
    url = f"s3://{s3_bucket}/kv"

    code, report = _migrate(data_dir, url)
    assert code == 0 and report["copied"] == len(files) > 0 and report["damaged"] == []
    code, again = _migrate(data_dir, url)  # idempotent: nothing left to copy
    assert code == 0 and (again["copied"], again["already_there"]) == (0, len(files))

    # Resumable: objects missing from the store (a run cut short) are copied by the next run, and only they.
    client = seaweed.client()
    client.delete_object(Bucket=s3_bucket, Key=f"kv/blobs/{files[0].name}")
    code, resumed = _migrate(data_dir, url)
    assert code == 0 and (resumed["copied"], resumed["already_there"]) == (1, len(files) - 1)

    # A damaged local blob is reported, never uploaded, and the command says so with exit 1.
    damaged = files[1]
    client.delete_object(Bucket=s3_bucket, Key=f"kv/blobs/{damaged.name}")
    original = damaged.read_bytes()
    damaged.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    code, hurt = _migrate(data_dir, url)
    assert code == 1 and hurt["damaged"] == [damaged.name]
    damaged.write_bytes(original)

    code, moved = _migrate(data_dir, url, "--delete-local")
    assert code == 0 and moved["deleted_local"] == len(files) and _blob_files(data_dir) == []
    # The same bank now reads every block from the object store, and answers as before.
    served = BankStore(Settings(data_dir=data_dir, blob_url=url), llm=tiny_llm, embedder=embedder)
    try:
        again_answer = served.query("old", "Where is Normandy?", k=2, max_new_tokens=3)
        assert again_answer.answer == answer.answer and served.verify("old") == {"checked": len(files), "rebuilt": 0}
    finally:
        served.close()


def test_migrate_refuses_a_data_dir_a_server_holds(tmp_path: Path, tiny_llm: LoadedModel, embedder: Embedder,
                                                   s3_bucket: str, s3_env: dict[str, str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in s3_env.items():
        monkeypatch.setenv(key, value)
    store = BankStore(Settings(data_dir=tmp_path / "data"), llm=tiny_llm, embedder=embedder)
    try:
        root = Path(__file__).resolve().parents[3]
        out = subprocess.run([sys.executable, "-m", "kvrag.cli", "blobs", "migrate", "--to", f"s3://{s3_bucket}/kv",
                              "--data-dir", str(tmp_path / "data")], capture_output=True, text=True, cwd=root,
                             timeout=300, env={**os.environ, "PYTHONPATH": f"{root}:{root}/client"})
        assert out.returncode == 1 and "error: data directory" in out.stderr and "is in use by pid" in out.stderr
    finally:
        store.close()
