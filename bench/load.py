"""Throughput and latency under concurrent clients, kv vs text mode, through the HTTP API.

Starts the real server (``kvrag serve`` in a subprocess: SQLite, packaged SmolLM2 + MiniLM, defaults),
PUTs the SQuAD paragraphs through the API and warms the hot tier with one kv pass over the questions.
Then, for each mode and each number of clients, that many threads (one httpx client each) send
non-streamed queries (k = 5, default settings, ``--max-new-tokens`` answer tokens) from a shared pool
until ``--queries`` have been answered or ``--duration`` seconds have passed; a client finishes the query
it has started. Latency is the client-side time of one query (queueing in the server's model worker
included); queries/s is the number answered over the wall time of that point.

``--batching on off`` measures kv mode on two servers started side by side: one batching the questions of
concurrent kv queries (``KVRAG_BATCH_MAX_SIZE``, default 8) and one with batching off (size 1: every query
runs alone), point by point in turn (on x1, off x1, on x4, ...), so both see the same load on a shared box.
Text mode never batches, so it is measured once, on the first server.

Writes bench/results/load.json and load.png, and its section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import itertools
import os
import threading
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import httpx
from matplotlib.figure import Figure
from tqdm import tqdm

from bench.live import LiveServer, ingest_http, live_server
from bench.squad import (
    BANK,
    Question,
    add_data_args,
    load_or_exit,
    machine_info,
    markdown_table,
    pick_questions,
    print_table,
    publish_doc_table,
    save_figure,
    write_json,
)
from bench.ttft import percentile

K = 5


@dataclass
class Point:
    """What one (mode, batching, clients) run saw."""

    mode: str
    batching: str
    clients: int
    latencies_ms: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0


def _client_loop(server: LiveServer, point: Point, pool: itertools.cycle, budget: list[int], deadline: float,
                 lock: threading.Lock, max_new_tokens: int) -> None:
    with server.client() as c:
        while True:
            with lock:
                if budget[0] <= 0 or time.monotonic() >= deadline:
                    return
                budget[0] -= 1
                question: Question = next(pool)
            t0 = time.perf_counter()
            try:
                r = c.post(f"/v1/banks/{BANK}/query", json={"question": question.text, "k": K, "mode": point.mode,
                                                           "max_new_tokens": max_new_tokens})
                failure = None if r.status_code == 200 else str(r.status_code)
            except httpx.HTTPError as exc:
                failure = type(exc).__name__
            elapsed = (time.perf_counter() - t0) * 1000
            with lock:
                if failure is None:
                    point.latencies_ms.append(elapsed)
                else:
                    point.errors[failure] = point.errors.get(failure, 0) + 1


def run_point(server: LiveServer, mode: str, batching: str, clients: int, questions: Sequence[Question],
              queries: int, duration_s: float, max_new_tokens: int) -> Point:
    """``clients`` threads answering up to ``queries`` questions in ``mode`` within ``duration_s``."""
    point = Point(mode, batching, clients)
    pool = itertools.cycle(questions)
    budget, lock = [queries], threading.Lock()
    t0 = time.perf_counter()
    deadline = time.monotonic() + duration_s
    threads = [threading.Thread(target=_client_loop, args=(server, point, pool, budget, deadline, lock,
                                                           max_new_tokens)) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    point.wall_s = time.perf_counter() - t0
    return point


def summarise(point: Point) -> dict[str, Any]:
    lat = point.latencies_ms
    return {"mode": point.mode, "batching": point.batching, "clients": point.clients, "answered": len(lat),
            "errors": point.errors,
            "wall_s": round(point.wall_s, 2), "qps": round(len(lat) / point.wall_s, 3) if point.wall_s else 0.0,
            "p50_ms": round(percentile(lat, 50), 1) if lat else None,
            "p99_ms": round(percentile(lat, 99), 1) if lat else None}


def run(args: argparse.Namespace) -> dict[str, Any]:
    squad = load_or_exit(args.data)
    questions = pick_questions(squad.questions, args.questions)
    rows, points = [], []
    with ExitStack() as stack:
        servers: dict[str, LiveServer] = {}
        for batching in args.batching:
            server = servers[batching] = stack.enter_context(
                live_server(args.threads, batch_max_size=args.batch_max_size if batching == "on" else 1))
            ingest_http(server, squad.paragraphs)
            with server.client() as c:
                for q in tqdm(questions, desc=f"warm hot tier (batching {batching})", unit="q"):
                    c.post(f"/v1/banks/{BANK}/query", json={"question": q.text, "k": K, "max_new_tokens": 1}
                           ).raise_for_status()
        load_before = os.getloadavg()
        for mode in args.modes:
            for clients in sorted(args.clients):
                # kv on and off alternate point by point, so a change in the shared box's load hits both alike;
                # text never batches and is measured once.
                for batching in args.batching if mode == "kv" else args.batching[:1]:
                    label = batching if mode == "kv" else "-"
                    queries = args.queries or max(8, 2 * clients)
                    point = run_point(servers[batching], mode, label, clients, questions, queries, args.duration,
                                      args.max_new_tokens)
                    row = summarise(point)
                    print(f"{mode} (batching {label}) x{clients}: {row['answered']} answered, {row['qps']} q/s, "
                          f"p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms, errors {row['errors']}", flush=True)
                    rows.append(row)
                    points.append({"mode": mode, "batching": label, "clients": clients,
                                   "latencies_ms": [round(x, 1) for x in point.latencies_ms]})
    machine = machine_info("SmolLM2-135M-Instruct")
    machine["load_average_before"] = load_before
    return {"benchmark": "load", "data": str(args.data), "questions": len(questions), "k": K,
            "max_new_tokens": args.max_new_tokens, "server_threads": args.threads, "duration_cap_s": args.duration,
            "batch_max_size": args.batch_max_size,
            "machine": machine, "rows": rows, "points": points}


def plot(rows: Sequence[dict[str, Any]]) -> Figure:
    fig = Figure(figsize=(11, 4.2))
    left, right = fig.subplots(1, 2)
    for mode, batching in dict.fromkeys((r["mode"], r.get("batching", "-")) for r in rows):
        mine = [r for r in rows if r["mode"] == mode and r.get("batching", "-") == batching and r["answered"]]
        name = mode if batching == "-" else f"{mode}, batching {batching}"
        xs = [r["clients"] for r in mine]
        left.plot(xs, [r["qps"] for r in mine], marker="o", label=name)
        line = right.plot(xs, [r["p50_ms"] for r in mine], marker="o", label=f"{name} p50")[0]
        right.plot(xs, [r["p99_ms"] for r in mine], marker="s", ls="--", color=line.get_color(), label=f"{name} p99")
    left.set(xscale="log", xlabel="concurrent clients", ylabel="queries / s", title="throughput")
    right.set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="latency per query, ms",
              title="latency (client side, queueing included)")
    for ax in (left, right):
        ax.set_xticks(sorted({r["clients"] for r in rows}), [str(c) for c in sorted({r["clients"] for r in rows})])
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.tight_layout()
    return fig


HEADERS = ("mode", "batching", "clients", "answered", "errors", "wall s", "queries/s", "p50 ms", "p99 ms")


def table_rows(rows: Sequence[dict[str, Any]]) -> list[list[Any]]:
    return [[r["mode"], r.get("batching", "-"), r["clients"], r["answered"], sum(r["errors"].values()), r["wall_s"],
             r["qps"],
             "-" if r["p50_ms"] is None else r["p50_ms"], "-" if r["p99_ms"] is None else r["p99_ms"]] for r in rows]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.load",
        description="Queries/s and p50/p99 latency under concurrent clients, kv vs text mode, through a real "
                    "server's HTTP API on the SQuAD excerpt. Writes bench/results/load.{json,png}.")
    add_data_args(parser, default_questions=20)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="concurrent clients (1 4 16)")
    parser.add_argument("--modes", nargs="+", default=["kv", "text"], choices=["kv", "text"])
    parser.add_argument("--batching", nargs="+", default=["on", "off"], choices=["on", "off"],
                        help="kv mode with batching on and/or off, back to back on two servers (default: both)")
    parser.add_argument("--batch-max-size", type=int, default=8,
                        help="KVRAG_BATCH_MAX_SIZE of the batching server (default 8)")
    parser.add_argument("--queries", type=int, default=0,
                        help="queries answered per point (default: max(8, 2 x clients))")
    parser.add_argument("--duration", type=float, default=300.0, help="seconds per point at most (default 300)")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="answer tokens per query (default 16)")
    args = parser.parse_args(argv)
    result = run(args)
    m = result["machine"]
    title = (f"Load, k = {K}, {result['max_new_tokens']} answer tokens, {result['server_threads']} server torch "
             f"threads, load average {m['load_average_before'][0]:.1f} at the start")
    print_table(title, HEADERS, table_rows(result["rows"]))
    print(f"wrote {write_json('load', result)} and {save_figure(plot(result['rows']), 'load')}")
    header = (f"{result['questions']} questions cycled, k = {K}, max_new_tokens = {result['max_new_tokens']}, "
              f"{m['model']}, server with {result['server_threads']} torch thread(s), kv batching up to "
              f"{result['batch_max_size']} questions (on) or none (off), "
              f"{m['cpu_count']} CPUs ({m['processor']}), GPU: {m['cuda'] or 'none'}, load average "
              f"{m['load_average_before'][0]:.1f} at the start and {m['load_average'][0]:.1f} at the end, commit "
              f"{m['git_commit']}, {m['measured_at']}.\n\n")
    publish_doc_table("load", header + markdown_table(HEADERS, table_rows(result["rows"])))


if __name__ == "__main__":
    main()
