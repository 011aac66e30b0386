"""bench/scale's blob part on a tiny scale against the real SeaweedFS: it runs and reports every store."""

from __future__ import annotations

from pathlib import Path

from bench.scale import STORES, block_sizes, measure_size
from kvstore.storage.blobstore import LocalFilesBlobStore
from kvstore.storage.s3 import S3BlobStore


def test_block_sizes_follow_the_model_shape_and_codec_bits() -> None:
    sizes = block_sizes()
    assert 1.0e6 < sizes["tklt5"] < 1.4e6  # 2.95 M values at ~3.2 bits
    assert sizes["tklt5"] < sizes["int8"] < sizes["fp16"] < 6e6


def test_measure_size_reports_each_store_and_reads_from_the_object_store(s3_bucket: str, s3_env: dict[str, str],
                                                                         tmp_path: Path) -> None:
    url = f"s3://{s3_bucket}/bench"
    stores = {"local": LocalFilesBlobStore(tmp_path / "local"),
              "s3 fetched": S3BlobStore.from_url(url, namespace="f", cache_dir=None, cache_bytes=0, allow_http=False,
                                                 env=s3_env),
              "s3 cached": S3BlobStore.from_url(url, namespace="c", cache_dir=tmp_path / "cache", cache_bytes=1 << 30,
                                                allow_http=False, env=s3_env)}
    out = measure_size(stores, 20_000, n=3, rounds=2, seed=0)
    assert set(out) == set(STORES)
    for row in out.values():
        assert row["gets"] == 6 and row["get_p50_ms"] <= row["get_p99_ms"] and row["put_MBps"] > 0
    cached = stores["s3 cached"]
    assert isinstance(cached, S3BlobStore) and cached.fetches == 0  # every read a cache hit
