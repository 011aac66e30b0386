"""Memory under budgets: eviction policies on a bank of >= 1,000 SQuAD-style paragraphs.

The bank holds the shared SQuAD excerpt plus synthetic duplicates of its paragraphs: paraphrases
(a few words swapped for synonyms: near-duplicates) and excerpts (one to three consecutive sentences,
some paraphrased). It is ingested once, without a budget (the reference), then cloned catalog-only
(the clones share the reference's blobs, so nothing is encoded again) into one bank per policy and
budget (10/25/50% of the raw fp16 KV size). Each clone answers the same Zipf-distributed stream of
SQuAD questions in kv mode. Cold blocks are prefilled from their text when retrieved, then re-warmed,
and the budget is enforced again, so the warm set follows the stream under each policy.

Reported per run: hot-tier hit rate (decoded KV in RAM), the warm/cold mix of retrieved blocks,
KV hit rate (hot + warm: no prefill needed), mean TTFT, and fidelity: the share of answers equal to
the unbudgeted bank's answer to the same question (SQuAD F1 against the gold answers too).

    .venv/bin/python -m bench.memory [--paragraphs 1000] [--queries 60] [--budgets 0.1 0.25 0.5]
"""

from __future__ import annotations

import argparse
import random
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from sqlalchemy import select
from tqdm import tqdm

from bench.squad import (
    DEFAULT_DATA,
    Question,
    load_or_exit,
    machine_info,
    markdown_table,
    normalize_answer,
    print_table,
    save_figure,
    squad_scores,
    write_json,
)
from kvstore.bank import BankStore
from kvstore.cache import HotCache
from kvstore.catalog import BlockRow, DocumentRow, OpLogRow
from kvstore.config import Settings

POLICIES = ("lru", "importance", "hybrid")
REFERENCE = "reference"
SYNONYMS = {
    "people": "population", "region": "area", "gave": "lent", "descended": "originated", "raiders": "invaders",
    "centuries": "eras", "large": "big", "known": "recognized", "began": "started", "conquered": "seized",
    "famous": "renowned", "important": "significant", "later": "subsequently", "early": "initial",
    "king": "monarch", "war": "conflict", "land": "territory", "city": "town", "built": "constructed",
    "many": "numerous", "small": "little", "major": "main", "led": "headed", "army": "forces",
    "church": "cathedral", "power": "authority", "rule": "reign", "south": "southern", "north": "northern",
}
_SENTENCE = re.compile(r"(?<=[.!?])\s+")


# -- data -----------------------------------------------------------------------------------------


def paraphrase(text: str, rng: random.Random, swaps: int) -> str:
    """Swap up to ``swaps`` words for synonyms: a near-duplicate with the same content."""
    words = text.split(" ")
    spots = [i for i, w in enumerate(words) if w.lower().strip(",.;") in SYNONYMS]
    for i in rng.sample(spots, min(swaps, len(spots))):
        core = words[i].strip(",.;")
        repl = SYNONYMS[core.lower()]
        words[i] = words[i].replace(core, repl.capitalize() if core[0].isupper() else repl)
    return " ".join(words)


def synthetic_corpus(paragraphs: Sequence[str], total: int, seed: int = 0) -> list[tuple[str, int]]:
    """(text, source paragraph) for the originals plus duplicates up to ``total`` documents."""
    rng = random.Random(seed)
    docs = [(p, i) for i, p in enumerate(paragraphs)]
    seen = {p for p, _ in docs}
    round_ = 0
    while len(docs) < total:
        round_ += 1
        for i, p in enumerate(paragraphs):
            if len(docs) >= total:
                break
            sentences = _SENTENCE.split(p)
            if round_ % 4 == 1:  # a whole-paragraph near-duplicate
                text = paraphrase(p, rng, swaps=rng.randint(1, 3))
            else:  # an excerpt of 1-3 sentences, paraphrased half of the time
                width = rng.randint(1, min(3, len(sentences)))
                start = rng.randint(0, len(sentences) - width)
                text = " ".join(sentences[start:start + width])
                if rng.random() < 0.5:
                    text = paraphrase(text, rng, swaps=1)
            if text not in seen:
                seen.add(text)
                docs.append((text, i))
        if round_ > 200:
            break
    return docs


def zipf_stream(questions: Sequence[Question], n: int, s: float = 1.1, seed: int = 0) -> list[Question]:
    """``n`` questions drawn with Zipf popularity over a random ranking of the questions."""
    rng = np.random.default_rng(seed)
    ranked = list(questions)
    rng.shuffle(ranked)  # type: ignore[arg-type]
    weights = 1.0 / np.arange(1, len(ranked) + 1) ** s
    picks = rng.choice(len(ranked), size=n, p=weights / weights.sum())
    return [ranked[i] for i in picks]


# -- banks ----------------------------------------------------------------------------------------


def clone_bank(store: BankStore, src: str, dst: str, policy: str) -> None:
    """A catalog-only copy of ``src`` (same blobs, fresh access history) under ``policy``, no budget yet."""
    store.create_bank(dst, eviction=policy)
    with store.session() as s:
        src_row, dst_row = store._bank(s, src), store._bank(s, dst)
        docs = s.scalars(select(DocumentRow).where(DocumentRow.bank_id == src_row.id)).all()
        copies = {d.id: DocumentRow(bank_id=dst_row.id, doc_id=d.doc_id, version=d.version, text=d.text,
                                    content_hash=d.content_hash, meta=d.meta, tags=d.tags, agent=d.agent,
                                    pinned=d.pinned, tokens=d.tokens, created_at=d.created_at,
                                    updated_at=d.updated_at) for d in docs}
        s.add_all(copies.values())
        s.flush()
        blocks = s.scalars(select(BlockRow).where(BlockRow.bank_id == src_row.id).order_by(BlockRow.id)).all()
        rows = [BlockRow(bank_id=dst_row.id, document_id=copies[b.document_id].id, ordinal=b.ordinal,
                         token_count=b.token_count, text=b.text, token_ids=b.token_ids, embedding=b.embedding,
                         blob_id=b.blob_id, codec=b.codec, raw_bytes=b.raw_bytes, stored_bytes=b.stored_bytes,
                         agent=b.agent, status=b.status, access_count=0, importance=0.0, created_at=b.created_at)
                for b in blocks]
        s.add_all(rows)
        s.flush()
        s.add(OpLogRow(bank_id=dst_row.id, op="clone", added=[r.id for r in rows], removed=[]))
        s.commit()
        store._add_rows(store._index(dst_row), s, [r.id for r in rows])


def run_stream(store: BankStore, bank: str, stream: Sequence[Question], k: int, max_new_tokens: int,
               hot_bytes: int) -> dict[str, Any]:
    """Answer the stream; per query: answer, TTFT and where each retrieved block came from."""
    store.hot = HotCache(hot_bytes)  # every run starts with an empty hot tier
    counters = store.memory.counters
    answers, ttft = [], []
    before = counters.as_dict()
    for q in tqdm(stream, desc=bank, unit="q", leave=False):
        result = store.query(bank, q.text, k=k, max_new_tokens=max_new_tokens)
        answers.append(result.answer)
        ttft.append(result.timings.ttft_ms)
    after = counters.as_dict()
    served = {key: after[key] - before[key] for key in ("hot_hits", "warm_loads", "cold_encodes")}
    total = max(1, sum(served.values()))
    stats = store.stats(bank)
    return {"answers": answers, "mean_ttft_ms": float(np.mean(ttft)), "p50_ttft_ms": float(np.median(ttft)),
            "hot_hit_rate": served["hot_hits"] / total, "warm_share": served["warm_loads"] / total,
            "cold_share": served["cold_encodes"] / total,
            "kv_hit_rate": (served["hot_hits"] + served["warm_loads"]) / total,
            "stored_bytes": stats.stored_bytes, "evictions": stats.evictions, "reencodes": stats.reencodes,
            "tiers": stats.tiers}


def fidelity(answers: Sequence[str], reference: Sequence[str], stream: Sequence[Question]) -> dict[str, float]:
    agree = float(np.mean([normalize_answer(a) == normalize_answer(r) for a, r in zip(answers, reference,
                                                                                      strict=True)]))
    f1 = float(np.mean([squad_scores(a, q.answers)[1] for a, q in zip(answers, stream, strict=True)]))
    return {"agreement": agree, "f1": f1}


# -- output ---------------------------------------------------------------------------------------


def plot(runs: list[dict[str, Any]], budgets: Sequence[float]) -> Figure:
    fig = Figure(figsize=(12, 3.6))
    axes = fig.subplots(1, 3)
    for policy in POLICIES:
        mine = [r for r in runs if r["policy"] == policy]
        x = [100 * r["budget_fraction"] for r in mine]
        axes[0].plot(x, [r["kv_hit_rate"] for r in mine], "o-", label=policy)
        axes[1].plot(x, [r["mean_ttft_ms"] for r in mine], "o-", label=policy)
        axes[2].plot(x, [r["agreement"] for r in mine], "o-", label=policy)
    axes[0].set(xlabel="budget (% of raw KV)", ylabel="KV hit rate (hot + warm)", title="hit rate")
    axes[1].set(xlabel="budget (% of raw KV)", ylabel="ms", title="mean TTFT")
    axes[2].set(xlabel="budget (% of raw KV)", ylabel="agreement with unbudgeted", title="fidelity", ylim=(0, 1.05))
    for ax in axes:
        ax.set_xticks([100 * b for b in budgets])
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _tiny() -> Any:
    """The random-weight tiny Llama of the tests: same code path, negligible model cost."""
    from tests.conftest import build_tiny

    return build_tiny("llama")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"SQuAD-format JSON (default: {DEFAULT_DATA})")
    parser.add_argument("--paragraphs", type=int, default=1000, help="bank size in documents (default: 1000)")
    parser.add_argument("--queries", type=int, default=60, help="length of the Zipf query stream (default: 60)")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.25, 0.5])
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=6)
    parser.add_argument("--hot-mib", type=int, default=128, help="hot tier size for the budgeted runs (MiB)")
    parser.add_argument("--data-dir", type=Path, default=None, help="keep the store here (default: a temp dir)")
    parser.add_argument("--model", choices=["packaged", "tiny"], default="packaged",
                        help="packaged SmolLM2, or the tests' tiny random-weight model (policy mechanics only)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadier on a shared box)")
    args = parser.parse_args()
    squad = load_or_exit(args.data)
    corpus = synthetic_corpus(squad.paragraphs, args.paragraphs)
    stream = zipf_stream(squad.questions, args.queries)
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="kvrag-bench-memory-"))
    settings = Settings(data_dir=data_dir, hot_tier_bytes=args.hot_mib << 20, torch_threads=args.threads)
    store = BankStore(settings, llm=_tiny()) if args.model == "tiny" else BankStore(settings)
    t0 = time.perf_counter()
    store.create_bank(REFERENCE)
    for i, (text, _) in enumerate(tqdm(corpus, desc="ingest", unit="doc")):
        store.put_document(REFERENCE, f"p{i:04d}", text)
    ingest_s = time.perf_counter() - t0
    ref_stats = store.stats(REFERENCE)
    reference = run_stream(store, REFERENCE, stream, args.k, args.max_new_tokens, args.hot_mib << 20)
    reference.update(fidelity(reference["answers"], reference["answers"], stream))
    runs = []
    for fraction in args.budgets:
        for policy in POLICIES:
            name = f"{policy}-{int(round(fraction * 100))}"
            clone_bank(store, REFERENCE, name, policy)
            store.update_bank(name, budget_bytes=int(fraction * ref_stats.raw_bytes))
            result = run_stream(store, name, stream, args.k, args.max_new_tokens, args.hot_mib << 20)
            result.update(fidelity(result["answers"], reference["answers"], stream))
            result.update(policy=policy, budget_fraction=fraction, budget_bytes=int(fraction * ref_stats.raw_bytes))
            runs.append(result)
    merge_bank = "merged"
    clone_bank(store, REFERENCE, merge_bank, "hybrid")
    merge_report = store.maintain(merge_bank, evict=False, gc=False)
    merged_stats = store.stats(merge_bank)
    wall_s = time.perf_counter() - t0
    at25 = {r["policy"]: r for r in runs if abs(r["budget_fraction"] - 0.25) < 1e-9}
    goal = None
    if at25:
        goal = {"hybrid_fidelity_vs_unbudgeted": at25["hybrid"]["agreement"] / max(reference["agreement"], 1e-9),
                "hybrid_kv_hit_rate": at25["hybrid"]["kv_hit_rate"], "lru_kv_hit_rate": at25["lru"]["kv_hit_rate"],
                "hybrid_hot_hit_rate": at25["hybrid"]["hot_hit_rate"], "lru_hot_hit_rate": at25["lru"]["hot_hit_rate"]}
        goal["met"] = goal["hybrid_fidelity_vs_unbudgeted"] >= 0.9 and goal["hybrid_kv_hit_rate"] > goal[
            "lru_kv_hit_rate"]
    payload = {
        "benchmark": "memory", "machine": machine_info(store.llm.name), "model": args.model, "data": str(squad.path),
        "documents": len(corpus), "original_paragraphs": len(squad.paragraphs), "queries": len(stream),
        "distinct_questions": len({q.qid for q in stream}), "k": args.k, "max_new_tokens": args.max_new_tokens,
        "hot_tier_mib": args.hot_mib, "ingest_s": round(ingest_s, 1), "wall_s": round(wall_s, 1),
        "reference": {key: v for key, v in reference.items() if key != "answers"} | {
            "raw_bytes": ref_stats.raw_bytes, "stored_bytes": ref_stats.stored_bytes, "blocks": ref_stats.blocks},
        "runs": [{key: v for key, v in r.items() if key != "answers"} for r in runs],
        "merging": {"merged_blocks": merge_report["merged"], "stored_bytes_before": ref_stats.stored_bytes,
                    "stored_bytes_after": merged_stats.stored_bytes},
        "goal_at_25pct": goal,
    }
    write_json("memory", payload)
    save_figure(plot(runs, args.budgets), "memory")
    headers = ["policy", "budget", "hot hit", "warm", "cold", "KV hit", "mean TTFT ms", "agreement", "F1",
               "evictions"]
    table = [["unbudgeted", "-", reference["hot_hit_rate"], reference["warm_share"], reference["cold_share"],
              reference["kv_hit_rate"], reference["mean_ttft_ms"], reference["agreement"], reference["f1"], 0]]
    table += [[r["policy"], f"{int(100 * r['budget_fraction'])}%", r["hot_hit_rate"], r["warm_share"],
               r["cold_share"], r["kv_hit_rate"], r["mean_ttft_ms"], r["agreement"], r["f1"], r["evictions"]]
              for r in runs]
    print_table(f"memory: {len(corpus)} documents, {len(stream)} Zipf queries", headers, table)
    print(markdown_table(headers, table))
    print("merging:", payload["merging"])
    print("goal at 25%:", goal)
    if args.data_dir is None:
        store.close()
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
