"""Search latency and recall of the bank index at 1k, 10k and 100k blocks.

Embeddings are synthetic but shaped like real ones: unit vectors of MiniLM's width (384) drawn
around topic centroids (a mixture of clusters, as passages of a corpus are), queries are perturbed
copies of stored vectors. The baseline is plain exact FAISS retrieval (``IndexFlatIP``), which is
also the ground truth for recall@10. Filtered search is measured with a selective filter (1% of
the ids allowed) against exact search over the allowed subset.

    .venv/bin/python -m bench.retrieval [--sizes 1000 10000 100000] [--queries 300]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import faiss
import numpy as np
from matplotlib.figure import Figure

from bench.squad import machine_info, markdown_table, print_table, save_figure, write_json
from kvstore.storage.index import BankIndex

DIM = 384
GOAL_P50_MS = 2.0
GOAL_RECALL = 0.95


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def synthetic(n: int, queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` clustered unit vectors and ``queries`` noisy copies of random ones."""
    rng = np.random.default_rng(seed)
    centroids = _unit(rng.normal(size=(max(8, n // 100), DIM)))
    data = _unit(centroids[rng.integers(0, len(centroids), n)] + 0.08 * rng.normal(size=(n, DIM)))
    q = _unit(data[rng.integers(0, n, queries)] + 0.05 * rng.normal(size=(queries, DIM)))
    return data, q


def _latencies(search, queries: np.ndarray) -> tuple[list[float], list[np.ndarray]]:
    times, results = [], []
    for q in queries:
        t0 = time.perf_counter()
        ids = search(q)
        times.append((time.perf_counter() - t0) * 1000)
        results.append(ids)
    return times, results


def _recall(found: list[np.ndarray], truth: np.ndarray, k: int) -> float:
    return float(np.mean([len(set(f[:k].tolist()) & set(t[:k].tolist())) / k for f, t in zip(found, truth,
                                                                                            strict=True)]))


def measure(n: int, n_queries: int, k: int = 10) -> dict[str, Any]:
    """Latency and recall of the bank index vs exact FAISS at ``n`` vectors."""
    data, queries = synthetic(n, n_queries)
    ids = np.arange(n, dtype=np.int64)
    t0 = time.perf_counter()
    index = BankIndex(DIM)
    for start in range(0, n, 10_000):  # ingest in batches, as a bank grows
        index.add(ids[start:start + 10_000], data[start:start + 10_000])
    build_s = time.perf_counter() - t0
    exact = faiss.IndexFlatIP(DIM)
    exact.add(data)
    _, truth = exact.search(queries, k)
    base_ms, _ = _latencies(lambda q: exact.search(q[None], k)[1][0], queries)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    base1_ms, _ = _latencies(lambda q: exact.search(q[None], k)[1][0], queries)
    faiss.omp_set_num_threads(threads)
    ms, found = _latencies(lambda q: index.search(q, k)[0], queries)
    rng = np.random.default_rng(1)
    allowed = np.sort(rng.choice(n, max(k, n // 100), replace=False)).astype(np.int64)
    f_ms, f_found = _latencies(lambda q: index.search(q, k, allowed)[0], queries)
    f_truth = [allowed[np.argsort(-(data[allowed] @ q), kind="stable")[:k]] for q in queries]
    return {
        "blocks": n, "kind": index.kind, "build_s": round(build_s, 2),
        "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
        "recall_at_10": _recall(found, truth, k),
        "exact_p50_ms": float(np.percentile(base_ms, 50)), "exact_p99_ms": float(np.percentile(base_ms, 99)),
        "exact_1thread_p50_ms": float(np.percentile(base1_ms, 50)),
        "filtered_1pct_p50_ms": float(np.percentile(f_ms, 50)),
        "filtered_1pct_recall_at_10": _recall(f_found, np.asarray(f_truth), k),
    }


def plot(rows: list[dict[str, Any]]) -> Figure:
    fig = Figure(figsize=(9, 3.6))
    ax, ax2 = fig.subplots(1, 2)
    sizes = [r["blocks"] for r in rows]
    ax.plot(sizes, [r["p50_ms"] for r in rows], "o-", label="bank index p50")
    ax.plot(sizes, [r["p99_ms"] for r in rows], "o--", label="bank index p99")
    ax.plot(sizes, [r["exact_p50_ms"] for r in rows], "s-", label="exact FAISS p50 (default threads)")
    ax.plot(sizes, [r["exact_1thread_p50_ms"] for r in rows], "s--", label="exact FAISS p50 (1 thread)")
    ax.axhline(GOAL_P50_MS, color="grey", lw=0.8, ls=":", label="goal p50")
    ax.set(xscale="log", yscale="log", xlabel="blocks", ylabel="ms per query", title="search latency")
    ax.legend(fontsize=7)
    ax2.plot(sizes, [r["recall_at_10"] for r in rows], "o-", label="unfiltered")
    ax2.plot(sizes, [r["filtered_1pct_recall_at_10"] for r in rows], "s-", label="1% filter")
    ax2.axhline(GOAL_RECALL, color="grey", lw=0.8, ls=":", label="goal")
    ax2.set(xscale="log", ylim=(0.8, 1.01), xlabel="blocks", ylabel="recall@10 vs exact", title="recall")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--queries", type=int, default=300)
    args = parser.parse_args()
    rows = [measure(n, args.queries) for n in args.sizes]
    last = rows[-1]
    payload = {"benchmark": "retrieval", "machine": machine_info("synthetic 384-d embeddings"),
               "faiss_threads": faiss.omp_get_max_threads(), "queries": args.queries, "results": rows,
               "goal": {"p50_ms_at_largest": GOAL_P50_MS, "recall_at_10": GOAL_RECALL,
                        "met": last["p50_ms"] < GOAL_P50_MS and last["recall_at_10"] >= GOAL_RECALL}}
    write_json("retrieval", payload)
    save_figure(plot(rows), "retrieval")
    headers = ["blocks", "kind", "p50 ms", "p99 ms", "recall@10", "exact p50 ms", "exact p99 ms",
               "exact 1-thread p50 ms", "1% filter p50 ms", "1% filter recall@10"]
    table = [[r["blocks"], r["kind"], r["p50_ms"], r["p99_ms"], r["recall_at_10"], r["exact_p50_ms"],
              r["exact_p99_ms"], r["exact_1thread_p50_ms"], r["filtered_1pct_p50_ms"],
              r["filtered_1pct_recall_at_10"]] for r in rows]
    print_table("bank index search", headers, table)
    print(markdown_table(headers, table))
    print("goal met:", payload["goal"]["met"])


if __name__ == "__main__":
    main()
