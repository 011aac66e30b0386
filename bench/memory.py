"""Memory under budgets: eviction policies on a bank of >= 1,000 SQuAD-style paragraphs.

The bank holds the shared SQuAD excerpt plus synthetic duplicates of its paragraphs: paraphrases
(a few words swapped for synonyms: near-duplicates) and excerpts (one to three consecutive sentences,
some paraphrased). It is ingested once, without a budget (the reference), then cloned catalog-only
(the clones share the reference's blobs, so nothing is encoded again) into one bank per policy and
budget (10/25/50% of the raw fp16 KV size). Each clone answers the same stream in kv mode: queries
about documents (a fixed word window of each), drawn with Zipf popularity over ALL documents, so the
working set exceeds the warm budget, interleaved with scans of one-hit documents (each asked once in
the whole stream), the noise that frequency/importance-aware policies should resist and LRU does not.
Cold blocks are prefilled from their text when retrieved, then re-warmed, and the budget is enforced
again, so the warm set follows the stream under each policy. The hot tier is small (default 2 MiB).

Reported per run, after a warm-up share of the stream: hot-tier hit rate (decoded KV in RAM), the
warm/cold mix of retrieved blocks, cold misses (prefills), KV hit rate (hot + warm: no prefill needed),
the same on the popular (non-scan) queries only, mean TTFT, and fidelity: the share of answers equal
to the unbudgeted bank's answer to the same query (over the whole stream). Budgets are fractions of the
raw fp16 KV size; each run also shows its budget as a share of the unbudgeted warm tier (compressed
bytes on disk), which is what decides how many blocks fit.

Results go to bench/results/memory.json (packaged SmolLM2) or memory_tiny.json (``--model tiny``), and
to the matching table span of docs/BENCHMARKS.md.

    .venv/bin/python -m bench.memory [--model tiny] [--paragraphs 1000] [--queries 1000] [--budgets 0.25]

Each run's result (answers included) is also saved under ``--runs-dir`` (default DATA_DIR/runs) with its
setting, and a later invocation with the same setting reuses it instead of running it again. So the runs
can go in parallel processes, one per run (``--only unbudgeted``, ``--only hybrid-25``, ...), each on its
own copy of the data dir (the bench deletes every bank but the reference when it starts) and one shared
``--runs-dir``; a last invocation without ``--only`` then collects them and publishes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from sqlalchemy import select
from tqdm import tqdm

from bench.squad import (
    DEFAULT_DATA,
    load_or_exit,
    machine_info,
    markdown_table,
    normalize_answer,
    print_table,
    publish_doc_table,
    save_figure,
    write_json,
)
from kvstore.bank import BankStore
from kvstore.config import Settings
from kvstore.memory.policy import Candidate, plan_eviction
from kvstore.storage.catalog import BlockRow, DocumentRow, OpLogRow

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


def doc_query(text: str, rng: random.Random, words: int = 14) -> str:
    """A query about one document: a fixed window of its words (the same text every time it is asked)."""
    toks = text.split()
    start = rng.randint(0, max(0, len(toks) - words))
    return " ".join(toks[start:start + words])


def doc_stream(corpus: Sequence[tuple[str, int]], n: int, s: float = 1.0, scan_every: int = 40, scan_len: int = 15,
               seed: int = 0) -> list[tuple[str, bool]]:
    """``n`` (query, is_scan) pairs over ALL documents: Zipf popularity over a random ranking of the
    documents, interleaved every ``scan_every`` queries with a scan of ``scan_len`` documents drawn
    without replacement over the whole stream (one-hit wonders: each is asked once and never again)."""
    rng = np.random.default_rng(seed)
    qrng = random.Random(seed)
    queries = [doc_query(text, qrng) for text, _ in corpus]
    ranking = rng.permutation(len(corpus))
    weights = 1.0 / np.arange(1, len(corpus) + 1) ** s
    scans = iter(rng.permutation(len(corpus)).tolist())
    picks = rng.choice(len(corpus), size=n, p=weights / weights.sum())
    out: list[tuple[str, bool]] = []
    for i, pick in enumerate(picks.tolist()):
        if i and i % scan_every == 0:
            out += [(queries[doc], True) for doc in itertools.islice(scans, scan_len)]
        out.append((queries[int(ranking[pick])], False))
    return out[:n]


# -- banks ----------------------------------------------------------------------------------------


def clone_bank(store: BankStore, src: str, dst: str, policy: str) -> None:
    """A catalog-only copy of ``src`` (same blobs, fresh access history) under ``policy``, no budget yet. It
    keeps the source's codec, so blocks re-warmed after eviction are stored as the reference stored them."""
    store.create_bank(dst, eviction=policy, codec=store.get_bank(src).codec)
    with store.session() as s:
        src_row, dst_row = store.bank_row(s, src), store.bank_row(s, dst)
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
        store.indexes.add_rows(store.bank_index(dst_row), s, [r.id for r in rows])


def run_stream(store: BankStore, bank: str, stream: Sequence[tuple[str, bool]], k: int, max_new_tokens: int,
               hot_bytes: int, warmup: int) -> dict[str, Any]:
    """Answer the stream; tier mix and TTFT counted after the first ``warmup`` queries (answers: all)."""
    store.hot.budget_bytes = 0  # every run starts with an empty hot tier (the store's parts share this one)
    store.hot.budget_bytes = hot_bytes
    counters = store.memory.counters
    answers, ttft = [], []
    served = {key: 0 for key in ("hot_hits", "warm_loads", "cold_encodes")}
    popular = dict(served)
    for i, (text, is_scan) in enumerate(tqdm(stream, desc=bank, unit="q", leave=False, mininterval=10)):
        before = counters.as_dict()
        result = store.query(bank, text, k=k, max_new_tokens=max_new_tokens)
        after = counters.as_dict()
        answers.append(result.answer)
        if i < warmup:
            continue
        ttft.append(result.timings.ttft_ms)
        for key in served:
            served[key] += after[key] - before[key]
            if not is_scan:
                popular[key] += after[key] - before[key]
    total = max(1, sum(served.values()))
    pop_total = max(1, sum(popular.values()))
    stats = store.stats(bank)
    return {"answers": answers, "mean_ttft_ms": float(np.mean(ttft)), "p50_ttft_ms": float(np.median(ttft)),
            "hot_hit_rate": served["hot_hits"] / total, "warm_share": served["warm_loads"] / total,
            "cold_share": served["cold_encodes"] / total, "cold_misses": served["cold_encodes"],
            "kv_hit_rate": (served["hot_hits"] + served["warm_loads"]) / total,
            "popular_kv_hit_rate": (popular["hot_hits"] + popular["warm_loads"]) / pop_total,
            "popular_hot_hit_rate": popular["hot_hits"] / pop_total,
            "stored_bytes": stats.stored_bytes, "evictions": stats.evictions, "reencodes": stats.reencodes,
            "tiers": stats.tiers}


def agreement(answers: Sequence[str], reference: Sequence[str]) -> dict[str, float]:
    return {"agreement": float(np.mean([normalize_answer(a) == normalize_answer(r)
                                        for a, r in zip(answers, reference, strict=True)]))}


# -- replay: the eviction planner alone on the retrieval trace ---------------------------------------


def retrieval_trace(store: BankStore, stream: Sequence[tuple[str, bool]], k: int) -> list[list[int]]:
    """Block ids each query retrieves from the reference bank: the same under every policy and budget, since
    cold blocks stay searchable (only their KV is dropped)."""
    with store.sessions() as s:
        bank = store.bank_row(s, REFERENCE)
        return [[b.id for b, _, _ in store.retriever.retrieve(s, bank, text, k, None)] for text, _ in stream]


def attention_trace(store: BankStore, stream: Sequence[tuple[str, bool]], k: int,
                    cache: Path | None) -> list[list[float]]:
    """The share of each query's attention on each block it retrieves, as a real kv query records it (the
    model answers one token on an unbudgeted clone of the reference). Policy-independent like the retrieval
    trace, since a cold block's prefilled KV is the warm one's; kept in ``cache`` for the same stream."""
    texts = [text for text, _ in stream]
    if cache is not None and cache.exists():
        saved = json.loads(cache.read_text())
        if saved["texts"] == texts and saved["k"] == k:
            return [list(shares) for shares in saved["shares"]]
    captured: list[list[float] | None] = []
    memory = store.memory
    single, batched = memory.attention_shares, memory.block_shares

    def spy_single(*args: Any, **kwargs: Any) -> list[float] | None:
        captured.append(single(*args, **kwargs))
        return captured[-1]

    def spy_batched(*args: Any, **kwargs: Any) -> list[float] | None:
        captured.append(batched(*args, **kwargs))
        return captured[-1]

    clone_bank(store, REFERENCE, "attention-trace", "lru")
    memory.attention_shares, memory.block_shares = spy_single, spy_batched  # type: ignore[method-assign]
    try:
        for text in tqdm(texts, desc="attention trace", unit="q", mininterval=10):
            store.query("attention-trace", text, k=k, max_new_tokens=1)
    finally:
        memory.attention_shares, memory.block_shares = single, batched  # type: ignore[method-assign]
        store.delete_bank("attention-trace")
    shares = [list(s) if s is not None else [] for s in captured]
    if cache is not None:
        cache.write_text(json.dumps({"texts": texts, "k": k, "shares": shares}) + "\n")
    return shares


def replay(store: BankStore, trace: Sequence[Sequence[int]], policy: str, budget_bytes: int,
           warmup: int, shares: Sequence[Sequence[float]] | None = None) -> dict[str, Any]:
    """Replay the trace through ``plan_eviction`` as ``BankStore.query`` drives it, without a model or a hot
    tier: the query's blocks are accessed (count, heat, and their attention shares: ``shares`` as the model
    recorded them, else an equal share each), cold ones re-warmed, then the budget enforced. One query per
    simulated second (heat and importance barely decay)."""
    cfg = store.memory.config
    with store.sessions() as s:
        rows = s.execute(select(BlockRow.id, BlockRow.blob_id, BlockRow.stored_bytes, BlockRow.created_at).where(
            BlockRow.bank_id == store.bank_row(s, REFERENCE).id, BlockRow.blob_id.is_not(None))).all()
    cands = {r.id: Candidate(block_id=r.id, blob_id=r.blob_id, stored_bytes=int(r.stored_bytes),
                             touched=r.created_at.timestamp(), access_count=0, importance=0.0, prior=0.0,
                             pinned=False) for r in rows}
    warm = set(cands)

    def enforce() -> None:
        warm.difference_update(plan_eviction([cands[b] for b in warm], policy, budget_bytes, None, cfg).block_ids)

    enforce()
    start = max(c.touched for c in cands.values()) + 1.0
    hits = misses = 0
    for i, ids in enumerate(trace):
        now = start + i
        share = shares[i] if shares is not None and shares[i] else [1.0 / len(ids)] * len(ids)
        for b, attention in zip(ids, share, strict=True):
            c = cands[b]
            if i >= warmup:
                hits, misses = (hits + 1, misses) if b in warm else (hits, misses + 1)
            age = now - c.touched
            c.heat = c.heat * 0.5 ** (age / cfg.heat_half_life_s) + 1.0
            c.importance = c.importance * 0.5 ** (age / cfg.importance_half_life_s) + attention
            c.access_count, c.touched = c.access_count + 1, now
        if not warm.issuperset(ids):
            warm.update(ids)
            enforce()
    return {"policy": policy, "budget_bytes": budget_bytes, "warm_hit_rate": hits / max(1, hits + misses),
            "cold_misses": misses}


# -- output ---------------------------------------------------------------------------------------


def plot(runs: list[dict[str, Any]], budgets: Sequence[float]) -> Figure:
    fig = Figure(figsize=(15, 3.6))
    axes = fig.subplots(1, 4)
    panels = [("kv_hit_rate", "KV hit rate (hot + warm)", "hit rate"),
              ("hot_hit_rate", "hot-tier hit rate", "hot tier"),
              ("mean_ttft_ms", "ms", "mean TTFT"), ("agreement", "agreement with unbudgeted", "fidelity")]
    for policy in dict.fromkeys(r["policy"] for r in runs):
        mine = [r for r in runs if r["policy"] == policy]
        x = [100 * r["budget_fraction"] for r in mine]
        for ax, (key, _, _) in zip(axes, panels, strict=True):
            ax.plot(x, [r[key] for r in mine], "o-", label=policy)
    for ax, (_, ylabel, title) in zip(axes, panels, strict=True):
        ax.set(xlabel="budget (% of raw KV)", ylabel=ylabel, title=title)
        ax.set_xticks([100 * b for b in budgets])
        ax.legend(fontsize=7)
    axes[3].set_ylim(0, 1.05)
    fig.tight_layout()
    return fig


def doc_markdown(payload: dict[str, Any], headers: Sequence[str], table: Sequence[Sequence[Any]]) -> str:
    """The run's setting, table and verdict for its span of docs/BENCHMARKS.md."""
    machine, goal, ref = payload["machine"], payload["goal_at_25pct"], payload["reference"]
    lines = [f"Model {machine['model']}; {payload['documents']} documents ({ref['blocks']} blocks, raw KV "
             f"{ref['raw_bytes'] / 1e6:.1f} MB, stored {ref['stored_bytes'] / 1e6:.1f} MB); {payload['queries']} "
             f"queries ({payload['scan_queries']} scan), first {payload['queries'] - payload['counted_queries']} "
             f"not counted; k = {payload['k']}, hot tier {payload['hot_tier_mib']} MiB, {machine['torch_threads']} "
             f"torch thread(s), load average {machine['load_average'][0]:.1f} at the end, commit "
             f"{machine['git_commit']}, {machine['measured_at']}, wall {payload['wall_s']:.0f} s; each run "
             f"(s): {', '.join(f'{name} {wall:.0f}' for name, wall in payload['run_wall_s'].items())}. Command: "
             f"`{payload['command']}`.", "", markdown_table(headers, table), ""]
    if goal is None:
        lines.append("No 25% budget, or not both lru and hybrid, in this run: the goal is not evaluated.")
    else:
        lines.append(f"Goal at 25%: hybrid fidelity {goal['hybrid_fidelity_vs_unbudgeted']:.3f} of the unbudgeted "
                     f"(>= 0.9), KV hit rate hybrid {goal['hybrid_kv_hit_rate']:.3f} vs lru "
                     f"{goal['lru_kv_hit_rate']:.3f}: **{'met' if goal['met'] else 'not met'}**.")
    return "\n".join(lines)


def publish_replay(store: BankStore, args: argparse.Namespace, stream: Sequence[tuple[str, bool]], warmup: int,
                   raw_bytes: int, stored_bytes: int) -> None:
    """``--replay``: every policy and budget on the stream's retrieval trace; json, table, BENCHMARKS span."""
    trace = retrieval_trace(store, stream, args.k)
    shares = (attention_trace(store, stream, args.k, args.data_dir / "attention_trace.json" if args.data_dir else None)
              if args.replay_attention else None)
    runs = [replay(store, trace, policy, int(fraction * raw_bytes), warmup, shares) | {"budget_fraction": fraction}
            for fraction in args.budgets for policy in POLICIES]
    name = ("memory" if args.model == "packaged" else "memory_tiny") + "_replay"
    command = " ".join(["python -m bench.memory", *sys.argv[1:]])
    write_json(name, {"benchmark": name, "command": command,
                      "machine": machine_info(store.llm.name), "queries": len(stream), "warmup": warmup,
                      "raw_bytes": raw_bytes, "stored_bytes": stored_bytes, "runs": runs})
    headers = ["budget (raw)", "budget (stored)", *[f"{p} warm hit" for p in POLICIES],
               *[f"{p} cold misses" for p in POLICIES]]
    table = [[f"{round(100 * f)}%", f"{round(100 * f * raw_bytes / stored_bytes)}%",
              *[r["warm_hit_rate"] for r in runs if r["budget_fraction"] == f],
              *[r["cold_misses"] for r in runs if r["budget_fraction"] == f]] for f in args.budgets]
    print_table(f"memory replay: {len(stream)} queries", headers, table)
    publish_doc_table(name, f"{len(stream)} queries, first {warmup} not counted. Command: `{command}`.\n\n"
                            f"{markdown_table(headers, table)}")


def saved_or_run(runs_dir: Path | None, name: str, setting: dict[str, Any], model: str,
                 run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run ``name``'s result: the one saved under ``runs_dir`` for the same ``setting``, else ``run()`` (then
    saved there with its wall time and machine, so a parallel process's run can be collected later)."""
    path = runs_dir / f"{name}.json" if runs_dir is not None else None
    if path is not None and path.exists():
        saved = json.loads(path.read_text())
        if saved["setting"] == setting:
            print(f"{name}: reusing {path} ({saved['result']['wall_s']:.0f} s)")
            return dict(saved["result"])
    t0 = time.perf_counter()
    result = run()
    result.update(wall_s=round(time.perf_counter() - t0, 1), machine=machine_info(model))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"setting": setting, "result": result}) + "\n")
        tmp.replace(path)
    return result


def _tiny() -> Any:
    """The random-weight tiny Llama of the tests: same code path, negligible model cost."""
    from kvstore.testing.tiny import build_tiny

    return build_tiny("llama")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"SQuAD-format JSON (default: {DEFAULT_DATA})")
    parser.add_argument("--paragraphs", type=int, default=1000, help="bank size in documents (default: 1000)")
    parser.add_argument("--queries", type=int, default=1000, help="length of the query stream (default: 1000)")
    parser.add_argument("--zipf", type=float, default=0.8, help="Zipf exponent over all documents (default: 0.8)")
    parser.add_argument("--scan-every", type=int, default=20, help="popular queries between scans (default: 20)")
    parser.add_argument("--scan-len", type=int, default=10, help="one-hit documents per scan (default: 10)")
    parser.add_argument("--warmup", type=float, default=0.2, help="share of the stream not counted (default: 0.2)")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.25, 0.5])
    parser.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES),
                        help="eviction policies to run at each budget (default: all)")
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("--hot-mib", type=float, default=2.0, help="hot tier size (MiB; default 2)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="keep the store here; an existing reference bank there is reused (default: a temp dir)")
    parser.add_argument("--codec", default=None,
                        help="codec of the reference bank when it is ingested (default: the store's default); a "
                             "reused reference keeps its own")
    parser.add_argument("--runs-dir", type=Path, default=None,
                        help="where each run's result is saved and reused from (default: DATA_DIR/runs with "
                             "--data-dir, else nowhere)")
    parser.add_argument("--only", nargs="+", default=None, metavar="RUN",
                        help="run only these (unbudgeted, lru-25, hybrid-25, ...), save them under --runs-dir and "
                             "publish nothing")
    parser.add_argument("--model", choices=["packaged", "tiny"], default="packaged",
                        help="packaged SmolLM2, or the tests' tiny random-weight model (policy mechanics only)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadier on a shared box)")
    parser.add_argument("--replay", action="store_true",
                        help="replay the stream's retrieval trace through the eviction planner only (no answers, "
                             "no hot tier; seconds): warm hit rate per policy and budget")
    parser.add_argument("--replay-attention", action="store_true",
                        help="with --replay: importance from the attention the model really pays each retrieved "
                             "block (one answer token per query, kept under --data-dir), not equal shares")
    args = parser.parse_args()
    runs_dir = args.runs_dir or (args.data_dir / "runs" if args.data_dir else None)
    if args.only and runs_dir is None:
        parser.error("--only needs --data-dir or --runs-dir, where its results are saved")
    squad = load_or_exit(args.data)
    corpus = synthetic_corpus(squad.paragraphs, args.paragraphs)
    stream = doc_stream(corpus, args.queries, args.zipf, args.scan_every, args.scan_len)
    warmup = int(args.warmup * len(stream))
    hot_bytes = int(args.hot_mib * (1 << 20))
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="kvrag-bench-memory-"))
    settings = Settings(data_dir=data_dir, hot_tier_bytes=hot_bytes, torch_threads=args.threads)
    store = BankStore(settings, llm=_tiny()) if args.model == "tiny" else BankStore(settings)
    t0 = time.perf_counter()
    existing = {b.name for b in store.list_banks()}
    for name in existing - {REFERENCE}:
        store.delete_bank(name)
    if REFERENCE not in existing:
        store.create_bank(REFERENCE, codec=args.codec)
        for i, (text, _) in enumerate(tqdm(corpus, desc="ingest", unit="doc")):
            store.put_document(REFERENCE, f"p{i:04d}", text)
    ingest_s = time.perf_counter() - t0
    ref_stats = store.stats(REFERENCE)
    if args.replay:
        publish_replay(store, args, stream, warmup, ref_stats.raw_bytes, ref_stats.stored_bytes)
        return
    setting = {"model": store.llm.name, "documents": len(corpus), "reference_blocks": ref_stats.blocks,
               "reference_stored_bytes": ref_stats.stored_bytes, "queries": len(stream), "zipf": args.zipf,
               "scan_every": args.scan_every, "scan_len": args.scan_len, "warmup": warmup, "k": args.k,
               "max_new_tokens": args.max_new_tokens, "hot_tier_bytes": hot_bytes}

    def budgeted(name: str, policy: str, fraction: float) -> Callable[[], dict[str, Any]]:
        def run() -> dict[str, Any]:
            clone_bank(store, REFERENCE, name, policy)
            store.update_bank(name, budget_bytes=int(fraction * ref_stats.raw_bytes))
            return run_stream(store, name, stream, args.k, args.max_new_tokens, hot_bytes, warmup)
        return run

    def unbudgeted() -> dict[str, Any]:
        # On a clone too, so its access history starts empty like the budgeted ones'.
        clone_bank(store, REFERENCE, "unbudgeted", "lru")
        return run_stream(store, "unbudgeted", stream, args.k, args.max_new_tokens, hot_bytes, warmup)

    plan: dict[str, tuple[str, float, Callable[[], dict[str, Any]]]] = {"unbudgeted": ("lru", 0.0, unbudgeted)}
    for fraction in args.budgets:
        for policy in args.policies:
            name = f"{policy}-{int(round(fraction * 100))}"
            plan[name] = (policy, fraction, budgeted(name, policy, fraction))
    if args.only:
        unknown = set(args.only) - set(plan)
        if unknown:
            parser.error(f"unknown runs {sorted(unknown)}; these are {sorted(plan)}")
        for name in args.only:
            result = saved_or_run(runs_dir, name, setting | {"run": name}, store.llm.name, plan[name][2])
            print(f"{name}: saved under {runs_dir} ({result['wall_s']:.0f} s)")
        return
    # The reference answers are the unbudgeted bank's.
    reference = saved_or_run(runs_dir, "unbudgeted", setting | {"run": "unbudgeted"}, store.llm.name,
                             plan["unbudgeted"][2])
    reference.update(agreement(reference["answers"], reference["answers"]))
    runs = []
    for name, (policy, fraction, run) in plan.items():
        if name == "unbudgeted":
            continue
        result = saved_or_run(runs_dir, name, setting | {"run": name}, store.llm.name, run)
        result.update(agreement(result["answers"], reference["answers"]))
        result.update(policy=policy, budget_fraction=fraction, budget_bytes=int(fraction * ref_stats.raw_bytes),
                      budget_vs_stored=fraction * ref_stats.raw_bytes / ref_stats.stored_bytes)
        runs.append(result)
    wall_s = time.perf_counter() - t0
    at25 = {r["policy"]: r for r in runs if abs(r["budget_fraction"] - 0.25) < 1e-9}
    goal = None
    if "lru" in at25 and "hybrid" in at25:
        goal = {"hybrid_fidelity_vs_unbudgeted": at25["hybrid"]["agreement"] / max(reference["agreement"], 1e-9),
                "hybrid_kv_hit_rate": at25["hybrid"]["kv_hit_rate"], "lru_kv_hit_rate": at25["lru"]["kv_hit_rate"],
                "hybrid_hot_hit_rate": at25["hybrid"]["hot_hit_rate"], "lru_hot_hit_rate": at25["lru"]["hot_hit_rate"]}
        goal["met"] = goal["hybrid_fidelity_vs_unbudgeted"] >= 0.9 and goal["hybrid_kv_hit_rate"] > goal[
            "lru_kv_hit_rate"]
    payload = {
        "benchmark": "memory", "command": " ".join(["python -m bench.memory", *sys.argv[1:]]),
        "machine": machine_info(store.llm.name), "model": args.model, "data": str(squad.path),
        "documents": len(corpus), "original_paragraphs": len(squad.paragraphs), "queries": len(stream),
        "counted_queries": len(stream) - warmup, "scan_queries": sum(scan for _, scan in stream),
        "distinct_documents_asked": len({text for text, _ in stream}), "zipf": args.zipf,
        "scan_every": args.scan_every, "scan_len": args.scan_len, "k": args.k,
        "max_new_tokens": args.max_new_tokens, "hot_tier_mib": args.hot_mib, "ingest_s": round(ingest_s, 1),
        "wall_s": round(wall_s, 1),
        "run_wall_s": {"unbudgeted": reference["wall_s"]} | {
            f"{r['policy']}-{round(100 * r['budget_fraction'])}": r["wall_s"] for r in runs},
        "reference": {key: v for key, v in reference.items() if key != "answers"} | {
            "raw_bytes": ref_stats.raw_bytes, "stored_bytes": ref_stats.stored_bytes, "blocks": ref_stats.blocks},
        "runs": [{key: v for key, v in r.items() if key != "answers"} for r in runs],
        "goal_at_25pct": goal,
    }
    name = "memory" if args.model == "packaged" else "memory_tiny"
    write_json(name, payload)
    save_figure(plot(runs, args.budgets), name)
    headers = ["policy", "budget (raw)", "budget (stored)", "hot hit", "warm", "cold", "cold misses", "KV hit",
               "KV hit (popular)", "mean TTFT ms", "agreement", "evictions"]
    table = [["unbudgeted", "-", "-", reference["hot_hit_rate"], reference["warm_share"], reference["cold_share"],
              reference["cold_misses"], reference["kv_hit_rate"], reference["popular_kv_hit_rate"],
              reference["mean_ttft_ms"], reference["agreement"], 0]]
    table += [[r["policy"], f"{round(100 * r['budget_fraction'])}%", f"{round(100 * r['budget_vs_stored'])}%",
               r["hot_hit_rate"], r["warm_share"], r["cold_share"], r["cold_misses"], r["kv_hit_rate"],
               r["popular_kv_hit_rate"], r["mean_ttft_ms"], r["agreement"], r["evictions"]] for r in runs]
    print_table(f"memory: {len(corpus)} documents, {len(stream)} queries", headers, table)
    print("goal at 25%:", goal)
    publish_doc_table(name, doc_markdown(payload, headers, table))
    if args.data_dir is None:
        store.close()
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
