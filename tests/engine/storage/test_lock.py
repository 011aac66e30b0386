"""One kvrag process per data directory: an OS lock that refuses a second process and dies with its holder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvstore.bank import BankStore
from kvstore.config import Settings
from kvstore.model.loader import Embedder, LoadedModel
from kvstore.storage import lock as data_dir_lock

ROOT = Path(__file__).resolve().parents[3]


def test_second_process_on_a_data_dir_is_refused_and_a_kill_9_frees_it(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from kvstore.storage import lock; lock.acquire(__import__('pathlib')"
         ".Path(sys.argv[1])); print('held', flush=True); time.sleep(600)", str(tmp_path)],
        stdout=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "client")])})
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(data_dir_lock.DataDirInUse, match=rf"in use by pid {holder.pid} on"):
            data_dir_lock.acquire(tmp_path)
    finally:
        holder.kill()  # SIGKILL: no handler, no cleanup
        holder.wait()
    lock = data_dir_lock.acquire(tmp_path)
    again = data_dir_lock.acquire(tmp_path)  # the same process opening a second store shares it
    lock.release()
    again.release()


def test_embedded_store_refuses_a_second_process(tmp_path: Path, tiny_llm: LoadedModel, embedder: Embedder) -> None:
    store = BankStore(Settings(data_dir=tmp_path / "data"), llm=tiny_llm, embedder=embedder)
    try:
        out = subprocess.run(
            [sys.executable, "-c", "import sys; from pathlib import Path; from kvstore.storage import lock\n"
             "try:\n    lock.acquire(Path(sys.argv[1]))\nexcept lock.DataDirInUse as e:\n    print(e.detail)",
             str(tmp_path / "data")], capture_output=True, text=True, cwd=ROOT, timeout=120,
            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "client")])})
        assert f"in use by pid {os.getpid()}" in out.stdout and "one kvrag process per data directory" in out.stdout
    finally:
        store.close()


def test_kvrag_serve_on_a_held_data_dir_stops_with_one_line(tmp_path: Path) -> None:
    held = data_dir_lock.acquire(tmp_path)  # this process holds it, as a running server would
    try:
        out = subprocess.run([sys.executable, "-m", "kvrag.cli", "serve", "--data-dir", str(tmp_path), "--port", "1"],
                             capture_output=True, text=True, cwd=ROOT, timeout=300,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "client")])})
    finally:
        held.release()
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: data directory {tmp_path} is in use by pid {os.getpid()}"), out.stderr


def test_two_data_dirs_on_one_sqlite_catalog_are_refused(tmp_path: Path, tiny_llm: LoadedModel,
                                                         embedder: Embedder) -> None:
    url = f"sqlite:///{tmp_path / 'shared' / 'catalog.sqlite3'}"
    store = BankStore(Settings(data_dir=tmp_path / "one", database_url=url), llm=tiny_llm, embedder=embedder)
    try:
        out = subprocess.run(
            [sys.executable, "-c", "import sys; from kvstore.storage import lock\n"
             "try:\n    lock.acquire_sqlite_catalog(sys.argv[1])\nexcept lock.DataDirInUse as e:\n    print(e.detail)",
             url], capture_output=True, text=True, cwd=ROOT, timeout=120,
            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "client")])})
        assert out.stdout.startswith(f"SQLite catalog {tmp_path / 'shared' / 'catalog.sqlite3'} is in use by pid "
                                     f"{os.getpid()}"), out.stdout + out.stderr
    finally:
        store.close()
