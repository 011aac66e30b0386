"""The object-store blob store against a real SeaweedFS: layout, failures at start, the store going away, damage
on the wire, and the local read cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kvstore.errors import CorruptBlock, StorageUnavailable, Unavailable, ValidationFailed
from kvstore.storage.blobstore import open_blob_store
from kvstore.storage.local import blob_id_of
from kvstore.storage.s3 import S3BlobStore, S3Endpoint, S3Location
from kvstore.testing.seaweed import SECRET_KEY, FaultProxy, Seaweed, free_ports, start_seaweed


def s3_store(url: str, env: dict[str, str], tmp_path: Path, *, cache_bytes: int = 0,
             namespace: str = "blobs") -> S3BlobStore:
    store = open_blob_store(url, tmp_path / namespace, cache_bytes=cache_bytes, env=env)
    assert isinstance(store, S3BlobStore)
    return store


# -- layout -------------------------------------------------------------------------------------------------------


def test_one_object_per_blob_under_prefix_and_namespace(seaweed: Seaweed, s3_bucket: str, s3_env: dict[str, str],
                                                         tmp_path: Path) -> None:
    store = s3_store(f"s3://{s3_bucket}/team/a", s3_env, tmp_path)
    data = os.urandom(100_000)
    blob_id = store.put(data)
    listed = seaweed.client().list_objects_v2(Bucket=s3_bucket)["Contents"]
    assert [(o["Key"], o["Size"]) for o in listed] == [(f"team/a/blobs/{blob_id}", len(data))]
    head = seaweed.client().head_object(Bucket=s3_bucket, Key=f"team/a/blobs/{blob_id}", ChecksumMode="ENABLED")
    assert head["ChecksumSHA256"]  # sent with the put, so the store verified the bytes it kept


def test_prefixes_and_namespaces_are_isolated(s3_bucket: str, s3_env: dict[str, str], tmp_path: Path) -> None:
    stores = {
        "a/blobs": s3_store(f"s3://{s3_bucket}/a", s3_env, tmp_path / "1"),
        "a2/blobs": s3_store(f"s3://{s3_bucket}/a2", s3_env, tmp_path / "2"),  # "a" is no prefix of "a2"
        "a/session-blobs": s3_store(f"s3://{s3_bucket}/a", s3_env, tmp_path / "3", namespace="session-blobs"),
        "a/b/blobs": s3_store(f"s3://{s3_bucket}/a/b", s3_env, tmp_path / "4"),  # nested below "a"
        "blobs": s3_store(f"s3://{s3_bucket}", s3_env, tmp_path / "5"),
    }
    ids = {name: store.put(name.encode()) for name, store in stores.items()}
    for name, store in stores.items():
        assert list(store.ids()) == [ids[name]], name
        other = next(i for n, i in ids.items() if n != name)
        with pytest.raises(CorruptBlock, match="missing"):
            store.get(other)


# -- configuration and start ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["s3://", "s3://Bad_Bucket/x", "s3://ab/x", "s3://bucket/../x", "s3://bucket/a b",
                                 "s3://bucket/x?versionId=1", "s3://user@bucket/x", "https://bucket/x",
                                 "s3://bucket:9000/x", "s3://bu..cket/x"])
def test_malformed_urls_are_refused(url: str) -> None:
    with pytest.raises(ValidationFailed):
        S3Location.parse(url)


def test_location_parse_normalises_slashes() -> None:
    assert S3Location.parse("s3://my-bucket") == S3Location("my-bucket", "")
    assert S3Location.parse("s3://my-bucket/a//b/") == S3Location("my-bucket", "a/b")


def test_plain_http_only_on_loopback_unless_allowed() -> None:
    for url in ("http://127.0.0.1:8333", "http://localhost:8333", "http://[::1]:8333", "https://s3.example.com"):
        assert S3Endpoint.from_env({"AWS_ENDPOINT_URL": url}).url == url
    with pytest.raises(ValidationFailed, match="plain HTTP off loopback"):
        S3Endpoint.from_env({"AWS_ENDPOINT_URL": "http://10.1.2.3:9000"})
    assert S3Endpoint.from_env({"AWS_ENDPOINT_URL": "http://10.1.2.3:9000"}, allow_http=True).allow_http
    with pytest.raises(ValidationFailed):
        S3Endpoint.from_env({"AWS_ENDPOINT_URL": "ftp://127.0.0.1"})
    with pytest.raises(ValidationFailed, match="must not hold credentials"):
        S3Endpoint.from_env({"AWS_ENDPOINT_URL": "https://key:secret@s3.example.com"})
    env = {"AWS_ENDPOINT_URL": "https://a.example", "AWS_ENDPOINT_URL_S3": "https://s3.example",
           "AWS_DEFAULT_REGION": "eu-west-3", "AWS_SESSION_TOKEN": "t"}
    ep = S3Endpoint.from_env(env)
    assert (ep.url, ep.region, ep.session_token, ep.allow_http) == ("https://s3.example", "eu-west-3", "t", False)


def test_bad_credentials_fail_the_start_in_one_line(s3_bucket: str, s3_env: dict[str, str], tmp_path: Path) -> None:
    env = {**s3_env, "AWS_SECRET_ACCESS_KEY": SECRET_KEY + "-wrong"}
    with pytest.raises(StorageUnavailable) as info:
        s3_store(f"s3://{s3_bucket}/kv", env, tmp_path)
    assert "refused the credentials" in info.value.detail and "\n" not in info.value.detail
    env = {**s3_env, "AWS_ACCESS_KEY_ID": "nobody"}
    with pytest.raises(StorageUnavailable, match="refused the credentials"):
        s3_store(f"s3://{s3_bucket}/kv", env, tmp_path)


def test_missing_bucket_fails_the_start_in_one_line(s3_env: dict[str, str], tmp_path: Path) -> None:
    with pytest.raises(StorageUnavailable) as info:
        s3_store("s3://no-such-bucket-kvrag/kv", s3_env, tmp_path)
    assert "bucket 'no-such-bucket-kvrag' does not exist" in info.value.detail and "\n" not in info.value.detail
    assert isinstance(info.value, Unavailable) and info.value.code == "unavailable"  # 503 where the server maps it


def test_unreachable_endpoint_fails_the_start_in_one_line(tmp_path: Path) -> None:
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_ports(1)[0]}", "AWS_ACCESS_KEY_ID": "k",
           "AWS_SECRET_ACCESS_KEY": "s", "AWS_REGION": "us-east-1"}
    with pytest.raises(StorageUnavailable) as info:
        s3_store("s3://some-bucket/kv", env, tmp_path)
    assert "unreachable" in info.value.detail and "\n" not in info.value.detail


# -- the store going away -----------------------------------------------------------------------------------------


def test_store_going_away_is_unavailable_and_loses_nothing_acknowledged(tmp_path: Path) -> None:
    server = start_seaweed(tmp_path / "own")  # its own server: this test stops it
    try:
        bucket = server.create_bucket()
        url = f"s3://{bucket}/kv"
        store = s3_store(url, server.env(), tmp_path, cache_bytes=1 << 20)
        acked = [store.put(os.urandom(50_000)) for _ in range(5)]
        uncached = acked[0]
        assert store.cache is not None
        store.cache.discard(uncached)

        server.stop(kill=True)
        with pytest.raises(StorageUnavailable, match="get") as info:
            store.get(uncached)
        # What an API caller reads (the 503's detail) names neither the endpoint nor the bucket.
        assert server.endpoint.split("//")[1] not in info.value.detail and bucket not in info.value.detail
        pending = os.urandom(1000)
        with pytest.raises(StorageUnavailable, match="put"):
            store.put(pending)
        assert blob_id_of(pending) not in store.cache  # the cache never holds what the store did not acknowledge
        for call in (lambda: list(store.ids()), lambda: store.exists(uncached), lambda: store.delete(uncached)):
            with pytest.raises(Unavailable):
                call()
        assert store.get(acked[1]) and store.cache.hits == 1  # cached blocks are still served meanwhile

        server.start()
        fresh = s3_store(url, server.env(), tmp_path / "fresh")  # no cache: every byte from the store
        assert sorted(fresh.ids()) == sorted(acked)
        assert all(blob_id_of(fresh.get(i)) == i for i in acked)
        assert store.get(uncached) and store.put(pending) == blob_id_of(pending)  # the first store recovers too
    finally:
        server.stop(kill=True)


# -- damage on the wire and in the store ---------------------------------------------------------------------------


@pytest.fixture
def proxy(seaweed: Seaweed) -> FaultProxy:
    p = FaultProxy(seaweed.endpoint)
    yield p  # type: ignore[misc]
    p.close()


def test_a_truncated_or_altered_body_never_passes(proxy: FaultProxy, s3_bucket: str, s3_env: dict[str, str],
                                                  tmp_path: Path) -> None:
    store = s3_store(f"s3://{s3_bucket}/kv", {**s3_env, "AWS_ENDPOINT_URL": proxy.endpoint}, tmp_path)
    data = os.urandom(200_000)
    blob_id = store.put(data)
    assert store.get(blob_id) == data  # through the proxy, undamaged

    proxy.mode = "truncate"
    with pytest.raises(StorageUnavailable):  # a cut connection is the store's fault: 503, try again
        store.get(blob_id)
    proxy.mode = "flip"
    with pytest.raises(CorruptBlock, match="checksum"):  # full length, wrong bytes: the block is damaged
        store.get(blob_id)
    assert proxy.damaged >= 2
    proxy.mode = None
    assert store.get(blob_id) == data


def test_an_object_replaced_behind_our_back_is_a_corrupt_block(seaweed: Seaweed, s3_bucket: str,
                                                                s3_env: dict[str, str], tmp_path: Path) -> None:
    store = s3_store(f"s3://{s3_bucket}/kv", s3_env, tmp_path)
    blob_id = store.put(b"the real block")
    seaweed.client().put_object(Bucket=s3_bucket, Key=f"kv/blobs/{blob_id}", Body=b"the real bloc")  # truncated
    with pytest.raises(CorruptBlock, match="checksum"):
        store.get(blob_id)
    assert store.put(b"the real block", replace=True) == blob_id  # rebuilding it heals it
    assert store.get(blob_id) == b"the real block"


# -- the read cache ------------------------------------------------------------------------------------------------


def test_a_block_read_twice_is_fetched_once(seaweed: Seaweed, s3_bucket: str, s3_env: dict[str, str],
                                            tmp_path: Path) -> None:
    writer = s3_store(f"s3://{s3_bucket}/kv", s3_env, tmp_path / "w")
    data = os.urandom(120_000)
    blob_id = writer.put(data)
    reader = s3_store(f"s3://{s3_bucket}/kv", s3_env, tmp_path / "r", cache_bytes=1 << 20)
    assert reader.get(blob_id) == data and reader.fetches == 1
    assert reader.get(blob_id) == data and reader.fetches == 1
    seaweed.client().delete_object(Bucket=s3_bucket, Key=f"kv/blobs/{blob_id}")
    assert reader.get(blob_id) == data  # from the cache: the store was not asked
    assert reader.stats() == {"fetches": 1, "cache_hits": 2, "cache_misses": 1, "cache_corrupt": 0,
                              "cache_bytes": len(data)}
    # A put fills the cache too (store first, cache after): the writer's own reads never fetch.
    cached_writer = s3_store(f"s3://{s3_bucket}/kv", s3_env, tmp_path / "cw", cache_bytes=1 << 20)
    other = cached_writer.put(os.urandom(1000))
    assert cached_writer.get(other) and cached_writer.fetches == 0


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty"])
def test_a_damaged_cache_file_is_refetched_not_served(s3_bucket: str, s3_env: dict[str, str], tmp_path: Path,
                                                      damage: str) -> None:
    store = s3_store(f"s3://{s3_bucket}/kv", s3_env, tmp_path, cache_bytes=1 << 20)
    data = os.urandom(80_000)
    blob_id = store.put(data)
    assert store.cache is not None
    path = store.cache.root / blob_id[:2] / blob_id
    raw = path.read_bytes()
    path.write_bytes({"flip": raw[:-1] + bytes([raw[-1] ^ 1]), "truncate": raw[:-100], "empty": b""}[damage])
    assert store.get(blob_id) == data
    assert store.fetches == 1 and store.cache.corrupt == 1
    assert path.read_bytes() == data  # the cache holds the good copy again
    assert store.get(blob_id) == data and store.fetches == 1


def test_the_cache_stays_within_its_byte_budget(s3_bucket: str, s3_env: dict[str, str], tmp_path: Path) -> None:
    size = 30_000
    store = s3_store(f"s3://{s3_bucket}/kv", s3_env, tmp_path, cache_bytes=int(3.5 * size))
    cache = store.cache
    assert cache is not None
    a, b, c = (store.put(os.urandom(size)) for _ in range(3))
    assert store.get(a)  # the oldest write is now the most recently used
    d = store.put(os.urandom(size))
    on_disk = {p.name: p.stat().st_size for p in cache.root.glob("*/*")}
    assert set(on_disk) == {a, c, d}  # b, least recently used, went
    assert cache.nbytes == sum(on_disk.values()) <= 3.5 * size
    more = [store.put(os.urandom(size)) for _ in range(6)]
    assert cache.nbytes == sum(p.stat().st_size for p in cache.root.glob("*/*")) <= 3.5 * size
    assert len(cache) == 3
    fetched = store.fetches
    assert store.get(more[-1]) and store.fetches == fetched  # a hit
    assert store.get(b) and store.fetches == fetched + 1  # evicted, still stored: fetched again
