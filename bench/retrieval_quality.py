"""Retrieval quality per retrieval mode on the SQuAD excerpt: recall@1/3/5 of the gold paragraph and
the latency a rerank adds per query (issue 13). Retrieval only: nothing is generated.

Every paragraph is its own document (real SmolLM2 KV, MiniLM embeddings). Each question is searched
through ``BankStore.search`` once per mode; the added latency is the mode's time minus embedding-only
time on the same question. A sweep over the hybrid fusion weight (on the same embedding top-N) shows
how the default ``kvstore.rerank.HYBRID_WEIGHT`` was picked.

Run: ``KVRAG_TORCH_THREADS=1 .venv/bin/python -m bench.retrieval_quality``
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.squad import (
    BANK,
    add_data_args,
    doc_markdown,
    ingest,
    load_or_exit,
    machine_info,
    open_store,
    pick_questions,
    print_table,
    publish_doc_table,
    save_figure,
    write_json,
)
from kvstore.bank import BankStore
from kvstore.rerank import RETRIEVAL_MODES, hybrid_scores

NAME = "retrieval_quality"
KS = (1, 3, 5)
WEIGHTS = (0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0)


def paragraph_of(doc_id: str) -> int:
    """``p007`` -> 7 (bench.squad.ingest names documents by paragraph index)."""
    return int(doc_id[1:])


def rank_of(gold: int, paragraphs: list[int]) -> int | None:
    """0-based rank of the gold paragraph in a ranking, None when absent."""
    return paragraphs.index(gold) if gold in paragraphs else None


def recall(ranks: list[int | None], k: int) -> float:
    return float(np.mean([r is not None and r < k for r in ranks]))


def measure_modes(store: BankStore, questions: list[Any], candidates: int) -> dict[str, dict[str, Any]]:
    """Recall@k and per-query latency of each retrieval mode through ``BankStore.search``."""
    out: dict[str, dict[str, Any]] = {}
    times: dict[str, list[float]] = {m: [] for m in RETRIEVAL_MODES}
    ranks: dict[str, list[int | None]] = {m: [] for m in RETRIEVAL_MODES}
    store.search(BANK, "warm-up", k=max(KS))
    for q in questions:
        for mode in RETRIEVAL_MODES:
            t0 = time.perf_counter()
            hits = store.search(BANK, q.text, k=max(KS), retrieval=mode)
            times[mode].append((time.perf_counter() - t0) * 1000)
            ranks[mode].append(rank_of(q.paragraph, [paragraph_of(h.doc_id) for h in hits]))
    base = np.asarray(times["embedding"])
    for mode in RETRIEVAL_MODES:
        ms = np.asarray(times[mode])
        out[mode] = {f"recall@{k}": recall(ranks[mode], k) for k in KS}
        out[mode].update(latency_ms_median=float(np.median(ms)), added_ms_median=float(np.median(ms - base)),
                         added_ms_p95=float(np.percentile(ms - base, 95)), candidates=candidates)
    return out


def sweep_weights(store: BankStore, questions: list[Any], candidates: int) -> dict[str, dict[str, float]]:
    """Recall@k of the hybrid fusion at each lexical weight, on the same embedding top-N per question."""
    shortlists = [store.search(BANK, q.text, k=candidates, retrieval="embedding") for q in questions]
    out: dict[str, dict[str, float]] = {}
    for w in WEIGHTS:
        ranks = []
        for q, hits in zip(questions, shortlists, strict=True):
            scores = hybrid_scores(q.text, [h.text for h in hits], np.asarray([h.score for h in hits]), w)
            order = np.argsort(-scores, kind="stable")
            ranks.append(rank_of(q.paragraph, [paragraph_of(hits[i].doc_id) for i in order]))
        out[f"{w:.1f}"] = {f"recall@{k}": recall(ranks, k) for k in KS}
    return out


def plot(result: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    modes = result["modes"]
    width = 0.8 / len(modes)
    for i, (mode, row) in enumerate(modes.items()):
        ax1.bar(np.arange(len(KS)) + i * width, [row[f"recall@{k}"] for k in KS], width,
                label=f"{mode} (+{row['added_ms_median']:.1f} ms)")
    ax1.set_xticks(np.arange(len(KS)) + width * (len(modes) - 1) / 2, [f"recall@{k}" for k in KS])
    ax1.set_ylim(0, 1)
    ax1.set_title("Gold paragraph recall by retrieval mode")
    ax1.legend()
    weights = [float(w) for w in result["hybrid_weight_sweep"]]
    for k in KS:
        ax2.plot(weights, [row[f"recall@{k}"] for row in result["hybrid_weight_sweep"].values()], marker="o",
                 label=f"recall@{k}")
    ax2.set_xlabel("lexical (BM25) weight in the fused score")
    ax2.set_title("Hybrid fusion weight (0 = embedding only)")
    ax2.legend()
    save_figure(fig, NAME)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(parser, default_questions=10_000)
    parser.add_argument("--candidates", type=int, default=20, help="FAISS candidates a rerank reorders")
    args = parser.parse_args()
    squad = load_or_exit(args.data)
    questions = pick_questions(squad.questions, args.questions)
    with tempfile.TemporaryDirectory(prefix="kvrag-rq-") as tmp:
        store = open_store(Path(tmp), torch_threads=args.threads, rerank_candidates=args.candidates)
        t0 = time.perf_counter()
        ingest(store, squad.paragraphs)
        ingest_s = time.perf_counter() - t0
        modes = measure_modes(store, questions, args.candidates)
        sweep = sweep_weights(store, questions, args.candidates)
        model = store.llm.name
        store.close()
    result = {"questions": len(questions), "paragraphs": len(squad.paragraphs), "ingest_s": round(ingest_s, 1),
              "modes": modes, "hybrid_weight_sweep": sweep, "machine": machine_info(model)}
    write_json(NAME, result)
    plot(result)
    headers = ["retrieval", "recall@1", "recall@3", "recall@5", "median ms", "added ms (median)", "added ms (p95)"]
    rows = [[m, r["recall@1"], r["recall@3"], r["recall@5"], r["latency_ms_median"], r["added_ms_median"],
             r["added_ms_p95"]] for m, r in modes.items()]
    print_table("Retrieval quality (SQuAD excerpt)", headers, rows)
    sweep_rows = [[w, r["recall@1"], r["recall@3"], r["recall@5"]] for w, r in sweep.items()]
    print_table("Hybrid weight sweep", ["BM25 weight", "recall@1", "recall@3", "recall@5"], sweep_rows)
    publish_doc_table(NAME, doc_markdown(result, headers, rows))


if __name__ == "__main__":
    main()
