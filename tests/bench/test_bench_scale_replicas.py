"""bench/scale_replicas' TTFT part on the tiny model and the real SeaweedFS: each condition reads its blocks from
where it says (the fetched one really goes to the object store, the cached one never does)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.scale_replicas import BANK, CONDITIONS, query_ttft
from kvstore.bank import BankStore
from kvstore.config import Settings
from kvstore.model.loader import Embedder, LoadedModel
from kvstore.storage.s3 import S3BlobStore


def test_query_ttft_reads_blocks_from_each_place(tmp_path: Path, tiny_llm: LoadedModel, embedder: Embedder,
                                                 s3_bucket: str, s3_env: dict[str, str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in s3_env.items():
        monkeypatch.setenv(key, value)
    local = BankStore(Settings(data_dir=tmp_path / "local", hot_tier_bytes=0), llm=tiny_llm, embedder=embedder)
    remote = BankStore(Settings(data_dir=tmp_path / "remote", blob_url=f"s3://{s3_bucket}/kv", hot_tier_bytes=0),
                       llm=tiny_llm, embedder=embedder)
    try:
        for store in (local, remote):
            store.create_bank(BANK)
            for i, text in enumerate(["The Normans gave their name to Normandy.", "Paris is the capital of France.",
                                      "Photosynthesis converts light energy into chemical energy."]):
                store.put_document(BANK, f"p{i}", text)
        blobs = remote.blobs
        assert isinstance(blobs, S3BlobStore) and blobs.cache is not None
        fetches, hits = blobs.fetches, blobs.cache.hits
        out = query_ttft(local, remote, ["Where is Normandy?", "What does photosynthesis do?"], k=2)
        assert list(out) == list(CONDITIONS)
        assert all(row["queries"] == 2 and row["ttft_p50_ms"] > 0 for row in out.values())
        assert blobs.fetches - fetches == 2 * 2  # fetched: k blocks per question from the store
        assert blobs.cache.hits - hits == 2 * 2  # disk cache: the same blocks, never fetched
        assert blobs.cache is not None  # restored after the fetched condition
    finally:
        local.close()
        remote.close()
