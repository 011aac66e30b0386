"""Load and backpressure: 16 agents mix ingest, search and query against one server for a bounded time.

The model worker's queue is kept small so it fills: a full queue answers 503 with ``Retry-After``
at once (the agents honour it), never a 500 and never a half-done write. Every acknowledged write is
found afterwards; every refused one left nothing. Latency percentiles and the server's memory are
reported in ``bench/results/reliability.json``.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import psutil

from tests.reliability.procs import ForkServer, record_figures

AGENTS = 16
SECONDS = float(os.environ.get("KVRAG_LOAD_SECONDS", "20"))
QUEUE_SIZE = 4
HOT_BUDGET = 48 << 10  # a handful of decoded tiny-model blocks: the hot tier must keep evicting
WORDS = "ledger harbour cargo amber salt timber wool north river market archive agent memory note".split()


@dataclass
class Tally:
    """What one agent saw."""

    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    statuses: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    acked: set[str] = field(default_factory=set)
    refused: set[str] = field(default_factory=set)
    missing_retry_after: int = 0
    unexpected: list[str] = field(default_factory=list)


def _agent(url: str, key: str, n: int, deadline: float, tally: Tally) -> None:
    rng = random.Random(n)
    with httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {key}"}) as c:
        i = 0
        while time.monotonic() < deadline:
            i += 1
            op = rng.choices(("ingest", "search", "query"), weights=(4, 4, 2))[0]
            doc_id = f"a{n}-{i}"
            words = " ".join(rng.choice(WORDS) for _ in range(12))
            if op == "ingest":
                req = ("PUT", f"/v1/banks/load/documents/{doc_id}", {"text": f"Agent {n} note {i}: {words}."})
            elif op == "search":
                req = ("POST", "/v1/banks/load/search", {"query": words, "k": 5})
            else:
                req = ("POST", "/v1/banks/load/query", {"question": f"What about {words}?", "k": 3,
                                                        "max_new_tokens": 2})
            started = time.perf_counter()
            r = c.request(*req[:2], json=req[2])
            elapsed = time.perf_counter() - started
            tally.statuses[r.status_code] += 1
            if r.status_code in (429, 503):
                if op == "ingest":
                    tally.refused.add(doc_id)
                retry = r.headers.get("Retry-After")
                if retry is None:
                    tally.missing_retry_after += 1
                time.sleep(min(float(retry or 1), deadline - time.monotonic()) if time.monotonic() < deadline
                           else 0)
            elif r.status_code in (200, 201):
                tally.latencies[op].append(elapsed)
                if op == "ingest":
                    tally.acked.add(doc_id)
            else:
                tally.unexpected.append(f"{req[0]} {req[1]}: {r.status_code} {r.text[:200]}")


def _gauges(exposition: str) -> dict[str, float]:
    """Unlabelled samples of a Prometheus exposition text."""
    samples = (line.split() for line in exposition.splitlines() if line and not line.startswith("#"))
    return {parts[0]: float(parts[1]) for parts in samples if len(parts) == 2}


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    ms = np.asarray(values) * 1000
    return {"n": len(values), "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1)}


def test_sixteen_agents_under_backpressure_lose_nothing(fork_server: ForkServer, tmp_path: Path) -> None:
    life = fork_server.start(tmp_path / "data", queue_size=QUEUE_SIZE, hot_tier_bytes=HOT_BUDGET)
    try:
        with life.client() as c:
            assert c.post("/v1/banks", json={"name": "load"}).status_code == 201
            keys = [c.post("/v1/keys", json={"name": f"agent-{n}", "agent": f"agent-{n}", "role": "write",
                                             "banks": ["load"]}).json()["key"] for n in range(AGENTS)]
            for i in range(4):  # something to search from the first request on
                c.put(f"/v1/banks/load/documents/seed-{i}", json={"text": f"Seed note {i} about the harbour."})
        server = psutil.Process(life.pid)
        rss_start = server.memory_info().rss
        tallies = [Tally() for _ in range(AGENTS)]
        deadline = time.monotonic() + SECONDS
        threads = [threading.Thread(target=_agent, args=(life.url, keys[n], n, deadline, tallies[n]))
                   for n in range(AGENTS)]
        started = time.monotonic()
        for t in threads:
            t.start()
        rss_peak = rss_start
        while any(t.is_alive() for t in threads):
            rss_peak = max(rss_peak, server.memory_info().rss)
            time.sleep(0.2)
        wall = time.monotonic() - started
        statuses: dict[int, int] = defaultdict(int)
        for tally in tallies:
            for code, count in tally.statuses.items():
                statuses[code] += count
        acked = set().union(*(t.acked for t in tallies))
        refused = set().union(*(t.refused for t in tallies))
        with life.client() as c:
            stored: set[str] = set()
            cursor = None
            while True:
                page = c.get("/v1/banks/load/documents",
                             params={"limit": 1000, **({"cursor": cursor} if cursor else {})}).json()
                stored |= {d["doc_id"] for d in page["documents"]}
                if not (cursor := page["next_cursor"]):
                    break
            stats = c.get("/v1/banks/load").json()
            hot = _gauges(c.get("/metrics").text)
    finally:
        life.signal(signal.SIGTERM)
        life.wait_dead()
    unexpected = [u for t in tallies for u in t.unexpected]
    assert not unexpected, unexpected[:5]
    assert not any(code >= 500 and code != 503 for code in statuses), dict(statuses)
    assert statuses.get(503, 0) + statuses.get(429, 0) > 0, "the queue never filled: backpressure was not exercised"
    assert sum(t.missing_retry_after for t in tallies) == 0
    assert acked <= stored, f"lost acknowledged writes: {sorted(acked - stored)[:5]}"
    assert not (refused & stored), f"refused writes were stored: {sorted(refused & stored)[:5]}"
    assert stored - acked == {f"seed-{i}" for i in range(4)}
    assert stats["index_entries"] == stats["blocks"]
    assert hot["kvrag_hot_tier_budget_bytes"] == HOT_BUDGET and 0 < hot["kvrag_hot_tier_bytes"] <= HOT_BUDGET
    latencies = {op: _percentiles([x for t in tallies for x in t.latencies[op]]) for op in ("ingest", "search",
                                                                                           "query")}
    answered = sum(statuses.values())
    figures = {"agents": AGENTS, "seconds": round(wall, 1), "requests": answered,
               "requests_per_s": round(answered / wall, 1),
               "statuses": {str(k): v for k, v in sorted(statuses.items())},
               "acknowledged_writes": len(acked), "writes_lost": 0, "refused_writes_stored": 0,
               "queue_size": QUEUE_SIZE, "latency": latencies, "hot_tier_budget_bytes": HOT_BUDGET,
               "hot_tier_bytes_end": int(hot["kvrag_hot_tier_bytes"]),
               "server_rss_mb": {"start": round(rss_start / 2**20), "peak": round(rss_peak / 2**20)}}
    print(f"\nload: {figures}")
    record_figures("load", figures)
    # Memory stays bounded: the hot tier is capped, and the process does not grow with the traffic.
    assert rss_peak - rss_start < 512 << 20
