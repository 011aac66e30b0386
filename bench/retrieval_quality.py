"""Retrieval quality per retrieval mode on the SQuAD excerpt: recall@1/3/5 of the gold paragraph, answer
F1 at k = 1 and 3, and the latency a rerank adds per query (issue 13).

Every paragraph is its own document (real SmolLM2 KV, MiniLM embeddings). Each question is searched
through ``BankStore.search`` once per mode; the added latency is the mode's time minus embedding-only
time on the same question. Answers are generated greedily in kv mode from each mode's top k blocks (one
generation per distinct block list). Sweeps over the fusion weights (on the same embedding top-N) show
how ``kvstore.query.rerank.HYBRID_WEIGHT`` and ``KV_WEIGHT`` were picked; the KV score alone and a sanity check
(a block holding the question's own sentence must get the most attention) are reported beside them.

Run: ``KVRAG_TORCH_THREADS=1 .venv/bin/python -m bench.retrieval_quality``
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import func, select
from tqdm import tqdm

from bench.squad import (
    BANK,
    Question,
    add_data_args,
    doc_markdown,
    ingest,
    load_or_exit,
    machine_info,
    markdown_table,
    open_store,
    pick_questions,
    print_table,
    publish_doc_table,
    save_figure,
    squad_scores,
    write_json,
)
from kvstore.bank import BankStore
from kvstore.query.rerank import RETRIEVAL_MODES, hybrid_scores, minmax
from kvstore.storage.catalog import BlockRow
from kvstore.types import Hit

NAME = "retrieval_quality"
KS = (1, 3, 5)
F1_KS = (1, 3)
WEIGHTS = (0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0)


def paragraph_of(doc_id: str) -> int:
    """``p007`` -> 7 (bench.squad.ingest names documents by paragraph index)."""
    return int(doc_id[1:])


def rank_of(gold: int, paragraphs: list[int]) -> int | None:
    """0-based rank of the gold paragraph in a ranking, None when absent."""
    return paragraphs.index(gold) if gold in paragraphs else None


def recall(ranks: list[int | None], k: int) -> float:
    return float(np.mean([r is not None and r < k for r in ranks]))


def answer(store: BankStore, question: str, block_ids: tuple[int, ...], max_new_tokens: int) -> str:
    """Greedy kv-mode answer from these blocks (the query path without its bookkeeping)."""
    with store.session() as s:
        bank = store.bank_row(s, BANK)
        rows = {r.id: r for r in s.scalars(select(BlockRow).where(BlockRow.id.in_(block_ids)))}
        kvs = [store.load_block(s, bank, rows[i]) for i in block_ids]
    runner = store.runner
    return runner.generate(runner.assemble(kvs), runner.question_ids(question), max_new_tokens).text


def measure_modes(store: BankStore, questions: list[Question], candidates: int, max_new_tokens: int,
                  answered: set[str]) -> dict[str, dict[str, Any]]:
    """Recall@k and per-query latency of each retrieval mode through ``BankStore.search``, and answer F1@k
    on the questions in ``answered`` (generation dominates the run time on a shared CPU)."""
    out: dict[str, dict[str, Any]] = {}
    times: dict[str, list[float]] = {m: [] for m in RETRIEVAL_MODES}
    ranks: dict[str, list[int | None]] = {m: [] for m in RETRIEVAL_MODES}
    f1s: dict[str, dict[int, list[float]]] = {m: {k: [] for k in F1_KS} for m in RETRIEVAL_MODES}
    answers: dict[tuple[str, tuple[int, ...]], str] = {}
    for mode in RETRIEVAL_MODES:
        store.search(BANK, "warm-up", k=max(KS), retrieval=mode)
    for q in tqdm(questions, desc="questions", unit="q"):
        for mode in RETRIEVAL_MODES:
            t0 = time.perf_counter()
            hits = store.search(BANK, q.text, k=max(KS), retrieval=mode)
            times[mode].append((time.perf_counter() - t0) * 1000)
            ranks[mode].append(rank_of(q.paragraph, [paragraph_of(h.doc_id) for h in hits]))
            for k in F1_KS if q.qid in answered else ():
                key = (q.qid, tuple(h.block_id for h in hits[:k]))
                if key not in answers:
                    answers[key] = answer(store, q.text, key[1], max_new_tokens)
                f1s[mode][k].append(squad_scores(answers[key], q.answers)[1])
    base = np.asarray(times["embedding"])
    for mode in RETRIEVAL_MODES:
        ms = np.asarray(times[mode])
        out[mode] = {f"recall@{k}": recall(ranks[mode], k) for k in KS}
        out[mode].update({f"f1@{k}": float(np.mean(f1s[mode][k])) for k in F1_KS})
        out[mode].update(latency_ms_median=float(np.median(ms)), added_ms_median=float(np.median(ms - base)),
                         added_ms_p95=float(np.percentile(ms - base, 95)), candidates=candidates)
    return out


def kv_shortlists(store: BankStore, questions: list[Question], candidates: int
                  ) -> list[tuple[list[Hit], np.ndarray]]:
    """Per question: the embedding top-N and the KV-utility score of each of its blocks."""
    out = []
    with store.session() as s:
        bank = store.bank_row(s, BANK)
        for q in questions:
            hits = store.search(BANK, q.text, k=candidates, retrieval="embedding")
            rows = {r.id: r for r in s.scalars(select(BlockRow).where(BlockRow.id.in_([h.block_id for h in hits])))}
            out.append((hits, store.summaries.scores(s, bank, q.text, [rows[h.block_id] for h in hits])))
    return out


def sweep_kv(questions: list[Question], shortlists: list[tuple[list[Hit], np.ndarray]]) -> dict[str, dict[str, float]]:
    """Recall@k of embedding + KV fusion at each KV share (1.0: the KV score alone)."""
    out: dict[str, dict[str, float]] = {}
    for w in WEIGHTS:
        ranks = []
        for q, (hits, kv) in zip(questions, shortlists, strict=True):
            scores = (1 - w) * minmax(np.asarray([h.score for h in hits])) + w * minmax(kv)
            order = np.argsort(-scores, kind="stable")
            ranks.append(rank_of(q.paragraph, [paragraph_of(hits[i].doc_id) for i in order]))
        out[f"{w:.1f}"] = {f"recall@{k}": recall(ranks, k) for k in KS}
    return out


def verbatim_check(store: BankStore, paragraphs: tuple[str, ...], candidates: int) -> dict[str, float]:
    """Sanity check of the KV score: ask each paragraph's first sentence as the question; its own block
    should get the most attention among the embedding top-N. Returns the share where it does."""
    top = []
    with store.session() as s:
        bank = store.bank_row(s, BANK)
        for i, text in enumerate(paragraphs):
            sentence = text.split(". ")[0]
            hits = store.search(BANK, sentence, k=candidates, retrieval="embedding")
            rows = {r.id: r for r in s.scalars(select(BlockRow).where(BlockRow.id.in_([h.block_id for h in hits])))}
            kv = store.summaries.scores(s, bank, sentence, [rows[h.block_id] for h in hits])
            top.append(paragraph_of(hits[int(np.argmax(kv))].doc_id) == i)
    return {"paragraphs": len(top), "own_block_top": float(np.mean(top))}


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
    ax2.plot(weights, [row["recall@1"] for row in result["kv_weight_sweep"].values()], marker="s", linestyle="--",
             label="recall@1, KV share instead")
    ax2.set_xlabel("BM25 (or KV) share in the fused score")
    ax2.set_title("Fusion weight (0 = embedding only)")
    ax2.legend()
    save_figure(fig, NAME)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(parser, default_questions=10_000)
    parser.add_argument("--candidates", type=int, default=20, help="FAISS candidates a rerank reorders")
    parser.add_argument("--max-new-tokens", type=int, default=24, help="greedy answer length cap (default: 24)")
    parser.add_argument("--f1-questions", type=int, default=32,
                        help="questions (spread over the file) whose answers are generated for F1 (default: 32)")
    args = parser.parse_args()
    squad = load_or_exit(args.data)
    questions = pick_questions(squad.questions, args.questions)
    with tempfile.TemporaryDirectory(prefix="kvrag-rq-") as tmp:
        store = open_store(Path(tmp), torch_threads=args.threads, rerank_candidates=args.candidates)
        t0 = time.perf_counter()
        ingest(store, squad.paragraphs)
        ingest_s = time.perf_counter() - t0
        answered = {q.qid for q in pick_questions(questions, args.f1_questions)}
        modes = measure_modes(store, questions, args.candidates, args.max_new_tokens, answered)
        sweep = sweep_weights(store, questions, args.candidates)
        kv_sweep = sweep_kv(questions, kv_shortlists(store, questions, args.candidates))
        verbatim = verbatim_check(store, squad.paragraphs, args.candidates)
        heads = [f"{layer}.{head}" for layer, head in store.summaries.plan.heads]
        with store.session() as s:
            sizes = s.execute(select(func.avg(func.length(BlockRow.kv_summary)), func.avg(BlockRow.stored_bytes),
                                     func.avg(BlockRow.raw_bytes))).one()
        summary_bytes = {"summary_bytes_mean": float(sizes[0]), "blob_bytes_mean": float(sizes[1]),
                         "raw_kv_bytes_mean": float(sizes[2])}
        model = store.llm.name
        store.close()
    result = {"questions": len(questions), "paragraphs": len(squad.paragraphs), "ingest_s": round(ingest_s, 1),
              "f1_questions": len(answered), "max_new_tokens": args.max_new_tokens, "kv_heads": heads,
              "kv_summary": summary_bytes, "modes": modes,
              "hybrid_weight_sweep": sweep, "kv_weight_sweep": kv_sweep, "kv_verbatim_check": verbatim,
              "machine": machine_info(model)}
    write_json(NAME, result)
    plot(result)
    n_f1 = result["f1_questions"]
    headers = ["retrieval", "recall@1", "recall@3", "recall@5", f"F1@1 ({n_f1} q)", f"F1@3 ({n_f1} q)", "median ms",
               "added ms (median)", "added ms (p95)"]
    rows = [[m, r["recall@1"], r["recall@3"], r["recall@5"], r["f1@1"], r["f1@3"], r["latency_ms_median"],
             r["added_ms_median"], r["added_ms_p95"]] for m, r in modes.items()]
    print_table("Retrieval quality (SQuAD excerpt)", headers, rows)
    sweep_headers = ["share", "recall@1", "recall@3", "recall@5"]
    sweep_rows = [[w, r["recall@1"], r["recall@3"], r["recall@5"]] for w, r in sweep.items()]
    print_table("Hybrid weight sweep (BM25 share)", sweep_headers, sweep_rows)
    kv_rows = [[w, r["recall@1"], r["recall@3"], r["recall@5"]] for w, r in kv_sweep.items()]
    print_table("KV weight sweep (KV share; 1.0 = KV score alone)", sweep_headers, kv_rows)
    print(f"key summary {summary_bytes['summary_bytes_mean'] / 1024:.1f} KiB per block vs "
          f"{summary_bytes['blob_bytes_mean'] / 1024:.1f} KiB stored KV")
    print(f"KV heads {', '.join(heads)}; verbatim check: own block gets the most attention for "
          f"{verbatim['own_block_top']:.3f} of {verbatim['paragraphs']} first sentences")
    publish_doc_table(NAME, doc_markdown(result, headers, rows) + "\n\nKV share sweep (embedding + KV, 1.0 = KV "
                      f"alone; heads {', '.join(heads)}):\n\n" + markdown_table(sweep_headers, kv_rows)
                      + f"\n\nVerbatim check: a paragraph's first sentence as the question puts its own block "
                      f"first by KV score alone for {verbatim['own_block_top']:.3f} of {verbatim['paragraphs']}.")


if __name__ == "__main__":
    main()
