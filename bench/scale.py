"""Scale out, the blob part: block reads and ingest writes on an S3-compatible object store against local files.

For each block size, the same random blobs go to three stores through the engine's blob-store contract
(kvstore/storage):

- ``local``: files under a temp dir (``LocalFilesBlobStore``: temp file, fsync, rename, dir fsync); reads come
  from the page cache, as they do on a box with RAM to spare;
- ``s3 fetched``: ``S3BlobStore`` with no cache, so every get is a request to the object store;
- ``s3 cached``: ``S3BlobStore`` with its disk cache; gets after the first are cache hits (the file is read
  and its SHA-256 checked against its name).

Reported per size and store: get p50/p99 (ms), ingest MB/s writing one blob at a time (what ``put_document``
does today) and with 4 writers at once (what a concurrent uploader would get). Block sizes are SmolLM2-135M's
(30 layers x 3 kv heads x 64 dims x k,v = 11 520 values per token; 256 tokens = 2.95 M values) at the bits
per value bench/codec measured: tklt5 (the default), int8 and fp16. Blob contents are random: stores do not
compress, so only the size matters.

The object store is a SeaweedFS started here on loopback (tests/seaweed.py), or the one ``AWS_ENDPOINT_URL``
names with ``--bucket``. On one shared 2-core box with the store on the same machine this measures the
client and protocol cost, not a network: a remote store adds its round trip to every fetch. SeaweedFS here
acknowledges a put once written, without fsync; the local store fsyncs every blob. Numbers are noisy
(other jobs share the CPUs): compare within one run. Writes bench/results/scale.json (key ``blob``; other
parts of the benchmark keep their keys) and scale_blob.png.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from tqdm import tqdm

from bench.squad import RESULTS_DIR, machine_info, print_table, save_figure, write_json
from bench.ttft import percentile
from kvstore.storage.blobstore import BlobStore, LocalFilesBlobStore
from kvstore.storage.local import blob_id_of
from kvstore.storage.s3 import S3BlobStore

VALUES_PER_BLOCK = 30 * 3 * 64 * 2 * 256  # SmolLM2-135M, one 256-token block: layers x kv heads x dims x (k, v)
BITS_PER_VALUE = {"tklt5": 3.175, "int8": 8.248, "fp16": 14.7}  # bench/results/codec.json, bits_per_value
STORES = ("local", "s3 fetched", "s3 cached")


def block_sizes() -> dict[str, int]:
    """Bytes of one 256-token block per codec, from bench/codec's measured bits per value when present."""
    bits = dict(BITS_PER_VALUE)
    codec = RESULTS_DIR / "codec.json"
    if codec.exists():
        for row in json.loads(codec.read_text()).get("rows", []):
            if row.get("preset") in bits and row.get("bits_per_value"):
                bits[row["preset"]] = float(row["bits_per_value"])
    return {name: int(VALUES_PER_BLOCK * b / 8) for name, b in bits.items()}


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def put_rate(store: BlobStore, blobs: list[bytes], writers: int) -> float:
    """MB/s writing ``blobs`` with ``writers`` threads (1 = one after another)."""
    t0 = time.perf_counter()
    if writers == 1:
        for b in blobs:
            store.put(b)
    else:
        with ThreadPoolExecutor(writers) as pool:
            list(pool.map(store.put, blobs))
    return sum(map(len, blobs)) / 1e6 / (time.perf_counter() - t0)


def measure_size(stores: dict[str, BlobStore], size: int, n: int, rounds: int, seed: int) -> dict[str, dict[str, Any]]:
    """Puts then gets of ``n`` blobs of ``size`` bytes, the stores interleaved blob by blob so that noise from
    other jobs falls on all of them alike."""
    rng = random.Random(seed)
    blobs = [os.urandom(size) for _ in range(n)]
    concurrent = [os.urandom(size) for _ in range(n)]
    out: dict[str, dict[str, Any]] = {}
    # "s3 cached" and "s3 fetched" share the bucket; each store writes its own copies of every blob.
    put_ms: dict[str, list[float]] = {name: [] for name in stores}
    ids: list[str] = []
    for b in blobs:
        for name, store in stores.items():
            put_ms[name].append(timed(partial(store.put, b)))
        ids.append(blob_id_of(b))
    for name, store in stores.items():
        total_s = sum(put_ms[name]) / 1e3
        out[name] = {"put_MBps": round(size * n / 1e6 / total_s, 1),
                     "put_MBps_4_writers": round(put_rate(store, concurrent, 4), 1)}
    cached = stores["s3 cached"]
    assert isinstance(cached, S3BlobStore) and cached.cache is not None
    for blob_id in ids:  # the cache holds what its own puts wrote; reads below are hits
        assert blob_id in cached.cache
    get_ms: dict[str, list[float]] = {name: [] for name in stores}
    fetched = stores["s3 fetched"]
    assert isinstance(fetched, S3BlobStore)
    fetches_before = fetched.fetches
    for _ in range(rounds):
        order = ids[:]
        rng.shuffle(order)
        for blob_id in order:
            for name, store in stores.items():
                get_ms[name].append(timed(partial(store.get, blob_id)))
    for name in stores:
        ms = get_ms[name]
        out[name].update(get_p50_ms=round(percentile(ms, 50), 3), get_p99_ms=round(percentile(ms, 99), 3),
                         gets=len(ms))
    assert fetched.fetches - fetches_before == n * rounds  # every timed get really went to the store
    return out


def figure(result: dict[str, Any]) -> Figure:
    fig = Figure(figsize=(11, 4.2))
    ax_get, ax_put = fig.subplots(1, 2)
    sizes = list(result["sizes"])
    width = 0.8 / len(STORES)
    for k, store in enumerate(STORES):
        xs = [i + (k - 1) * width for i in range(len(sizes))]
        p50 = [result["sizes"][s]["stores"][store]["get_p50_ms"] for s in sizes]
        p99 = [result["sizes"][s]["stores"][store]["get_p99_ms"] for s in sizes]
        bars = ax_get.bar(xs, p50, width, label=f"{store} p50")
        ax_get.scatter(xs, p99, marker="_", s=200, color=bars.patches[0].get_facecolor(), zorder=3)
        ax_put.bar(xs, [result["sizes"][s]["stores"][store]["put_MBps"] for s in sizes], width, label=store)
    labels = [f"{s}\n{result['sizes'][s]['bytes'] / 1e6:.2f} MB" for s in sizes]
    for ax in (ax_get, ax_put):
        ax.set_xticks(range(len(sizes)), labels)
    ax_get.set_yscale("log")
    ax_get.set_ylabel("get latency, ms (bar p50, tick p99; log)")
    ax_put.set_ylabel("ingest, MB/s (one writer)")
    for ax in (ax_get, ax_put):  # below the axes: nothing to hide
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3)
    fig.suptitle(f"Blob store, 256-token SmolLM2 blocks: {result['object_store']} vs local files "
                 f"(noisy shared 2-core box)", fontsize=10)
    return fig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few blobs of each size: proves the run, not the numbers")
    ap.add_argument("--mb-per-size", type=float, default=160.0, help="bytes written per size and store, MB")
    ap.add_argument("--rounds", type=int, default=2, help="reads of each blob per store")
    ap.add_argument("--bucket", help="an existing bucket at AWS_ENDPOINT_URL (default: start a SeaweedFS here)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot-only", action="store_true", help="redraw the PNG from bench/results/scale.json")
    args = ap.parse_args()
    if args.plot_only:
        save_figure(figure(json.loads((RESULTS_DIR / "scale.json").read_text())["blob"]), "scale_blob")
        return
    sizes = block_sizes()
    server = None
    with tempfile.TemporaryDirectory(prefix="kvrag-scale-") as tmp:
        root = Path(tmp)
        if args.bucket:
            env, bucket, where = dict(os.environ), args.bucket, os.environ.get("AWS_ENDPOINT_URL", "AWS S3")
        else:
            from kvstore.testing.seaweed import start_seaweed

            server = start_seaweed(root / "seaweed")
            env, bucket, where = server.env(), server.create_bucket("scale"), "SeaweedFS on loopback"
        try:
            url = f"s3://{bucket}/bench-{int(time.time())}"
            stores: dict[str, BlobStore] = {
                "local": LocalFilesBlobStore(root / "local"),
                "s3 fetched": S3BlobStore.from_url(url, namespace="fetched", cache_dir=None, cache_bytes=0,
                                                   allow_http=False, env=env),
                "s3 cached": S3BlobStore.from_url(url, namespace="cached", cache_dir=root / "cache",
                                                  cache_bytes=1 << 40, allow_http=False, env=env),
            }
            for store in stores.values():  # connections and first-use setup stay out of the timings
                store.get(store.put(b"warm-up"))
            result: dict[str, Any] = {"object_store": where, "sizes": {}}
            if server:
                result["seaweed_startup_s"] = round(server.startup_s, 2)
            for i, (name, size) in enumerate(tqdm(sizes.items(), desc="block sizes")):
                n = 4 if args.quick else max(20, min(200, int(args.mb_per_size * 1e6 / size)))
                rounds = 1 if args.quick else args.rounds
                result["sizes"][name] = {"bytes": size, "blobs": n,
                                         "stores": measure_size(stores, size, n, rounds, args.seed + i)}
        finally:
            if server:
                server.stop()
    result["machine"] = machine_info("none (blob stores only)")
    result["quick"] = args.quick
    rows = [[name, f"{r['bytes'] / 1e6:.2f} MB", store, v["get_p50_ms"], v["get_p99_ms"], v["put_MBps"],
             v["put_MBps_4_writers"]]
            for name, r in result["sizes"].items() for store, v in r["stores"].items()]
    print_table("blob stores", ["codec", "block", "store", "get p50 ms", "get p99 ms", "put MB/s",
                                "put MB/s x4"], rows)
    if args.quick:
        print("--quick: results not written")
        return
    path = RESULTS_DIR / "scale.json"
    payload = json.loads(path.read_text()) if path.exists() else {}
    payload["blob"] = result
    write_json("scale", payload)
    save_figure(figure(result), "scale_blob")


if __name__ == "__main__":
    main()
