"""Scale out, the serving part: query TTFT with blocks local vs fetched from the object store, and queries/s with
1, 2 and 3 replicas on one PostgreSQL catalog and one object store.

1. **TTFT by where the blocks are** (kv mode, k = 5, packaged SmolLM2): one bank ingested twice, into local files
   and into the object store (SeaweedFS on loopback, tests/seaweed.py). The hot tier is off, so every query
   decodes its 5 blocks; per question, interleaved: ``local files`` (page cache), ``object store, disk cache``
   (the replica's blob cache holds them: a file read and a SHA-256 check) and ``object store, fetched`` (the
   cache bypassed: 5 GETs). Reported: TTFT and load (blob read + decode) p50 per condition.
2. **Queries/s by replica count**: 1, then 2, then 3 ``kvrag serve`` processes on the bank above (its catalog on
   PostgreSQL, its blocks in the store), 6 closed-loop clients spread round robin over the replicas for
   ``--seconds`` each; kv mode, k = 5, 8 new tokens. Reported: queries/s and latency p50.

On this 2-core box the replicas share the same two cores, so (2) is expected flat: one replica's model already
keeps both cores busy, and each extra replica only adds its own copy of the model's work to the same CPUs. On
N machines the replicas share nothing but PostgreSQL and the store, so throughput grows with the machines until
those two saturate: per query a replica reads a few catalog rows and (on a cold cache) k blocks, a small fraction
of its model time. Writes bench/results/scale.json keys ``query_ttft`` and ``replicas`` (other keys are kept).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from bench.squad import DEFAULT_DATA, RESULTS_DIR, load_or_exit, machine_info, pick_questions, print_table, write_json
from bench.ttft import percentile
from kvstore.bank import BankStore
from kvstore.config import Settings

ROOT = Path(__file__).resolve().parents[1]
BANK = "scale"
CONDITIONS = ("local files", "object store, disk cache", "object store, fetched")
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


@contextmanager
def database() -> Iterator[str]:
    """A fresh PostgreSQL database for the run, dropped after."""
    import psycopg

    name = f"kvrag_scale_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def query_ttft(local: BankStore, remote: BankStore, questions: list[str], k: int) -> dict[str, Any]:
    """TTFT and load p50 of kv queries per condition, the conditions interleaved question by question."""
    ttft: dict[str, list[float]] = {c: [] for c in CONDITIONS}
    load: dict[str, list[float]] = {c: [] for c in CONDITIONS}
    cache = getattr(remote.blobs, "cache", None)
    assert cache is not None, "the object-store bank needs its blob cache"
    for question in questions:
        for condition in CONDITIONS:
            store = local if condition == "local files" else remote
            if condition == "object store, fetched":
                remote.blobs.cache = None  # type: ignore[attr-defined]  # this query's reads go to the store
            try:
                result = store.query(BANK, question, k=k, mode="kv", max_new_tokens=1, recompute=0.0)
            finally:
                remote.blobs.cache = cache  # type: ignore[attr-defined]
            ttft[condition].append(result.timings.ttft_ms)
            load[condition].append(result.timings.load_ms)
    return {c: {"ttft_p50_ms": round(percentile(ttft[c], 50), 1), "load_p50_ms": round(percentile(load[c], 50), 1),
                "queries": len(ttft[c])} for c in CONDITIONS}


def start_replica(i: int, root: Path, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    """``kvrag serve`` on a free loopback port with its own data dir; returns the process and its URL."""
    from kvstore.testing.seaweed import free_ports

    port = free_ports(1)[0]
    log = open(root / f"replica-{i}.log", "wb")  # noqa: SIM115 - the process owns it until it exits
    proc = subprocess.Popen([sys.executable, "-m", "kvrag.cli", "serve", "--port", str(port), "--data-dir",
                             str(root / f"replica-{i}")], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 600.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"replica at {url} exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"replica at {url} not ready in {timeout_s} s")


def closed_loop(urls: list[str], questions: list[str], clients: int, seconds: float, k: int) -> dict[str, Any]:
    """``clients`` threads, each sending its next query as soon as the last is answered, round robin over urls."""
    done: list[float] = []
    errors: list[int] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(c: int) -> None:
        with httpx.Client(timeout=300) as http:
            i = c
            while time.monotonic() < stop:
                url = urls[i % len(urls)]
                body = {"question": questions[i % len(questions)], "k": k, "mode": "kv", "max_new_tokens": 8}
                t0 = time.perf_counter()
                r = http.post(f"{url}/v1/banks/{BANK}/query", json=body)
                with lock:
                    (done.append((time.perf_counter() - t0) * 1e3) if r.status_code == 200
                     else errors.append(r.status_code))
                i += 1

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    return {"queries_per_s": round(len(done) / elapsed, 2), "latency_p50_ms": round(percentile(done, 50), 1),
            "answered": len(done), "refused": len(errors), "seconds": round(elapsed, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--paragraphs", type=int, default=12, help="SQuAD paragraphs ingested (one document each)")
    ap.add_argument("--questions", type=int, default=8, help="questions per TTFT condition")
    ap.add_argument("--seconds", type=float, default=30.0, help="closed-loop time per replica count")
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--max-replicas", type=int, default=3)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: proves the run, not the numbers; nothing saved")
    args = ap.parse_args()
    if args.quick:
        args.paragraphs, args.questions, args.seconds, args.max_replicas = 6, 2, 5.0, 2
    squad = load_or_exit(DEFAULT_DATA)
    paragraphs = list(squad.paragraphs[:args.paragraphs])
    questions = [q.text for q in pick_questions([q for q in squad.questions if q.paragraph < len(paragraphs)],
                                                args.questions)]
    from kvstore.testing.seaweed import start_seaweed

    with tempfile.TemporaryDirectory(prefix="kvrag-scale-replicas-") as tmp, database() as db_url:
        root = Path(tmp)
        seaweed = start_seaweed(root / "seaweed")
        try:
            os.environ.update(seaweed.env())  # the blob store reads the AWS variables from the environment
            blob_url = f"s3://{seaweed.create_bucket('scale')}/kv"
            local = BankStore(Settings(data_dir=root / "local", hot_tier_bytes=0))
            remote = BankStore(Settings(data_dir=root / "remote", database_url=db_url, blob_url=blob_url,
                                        hot_tier_bytes=0), llm=local.llm, embedder=local.embedder)
            for store in (local, remote):
                store.create_bank(BANK)
                for i, text in enumerate(tqdm(paragraphs, desc="ingest", unit="doc")):
                    store.put_document(BANK, f"p{i:03d}", text)
            ttft = query_ttft(local, remote, questions, args.k)
            print(f"query TTFT: {json.dumps(ttft)}", flush=True)
            local.close()
            remote.close()
            del local, remote
            env = {**os.environ, "KVRAG_DATABASE_URL": db_url, "KVRAG_BLOB_URL": blob_url,
                   "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "client")])}
            replicas: dict[str, Any] = {}
            procs: list[subprocess.Popen[bytes]] = []
            urls: list[str] = []
            try:
                for n in range(1, args.max_replicas + 1):
                    proc, url = start_replica(n, root, env)
                    procs.append(proc)
                    wait_ready(url, proc)
                    urls.append(url)
                    for u in urls:  # warm each replica (first query pays lazy set-up)
                        httpx.post(f"{u}/v1/banks/{BANK}/query", json={"question": questions[0], "k": args.k,
                                                                       "max_new_tokens": 1}, timeout=300)
                    replicas[str(n)] = closed_loop(urls, questions, args.clients, args.seconds, args.k)
                    print(f"{n} replica(s): {replicas[str(n)]}", flush=True)
            finally:
                for proc in procs:
                    proc.terminate()
                for proc in procs:
                    proc.wait(60)
        finally:
            seaweed.stop(kill=True)
    print_table("query TTFT by where the blocks are (kv, k=5, hot tier off)", ["blocks", "TTFT p50 ms",
                "load p50 ms", "queries"], [[c, v["ttft_p50_ms"], v["load_p50_ms"], v["queries"]]
                                            for c, v in ttft.items()])
    print_table("queries/s by replica count (one 2-core box)", ["replicas", "queries/s", "latency p50 ms",
                "answered", "refused"], [[n, v["queries_per_s"], v["latency_p50_ms"], v["answered"], v["refused"]]
                                         for n, v in replicas.items()])
    if args.quick:
        print("--quick: results not written")
        return
    path = RESULTS_DIR / "scale.json"
    payload = json.loads(path.read_text()) if path.exists() else {}
    meta = {"machine": machine_info("packaged SmolLM2-135M"), "paragraphs": len(paragraphs), "k": args.k}
    payload["query_ttft"] = {**meta, "questions": len(questions), "conditions": ttft}
    payload["replicas"] = {**meta, "clients": args.clients, "seconds": args.seconds, "counts": replicas}
    write_json("scale", payload)


if __name__ == "__main__":
    main()
