"""Shared fixtures: tiny random-weight models (fast), the packaged embedder, the packaged LLM (slow)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from kvstore.bank import BankStore
from kvstore.config import Settings
from kvstore.model.loader import Embedder, LoadedModel, load_llm
from kvstore.testing.tiny import CHAT_TEMPLATE, CORPUS, TINY_FAMILIES, build_tiny, build_tokenizer  # noqa: F401  (re-exported for tests)
from server.settings import ServerSettings
from tests.seaweed import s3_bucket, s3_env, seaweed  # noqa: F401  (a real SeaweedFS: one a session, a bucket a test)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` skip cleanly where torch sees no CUDA device (CI, the development boxes)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (no CUDA device visible to torch)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_llm() -> LoadedModel:
    return build_tiny("llama")


@pytest.fixture(scope="session")
def embedder(tmp_path_factory: pytest.TempPathFactory) -> Embedder:
    return Embedder(Settings(data_dir=tmp_path_factory.mktemp("emb")))


@pytest.fixture
def make_store(tmp_path: Path, tiny_llm: LoadedModel, embedder: Embedder) -> Iterator[Callable[..., BankStore]]:
    """Open (and re-open, to simulate a restart) a store on one data dir with the tiny model."""
    opened: list[BankStore] = []

    def factory(llm: LoadedModel | None = None, **settings: object) -> BankStore:
        # The server's settings (a superset of the engine's): server and SDK tests pass server knobs too.
        store = BankStore(ServerSettings(data_dir=tmp_path / "data", **settings), llm=llm or tiny_llm,
                          embedder=embedder)
        opened.append(store)
        return store

    yield factory
    for store in opened:
        store.sessions.kw["bind"].dispose()


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """The real packaged SmolLM2 (converted once into the user cache dir)."""
    return load_llm(Settings(data_dir=tmp_path_factory.mktemp("llm")))


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database on 127.0.0.1:5432 for one test, dropped afterwards."""
    import uuid

    psycopg = pytest.importorskip("psycopg")
    admin = "postgresql://postgres@127.0.0.1:5432/postgres"
    name = f"kvrag_test_{uuid.uuid4().hex[:10]}"
    try:
        with psycopg.connect(admin, autocommit=True, connect_timeout=3) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL at 127.0.0.1:5432 is not reachable: {exc}")
    yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
