"""Which S3 client the object-store blob store uses: obstore (Rust, object_store crate) against boto3, measured.

Both clients talk to one SeaweedFS (``tests/seaweed.py``, started here unless ``AWS_ENDPOINT_URL`` and a
``--bucket`` are given) and are set up as the store would use them: the put sends the content's SHA-256
(``x-amz-checksum-sha256``) so the server verifies what it stores, the get reads the whole body and checks its
length. The calls are interleaved (obstore then boto3, then the other way round, object after object), so
the noise of a shared machine falls on both alike; the ratios are the result, the milliseconds are this box's.

Writes bench/results/s3_clients.json.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.ttft import percentile

RESULTS = Path(__file__).parent / "results" / "s3_clients.json"


def clients(env: dict[str, str], bucket: str) -> dict[str, tuple[Callable[[str, bytes], None], Callable[[str], bytes]]]:
    import boto3
    import obstore
    from botocore.config import Config
    from obstore.store import S3Store

    b3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_REGION"],
                      config=Config(request_checksum_calculation="when_required",
                                    response_checksum_validation="when_required"))
    ob = S3Store(bucket, endpoint=env["AWS_ENDPOINT_URL"], access_key_id=env["AWS_ACCESS_KEY_ID"],
                 secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region=env["AWS_REGION"], checksum_algorithm="sha256",
                 client_options={"allow_http": True})

    def b3_put(key: str, data: bytes) -> None:
        digest = base64.b64encode(hashlib.sha256(data).digest()).decode()
        b3.put_object(Bucket=bucket, Key=key, Body=data, ChecksumSHA256=digest)

    def b3_get(key: str) -> bytes:
        r = b3.get_object(Bucket=bucket, Key=key)
        data: bytes = r["Body"].read()
        assert len(data) == r["ContentLength"]
        return data

    def ob_put(key: str, data: bytes) -> None:
        obstore.put(ob, key, data)

    def ob_get(key: str) -> bytes:
        r = obstore.get(ob, key)
        data = bytes(r.bytes())
        assert len(data) == r.meta["size"]
        return data

    return {"obstore": (ob_put, ob_get), "boto3": (b3_put, b3_get)}


def run(env: dict[str, str], bucket: str, sizes_kb: list[int], n: int) -> dict[str, Any]:
    impls = clients(env, bucket)
    names = list(impls)
    out: dict[str, Any] = {}
    for name in names:  # connections and lazy imports are set up outside the timed calls
        for i in range(5):
            impls[name][0](f"warmup/{i}", b"x" * 1024)
            impls[name][1](f"warmup/{i}")
    for size_kb in sizes_kb:
        times: dict[str, dict[str, list[float]]] = {c: {"put": [], "get": []} for c in names}
        for i in range(n):
            order = names if i % 2 == 0 else names[::-1]
            for name in order:
                put, get = impls[name]
                data = os.urandom(size_kb * 1024)
                key = f"{name}/{hashlib.sha256(data).hexdigest()}"
                t0 = time.perf_counter()
                put(key, data)
                t1 = time.perf_counter()
                got = get(key)
                t2 = time.perf_counter()
                assert got == data
                times[name]["put"].append((t1 - t0) * 1e3)
                times[name]["get"].append((t2 - t1) * 1e3)
        row: dict[str, Any] = {}
        for name in names:
            row[name] = {op: {"p50_ms": round(statistics.median(ts), 3), "p99_ms": round(percentile(ts, 99), 3)}
                         for op, ts in times[name].items()}
        row["boto3_over_obstore"] = {op: {q: round(row["boto3"][op][q] / row["obstore"][op][q], 2)
                                          for q in ("p50_ms", "p99_ms")} for op in ("put", "get")}
        out[f"{size_kb}KB"] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes-kb", default="100,400,2900", help="object sizes, KiB")
    ap.add_argument("-n", type=int, default=200, help="objects per size and client")
    ap.add_argument("--bucket", help="an existing bucket at AWS_ENDPOINT_URL (default: start a SeaweedFS)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes_kb.split(",")]
    server = None
    with tempfile.TemporaryDirectory() as tmp:
        if args.bucket:
            env, bucket = dict(os.environ), args.bucket
        else:
            from kvstore.testing.seaweed import start_seaweed

            server = start_seaweed(Path(tmp))
            env, bucket = server.env(), server.create_bucket("bench")
        try:
            result = {"n": args.n, "store": "SeaweedFS (loopback)" if server else env["AWS_ENDPOINT_URL"],
                      "sizes": run(env, bucket, sizes, args.n)}
        finally:
            if server:
                server.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
