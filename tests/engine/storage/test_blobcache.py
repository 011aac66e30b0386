"""The on-disk read cache on its own: verified hits, LRU under a byte budget, restarts, atomic files."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from kvstore.storage.blobcache import BlobCache
from kvstore.storage.local import blob_id_of


def blob(n: int) -> tuple[str, bytes]:
    data = os.urandom(n)
    return blob_id_of(data), data


def test_hit_miss_and_discard(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path, 1 << 20)
    blob_id, data = blob(1000)
    assert cache.get(blob_id) is None and cache.misses == 1
    cache.put(blob_id, data)
    assert cache.get(blob_id) == data and cache.hits == 1
    assert [p.name for p in tmp_path.glob("*/*")] == [blob_id]  # no temp file left behind
    cache.discard(blob_id)
    assert cache.get(blob_id) is None and not list(tmp_path.glob("*/*")) and cache.nbytes == 0


def test_a_file_that_fails_its_name_is_dropped(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path, 1 << 20)
    blob_id, data = blob(5000)
    cache.put(blob_id, data)
    (tmp_path / blob_id[:2] / blob_id).write_bytes(data[:-1] + b"\0")
    assert cache.get(blob_id) is None and cache.corrupt == 1
    assert not (tmp_path / blob_id[:2] / blob_id).exists() and blob_id not in cache and cache.nbytes == 0


def test_budget_lru_and_oversized_blobs(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path, 10_000)
    a, b, c = blob(4000), blob(4000), blob(4000)
    cache.put(*a)
    cache.put(*b)
    assert cache.get(a[0]) == a[1]
    cache.put(*c)  # 12 000 > 10 000: b, least recently used, goes
    assert a[0] in cache and c[0] in cache and b[0] not in cache
    assert cache.nbytes == 8000 == sum(p.stat().st_size for p in tmp_path.glob("*/*"))
    big = blob(10_001)
    cache.put(*big)  # larger than the whole budget: not kept, nothing evicted for it
    assert big[0] not in cache and len(cache) == 2


def test_a_restart_reindexes_in_access_order_and_enforces_a_smaller_budget(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path, 1 << 20)
    blobs = [blob(3000) for _ in range(4)]
    for i, (blob_id, data) in enumerate(blobs):
        cache.put(blob_id, data)
        os.utime(tmp_path / blob_id[:2] / blob_id, (time.time() - 100 + i, time.time() - 100 + i))
    assert cache.get(blobs[0][0])  # a hit refreshes the file's time: most recent after a restart
    (tmp_path / "ab").mkdir(exist_ok=True)
    (tmp_path / "ab" / ".tmp-leftover").write_bytes(b"half a write from a killed process")
    again = BlobCache(tmp_path, 6500)
    assert len(again) == 2 and blobs[0][0] in again and blobs[3][0] in again
    assert not (tmp_path / "ab" / ".tmp-leftover").exists()
    assert sorted(p.name for p in tmp_path.glob("*/*")) == sorted([blobs[0][0], blobs[3][0]])
    assert again.get(blobs[3][0]) == blobs[3][1]


def test_threads_reading_and_writing_keep_the_books_straight(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path, 20_000)
    blobs = [blob(3000) for _ in range(12)]
    errors: list[BaseException] = []

    def work(offset: int) -> None:
        try:
            for i in range(60):
                blob_id, data = blobs[(i + offset) % len(blobs)]
                got = cache.get(blob_id)
                assert got is None or got == data
                if got is None:
                    cache.put(blob_id, data)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert cache.nbytes == sum(p.stat().st_size for p in tmp_path.glob("*/*")) <= 20_000
