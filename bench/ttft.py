"""Time to first token, kv mode vs text mode, end to end through ``BankStore.query``.

Ingests every paragraph of the SQuAD excerpt into a fresh store (temporary data dir, packaged
SmolLM2 + MiniLM), then for each k asks the same answerable questions in three ways, interleaved
per question so load from other processes hits all of them alike:

- ``kv``: stored KV from the hot tier (decoded blocks in RAM, warmed before measuring),
- ``kv cold``: a second store on the same data dir with ``hot_tier_bytes=0``, so every block is
  read from its blob and decoded on every query,
- ``text``: the baseline, prefilling the retrieved blocks' tokens after the cached prefix.

``max_new_tokens=1``: the query returns right after the first token, so ttft_ms is what is timed.
Writes bench/results/ttft.json and ttft.png. Goal (issue 3): kv >= 5x faster than text at k = 5.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from tqdm import tqdm

from bench import ttft_shape
from bench.squad import (
    BANK,
    Question,
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
from kvstore.query.plan import Mode
from kvstore.types import Timings

PHASES = ("ttft_ms", "retrieve_ms", "load_ms", "prefill_ms")  # the Timings fields that make up TTFT
BASELINE = "text"
GOAL_K, GOAL_SPEEDUP = 5, 5.0


@dataclass(frozen=True)
class Variant:
    """One way of answering: which store (hot tier on or off) and which mode."""

    name: str
    store: BankStore
    mode: Mode


@dataclass
class Sample:
    """One timed query."""

    variant: str
    k: int
    qid: str
    context_tokens: int
    timings: Timings


def percentile(values: Sequence[float], q: float) -> float:
    """Linearly interpolated percentile (q in 0..100), as numpy computes it by default."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def ask(variant: Variant, question: Question, k: int) -> Sample:
    result = variant.store.query(BANK, question.text, k=k, mode=variant.mode, max_new_tokens=1)
    return Sample(variant.name, k, question.qid, result.usage.context_tokens, result.timings)


def warm_up(variants: Sequence[Variant], questions: Sequence[Question], max_k: int) -> None:
    """First forward passes are slow (allocator, kernels); and the hot tier must hold every block
    a measured query touches, or the 'kv' row would include first-time decodes."""
    for variant in variants:
        for question in questions[:3]:
            ask(variant, question, max_k)
    hot = next(v for v in variants if v.mode == "kv" and v.store.hot.budget_bytes > 0)
    for question in tqdm(questions, desc="warm hot tier", unit="q"):
        ask(hot, question, max_k)


def measure(variants: Sequence[Variant], questions: Sequence[Question], ks: Sequence[int]) -> list[Sample]:
    """Every (k, question) asked once per variant, variants interleaved."""
    samples: list[Sample] = []
    with tqdm(total=len(ks) * len(questions), desc="measure", unit="q") as bar:
        for k in ks:
            for question in questions:
                samples.extend(ask(v, question, k) for v in variants)
                bar.update()
    return samples


def summarise(samples: Sequence[Sample], names: Sequence[str], ks: Sequence[int]) -> list[dict[str, Any]]:
    """Median and p90 of each phase per (variant, k), and the speedup of the baseline's median TTFT."""
    rows = []
    for k in ks:
        medians: dict[str, float] = {}
        for name in names:
            picked = [s for s in samples if s.variant == name and s.k == k]
            row: dict[str, Any] = {"variant": name, "k": k, "n": len(picked),
                                   "context_tokens": statistics.median(s.context_tokens for s in picked)}
            for phase in PHASES:
                values = [getattr(s.timings, phase) for s in picked]
                row[f"{phase}_median"] = round(statistics.median(values), 2)
                row[f"{phase}_p90"] = round(percentile(values, 90), 2)
            medians[name] = row["ttft_ms_median"]
            rows.append(row)
        for row in rows[-len(names):]:
            row["speedup_vs_text"] = round(medians[BASELINE] / row["ttft_ms_median"], 2)
    return rows


def plot(rows: Sequence[dict[str, Any]]) -> Figure:
    """Left: median TTFT (p90 dashed) vs k per variant. Right: the phases of the median at GOAL_K."""
    names = list(dict.fromkeys(r["variant"] for r in rows))
    # A bare Figure needs no pyplot and no display backend.
    fig = Figure(figsize=(11, 4.2))
    left, right = fig.subplots(1, 2)
    for name in names:
        mine = [r for r in rows if r["variant"] == name]
        ks = [r["k"] for r in mine]
        line = left.plot(ks, [r["ttft_ms_median"] for r in mine], marker="o", label=f"{name} (median)")[0]
        left.plot(ks, [r["ttft_ms_p90"] for r in mine], ls="--", color=line.get_color(), alpha=0.6)
    left.set(xlabel="k (retrieved blocks)", ylabel="time to first token, ms", yscale="log",
             title="TTFT through BankStore.query (dashed: p90)")
    left.set_xticks(sorted({r["k"] for r in rows}))
    left.grid(alpha=0.3, which="both")
    left.legend()
    at_goal = [r for r in rows if r["k"] == GOAL_K]
    width = 0.8 / len(PHASES)
    # Grouped, not stacked: stacked bars on a log axis misstate the lower segments.
    for i, phase in enumerate(PHASES):
        xs = [j + (i - (len(PHASES) - 1) / 2) * width for j in range(len(at_goal))]
        right.bar(xs, [max(r[f"{phase}_median"], 0.01) for r in at_goal], width, label=phase.removesuffix("_ms"))
    right.set_xticks(range(len(at_goal)), [r["variant"] for r in at_goal])
    right.set(ylabel="ms (medians)", yscale="log", title=f"phases at k = {GOAL_K} (prefill includes KV assembly)")
    right.grid(alpha=0.3, axis="y", which="both")
    right.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig


def run(args: argparse.Namespace) -> dict[str, Any]:
    squad = load_or_exit(args.data)
    questions = pick_questions(squad.questions, args.questions)
    ks = sorted(args.k)
    with tempfile.TemporaryDirectory(prefix="kvrag-bench-ttft-") as tmp:
        store = open_store(Path(tmp), torch_threads=args.threads)
        ingest(store, squad.paragraphs)
        # Same catalog, blobs, model and embedder; only the hot tier differs.
        cold = BankStore(store.settings.model_copy(update={"hot_tier_bytes": 0}), llm=store.llm,
                         embedder=store.embedder, migrate=False)
        variants = [Variant("kv", store, "kv"), Variant("kv cold", cold, "kv"), Variant(BASELINE, store, "text")]
        warm_up(variants, questions, max(ks))
        samples = measure(variants, questions, ks)
        stats = store.stats(BANK)
        codec = store.get_bank(BANK).codec  # the default codec as the bank resolved it (auto: by model)
        machine = machine_info(store.llm.name)
        machine["embedder"] = store.embedder.name
        cold.close()
        store.close()
    rows = summarise(samples, [v.name for v in variants], ks)
    goal_row = next(r for r in rows if r["variant"] == "kv" and r["k"] == GOAL_K) if GOAL_K in ks else None
    return {
        "benchmark": "ttft",
        "data": str(args.data),
        "questions": len(questions),
        "ks": ks,
        "max_new_tokens": 1,
        "bank": {"documents": stats.documents, "blocks": stats.blocks, "tokens": stats.tokens,
                 "codec": codec, "block_tokens": store.settings.block_tokens},
        "machine": machine,
        "goal": {"k": GOAL_K, "speedup": GOAL_SPEEDUP,
                 "measured": goal_row["speedup_vs_text"] if goal_row else None,
                 "met": bool(goal_row and goal_row["speedup_vs_text"] >= GOAL_SPEEDUP)},
        "rows": rows,
        "samples": [{**asdict(s.timings), "variant": s.variant, "k": s.k, "qid": s.qid,
                     "context_tokens": s.context_tokens} for s in samples],
    }


TABLE_HEADERS = ("k", "variant", "ctx tokens", "TTFT p50 ms", "TTFT p90 ms", "retrieve p50", "load p50",
                 "prefill p50", "text/variant")


def table_rows(rows: Sequence[dict[str, Any]]) -> list[list[Any]]:
    return [[r["k"], r["variant"], int(r["context_tokens"]), r["ttft_ms_median"], r["ttft_ms_p90"],
             r["retrieve_ms_median"], r["load_ms_median"], r["prefill_ms_median"], f"{r['speedup_vs_text']:.1f}x"]
            for r in rows]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.ttft",
        description="Time to first token of kv mode (hot tier and cold) vs text mode at several k, end to end "
                    "through BankStore.query on the SQuAD excerpt (bench/results/ttft.{json,png}); with --http "
                    "through a real server (ttft_http.*); with --shape on a random-weight model of a real size "
                    "at long contexts (ttft_shape_<device>.*).")
    add_data_args(parser, default_questions=30)
    parser.add_argument("--k", type=int, nargs="+", default=[1, 3, 5, 8], help="k values (default: 1 3 5 8)")
    parser.add_argument("--http", action="store_true", help="time kv vs text (and llama.cpp) end to end through "
                        "a real server's HTTP API at k = 5 instead (bench/ttft_http.py)")
    parser.add_argument("--no-llama-cpp", action="store_true", help="with --http: skip the llama.cpp baseline")
    parser.add_argument("--quick", action="store_true", help="with --http: 10 questions, no llama.cpp, nothing "
                        "written (~3 minutes): prints the ratios")
    parser.add_argument("--baseline-root", type=Path, default=None, help="with --http: also time first touch on a "
                        "fresh server running this checkout's code (e.g. `git worktree add /tmp/old COMMIT`), in the "
                        "same run: a before/after of one change")
    parser.add_argument("--baseline-last", action="store_true", help="with --baseline-root: time the baseline after "
                        "this checkout, not before (a second run in the other order tells drift from a change)")
    ttft_shape.add_args(parser)
    args = parser.parse_args(argv)
    given = sys.argv[1:] if argv is None else list(argv)
    # --http runs the server on its own default threads (what `make serve` gets) unless --threads is given.
    args.threads_given = any(a == "--threads" or a.startswith("--threads=") for a in given)
    if args.shape:
        shaped = ttft_shape.run(args)
        ttft_shape.report(shaped, f"ttft_shape_{shaped['device'].split(':')[0]}")
        return
    if args.http:
        from bench import ttft_http  # it imports this module's percentile

        ttft_http.report(ttft_http.run(args))
        return
    result = run(args)
    print_table(f"TTFT, {result['questions']} questions, {result['machine']['torch_threads']} torch threads",
                TABLE_HEADERS, table_rows(result["rows"]))
    goal = result["goal"]
    if goal["measured"] is not None:
        print(f"goal: kv >= {goal['speedup']:.0f}x faster than text at k = {goal['k']}: measured "
              f"{goal['measured']:.1f}x -> {'met' if goal['met'] else 'NOT met'}")
    print(f"wrote {write_json('ttft', result)} and {save_figure(plot(result['rows']), 'ttft')}")
    markdown = doc_markdown(result, TABLE_HEADERS, table_rows(result["rows"]))
    publish_doc_table("ttft", markdown)


if __name__ == "__main__":
    main()
