"""One contract, two implementations: local files and the object store (a real SeaweedFS) behave alike."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from kvstore.errors import CorruptBlock
from kvstore.storage.blobstore import BlobStore, LocalFilesBlobStore, cache_dir_for, open_blob_store
from kvstore.storage.local import blob_id_of
from kvstore.storage.s3 import S3BlobStore

# Object stores keep whole seconds of LastModified; ids_older_than counts one more second as "maybe newer".
SETTLE_S = {"local": 0.05, "s3": 2.1}


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
    if request.param == "local":
        return open_blob_store(None, tmp_path / "blobs")
    bucket = request.getfixturevalue("s3_bucket")
    env = request.getfixturevalue("s3_env")
    return open_blob_store(f"s3://{bucket}/kv", tmp_path / "blobs", cache_bytes=1 << 20, env=env)


def kind(store: BlobStore) -> str:
    return "s3" if isinstance(store, S3BlobStore) else "local"


def test_both_satisfy_the_protocol_and_the_factory_picks_by_url(store: BlobStore, tmp_path: Path) -> None:
    assert isinstance(store, BlobStore)
    if kind(store) == "local":
        assert isinstance(store, LocalFilesBlobStore) and store.root == tmp_path / "blobs"
    else:
        assert isinstance(store, S3BlobStore) and store.namespace == "blobs"
        assert store.cache is not None and store.cache.root == cache_dir_for(tmp_path / "blobs")
        assert cache_dir_for(tmp_path / "blobs") == tmp_path / "blob-cache" / "blobs"  # beside, not inside


def test_round_trip_is_content_addressed(store: BlobStore) -> None:
    data = os.urandom(150_000)
    blob_id = store.put(data)
    assert blob_id == blob_id_of(data) and len(blob_id) == 64
    assert store.get(blob_id) == data
    assert store.exists(blob_id)
    assert store.put(b"") == blob_id_of(b"") and store.get(blob_id_of(b"")) == b""


def test_put_is_idempotent_and_ids_lists_each_blob_once(store: BlobStore) -> None:
    a, b = os.urandom(1000), os.urandom(2000)
    ids = {store.put(a), store.put(a), store.put(b), store.put(a, replace=True)}
    assert ids == {blob_id_of(a), blob_id_of(b)}
    listed = list(store.ids())
    assert sorted(listed) == sorted(ids)  # once each
    assert store.get(blob_id_of(a)) == a


def test_delete_then_missing_is_a_corrupt_block(store: BlobStore) -> None:
    blob_id = store.put(b"to be deleted")
    store.delete(blob_id)
    assert not store.exists(blob_id)
    assert blob_id not in set(store.ids())
    with pytest.raises(CorruptBlock, match="missing"):
        store.get(blob_id)
    store.delete(blob_id)  # deleting what is gone is fine
    with pytest.raises(CorruptBlock, match="missing"):
        store.get(blob_id_of(b"never stored"))


@pytest.mark.parametrize("bad", ["../../etc/passwd", "ABCDEF" * 11, "a" * 63, "", "a" * 64 + "/x", "a" * 64 + "\n"])
def test_malformed_ids_are_refused_before_any_io(store: BlobStore, bad: str) -> None:
    for op in (store.get, store.exists, store.delete):
        with pytest.raises(CorruptBlock, match="malformed"):
            op(bad)


def test_ids_older_than_sees_write_times_and_a_second_put_restarts_the_age(store: BlobStore) -> None:
    old = store.put(b"written a while ago")
    time.sleep(SETTLE_S[kind(store)])
    cutoff = time.time()
    assert set(store.ids_older_than(cutoff)) == {old}
    new = store.put(b"written after the cutoff")
    store.put(b"written a while ago")  # an ingest reusing the blob: no longer old enough to collect
    assert set(store.ids_older_than(cutoff)) == set()
    assert set(store.ids()) == {old, new}
    assert set(store.ids_older_than(time.time() - 3600)) == set()
