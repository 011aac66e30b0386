"""What the context map costs and gives on SQuAD: questions answered with and without the bank's map.

The paragraphs are ingested into a fresh store; ingest bootstraps the map's roadmap (one entry per
paragraph: first sentence + doc id, while the default 1024-token budget allows). Each question's top-k
blocks are retrieved once and four variants answer after the same blocks (``bench/quality.py``'s
harness: greedy answer -> EM/F1, teacher-forced question + gold answer -> NLL and KL):

- **text** / **kv**: no map (the baseline and kv mode);
- **text+map** / **kv+map**: the rendered map right after the shared prefix, from its cached KV (prefilled
  once per map version, timed separately as ``map_prefill_ms``), then the blocks.

KL is kv against text and kv+map against text+map (fidelity of kv mode with the map in front); the
map's own effect shows in F1, gold NLL and agreement between with/without.

Refreshes (``--refreshes N``, alone with ``--refresh-only``): N rounds of a few new questions asked through
``BankStore.query`` (which records them) then one refresh by the local model, decoding constrained to the
edit schema; each round's status, what was applied, refused and evicted, and the map's items before and
after are recorded. Writes bench/results/context_map.json (a refresh-only run keeps the file's quality
rows) and context_map.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from tqdm import tqdm

from bench.quality import (
    Case,
    Env,
    Outcome,
    Prefilled,
    answer_nll,
    kl_per_token,
    kv_variant,
    retrieve_cases,
    run_variant,
)
from bench.quality import text_variant as plain_text_variant
from bench.squad import (
    BANK,
    RESULTS_DIR,
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
    squad_scores,
    write_json,
)
from kvstore.contextmap.kvcache import MapPrefill
from kvstore.types import BlockKV, Context

VARIANTS = ("text", "kv", "text+map", "kv+map")
REFERENCE_OF = {"text": "text", "kv": "text", "text+map": "text+map", "kv+map": "text+map"}


def with_map(env: Env, case: Case, shown: BlockKV, kv: bool) -> Context | Prefilled:
    """The map's cached KV after the prefix, then the blocks: stored KV (kv), or the blocks' text prefilled with
    the question in one pass (text mode)."""
    runner = env.store.runner
    if kv:
        blocks = [env.store.load_block(env.session, env.bank, row) for row in case.blocks]
        return runner.assemble([shown, *blocks])
    ctx = runner.assemble([shown])
    flat = [tok for ids in case.block_ids for tok in ids]
    logits = runner.prefill(ctx, flat + case.question_ids)
    return Prefilled(Context(ctx.cache, ctx.next_position + len(flat), ctx.context_tokens + len(flat)), logits)


def evaluate(env: Env, cases: Sequence[Case], shown: BlockKV, max_new_tokens: int) -> list[dict[str, Any]]:
    """One record per (question, variant), variants interleaved question by question so load hits them alike."""
    records = []
    builders = {"text": plain_text_variant, "kv": kv_variant,
                "text+map": lambda e, c: with_map(e, c, shown, kv=False),
                "kv+map": lambda e, c: with_map(e, c, shown, kv=True)}
    for case in tqdm(cases, desc="evaluate", unit="q"):
        outs: dict[str, Outcome] = {name: run_variant(env, case, builders[name], max_new_tokens) for name in VARIANTS}
        for name, out in outs.items():
            ref = outs[REFERENCE_OF[name]]
            em, f1 = squad_scores(out.answer, case.question.answers)
            twin = outs[name.replace("+map", "") if "+map" in name else f"{name}+map"]
            records.append({"variant": name, "qid": case.question.qid, "answer": out.answer, "em": em, "f1": f1,
                            "kl": kl_per_token(ref.logprobs, out.logprobs), "nll": answer_nll(out.logprobs, case),
                            "agree_ref": out.answer == ref.answer, "agree_twin": out.answer == twin.answer,
                            "ttft_ms": round(out.ttft_ms, 2), "gold_retrieved": case.gold_retrieved})
    return records


def summarise(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for name in VARIANTS:
        mine = [r for r in records if r["variant"] == name]
        rows.append({"variant": name, "n": len(mine), "em": statistics.fmean(r["em"] for r in mine),
                     "f1": statistics.fmean(r["f1"] for r in mine), "kl_mean": statistics.fmean(r["kl"] for r in mine),
                     "nll": statistics.fmean(r["nll"] for r in mine),
                     "agree_ref": statistics.fmean(r["agree_ref"] for r in mine),
                     "agree_twin": statistics.fmean(r["agree_twin"] for r in mine),
                     "ttft_ms_median": round(statistics.median(r["ttft_ms"] for r in mine), 2)})
    return rows


def plot(rows: Sequence[dict[str, Any]], map_tokens: int) -> Figure:
    fig = Figure(figsize=(12, 3.8))
    axes = fig.subplots(1, 3)
    names = [r["variant"] for r in rows]
    colors = ["#888888", "#1f77b4", "#bbbbbb", "#ff7f0e"]
    for ax, key, label in ((axes[0], "f1", "SQuAD F1 (mean)"), (axes[1], "nll", "gold-answer NLL (nats/token)"),
                           (axes[2], "ttft_ms_median", "median TTFT, ms")):
        ax.bar(names, [r[key] for r in rows], color=colors)
        ax.set(title=label)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"context map ({map_tokens} tokens, KV cached) before the retrieved blocks")
    fig.tight_layout()
    return fig


def refresh_rounds(store: Any, questions: Sequence[Any], rounds: int, per_round: int, k: int) -> dict[str, Any]:
    """``rounds`` times: ask ``per_round`` new questions (recorded for the map), then refresh with the local model."""
    out: list[dict[str, Any]] = []
    start = store.context_map.get(BANK)
    for r in range(rounds):
        asked = [questions[(r * per_round + j) % len(questions)].text for j in range(per_round)]
        for text in asked:
            store.query(BANK, text, k=k, max_new_tokens=12, context_map=True)
        before = store.context_map.get(BANK)
        t0 = time.perf_counter()
        report = store.context_map.refresh(BANK)
        seconds = time.perf_counter() - t0
        after = store.context_map.get(BANK)
        contents = {i.id: i.content for i in after.items}
        out.append({"round": r + 1, "questions": asked, "status": report.status, "seconds": round(seconds, 2),
                    "records": report.records, "items_before": len(before.items), "items_after": len(after.items),
                    "tokens_after": after.tokens, "applied": report.applied, "rejected": report.rejected,
                    "evicted": report.evicted, "error": report.error,
                    "added": [{"id": a["id"], "content": contents.get(a["id"])} for a in report.applied
                              if a["op"] == "add"],
                    "replaced": [{"id": a["id"], "content": contents.get(a["id"])} for a in report.applied
                                 if a["op"] == "replace"]})
    end = store.context_map.get(BANK)
    statuses: dict[str, int] = {}
    for row in out:
        statuses[row["status"]] = statuses.get(row["status"], 0) + 1
    sections = {sec: sum(1 for i in end.items if i.section == sec) for sec in ("roadmap", "understanding",
                                                                               "reusable_results")}
    return {"rounds": rounds, "questions_per_round": per_round, "status_counts": statuses,
            "items_start": len(start.items), "items_end": len(end.items), "sections_end": sections,
            "added_total": sum(len(r["added"]) for r in out), "replaced_total": sum(len(r["replaced"]) for r in out),
            "rejected_total": sum(len(r["rejected"]) for r in out),
            "evicted_total": sum(len(r["evicted"]) for r in out),
            "seconds_median": round(statistics.median(r["seconds"] for r in out), 2) if out else 0.0,
            "per_round": out}


def run_refresh_only(args: argparse.Namespace) -> dict[str, Any]:
    """Only the refresh rounds, on a fresh store with the bootstrapped map; the quality rows are kept from the file."""
    squad = load_or_exit(args.data)
    questions = pick_questions(squad.questions, max(args.questions, args.refreshes * args.per_round))
    with tempfile.TemporaryDirectory(prefix="kvrag-bench-map-") as tmp:
        store = open_store(Path(tmp), torch_threads=args.threads, map_llm_max_tokens=args.refresh_tokens)
        ingest(store, squad.paragraphs)
        refreshes = refresh_rounds(store, questions, args.refreshes, args.per_round, args.k)
        machine = machine_info(store.llm.name)
        store.close()
    path = RESULTS_DIR / "context_map.json"
    result: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {"benchmark": "context_map"}
    result["refreshes"] = {**refreshes, "machine": machine}
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    squad = load_or_exit(args.data)
    questions = pick_questions(squad.questions, args.questions)
    with tempfile.TemporaryDirectory(prefix="kvrag-bench-map-") as tmp:
        store = open_store(Path(tmp), torch_threads=args.threads, map_llm_max_tokens=args.refresh_tokens)
        ingest(store, squad.paragraphs)
        view = store.context_map.get(BANK)
        with store.session() as s:
            bank_row = store.bank_row(s, BANK)
            t0 = time.perf_counter()
            first: MapPrefill = store.context_map.prefill(s, bank_row)
            map_prefill_ms = (time.perf_counter() - t0) * 1000
            t0 = time.perf_counter()
            again = store.context_map.prefill(s, bank_row)
            cached_ms = (time.perf_counter() - t0) * 1000
            assert first.kv is not None and again.prefilled == 0
            env = Env(store, s, bank_row)
            cases = retrieve_cases(env, questions, [args.k])
            records = evaluate(env, cases, first.kv, args.max_new_tokens)
        refreshes = refresh_rounds(store, questions, args.refreshes, args.per_round, args.k)
        stats = store.stats(BANK)
        machine = machine_info(store.llm.name)
        machine["embedder"] = store.embedder.name
        store.close()
    return {
        "benchmark": "context_map",
        "data": str(args.data),
        "questions": len(questions),
        "k": args.k,
        "max_new_tokens": args.max_new_tokens,
        "bank": {"documents": stats.documents, "blocks": stats.blocks, "tokens": stats.tokens},
        "map": {"version": view.version, "items": len(view.items), "tokens": view.tokens,
                "budget_tokens": view.budget_tokens, "prefill_ms": round(map_prefill_ms, 2),
                "cached_lookup_ms": round(cached_ms, 3)},
        "refreshes": {**refreshes, "machine": machine},
        "machine": machine,
        "rows": summarise(records),
        "records": records,
    }


TABLE_HEADERS = ("variant", "EM", "F1", "KL vs its text", "gold NLL", "agree w/ text", "agree w/o↔with map",
                 "TTFT p50 ms")


def table_rows(rows: Sequence[dict[str, Any]]) -> list[list[Any]]:
    return [[r["variant"], r["em"], r["f1"], r["kl_mean"], r["nll"], r["agree_ref"], r["agree_twin"],
             r["ttft_ms_median"]] for r in rows]


def refresh_markdown(refreshes: dict[str, Any]) -> str:
    """The refresh section's table: status counts and what the map gained, with a few added items."""
    m = refreshes["machine"]
    counts = ", ".join(f"`{k}` {v}" for k, v in sorted(refreshes["status_counts"].items()))
    lines = [f"{refreshes['rounds']} refreshes ({refreshes['questions_per_round']} new questions before each), "
             f"{m['model']}, {m['cpu_count']} CPUs, {m['torch_threads']} torch threads, load average "
             f"{m['load_average'][0]:.1f} at the end, commit {m['git_commit']}, {m['measured_at']}.", "",
             f"Status: {counts}. Items {refreshes['items_start']} -> {refreshes['items_end']} (end: "
             + ", ".join(f"{k} {v}" for k, v in refreshes["sections_end"].items())
             + f"); added {refreshes['added_total']}, replaced {refreshes['replaced_total']}, evicted "
             f"{refreshes['evicted_total']}, refused {refreshes['rejected_total']}; median refresh "
             f"{refreshes['seconds_median']:.1f} s.", "",
             "| round | status | items before -> after | applied | evicted | refused | s |",
             "|---:|---|---|---|---:|---:|---:|"]
    for r in refreshes["per_round"]:
        ops = ", ".join(f"{a['op']} {a['id']}" for a in r["applied"]) or "-"
        lines.append(f"| {r['round']} | {r['status']} | {r['items_before']} -> {r['items_after']} | {ops} | "
                     f"{len(r['evicted'])} | {len(r['rejected'])} | {r['seconds']:.1f} |")
    examples = [a for r in refreshes["per_round"] for a in r["added"] if a["content"]][:4]
    if examples:
        lines += ["", "Items the refreshes added (first few):", ""]
        lines += [f"- `{a['id']}`: {a['content']}" for a in examples]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_args(parser, default_questions=30)
    parser.add_argument("--k", type=int, default=3, help="blocks retrieved per question (default: 3)")
    parser.add_argument("--max-new-tokens", type=int, default=24, help="greedy answer length (default: 24)")
    parser.add_argument("--refresh-tokens", type=int, default=256,
                        help="longest answer the local refresh may write (default: 256)")
    parser.add_argument("--refreshes", type=int, default=10, help="refresh rounds (default: 10)")
    parser.add_argument("--per-round", type=int, default=2, help="new questions before each refresh (default: 2)")
    parser.add_argument("--refresh-only", action="store_true",
                        help="only the refresh rounds (the file's quality rows are kept)")
    args = parser.parse_args()
    if args.refresh_only:
        result = run_refresh_only(args)
        path = write_json("context_map", result)
        publish_doc_table("context_map_refresh", refresh_markdown(result["refreshes"]))
        print(refresh_markdown(result["refreshes"]))
        print(f"wrote {path}")
        return
    result = run(args)
    path = write_json("context_map", result)
    save_figure(plot(result["rows"], result["map"]["tokens"]), "context_map")
    m, r = result["map"], result["refreshes"]
    print(f"map: {m['items']} items, {m['tokens']}/{m['budget_tokens']} tokens, prefilled once in "
          f"{m['prefill_ms']:.0f} ms (cached lookup {m['cached_lookup_ms']:.2f} ms); local refreshes: "
          f"{r['status_counts']}")
    print_table(f"context map, k = {args.k}", TABLE_HEADERS, table_rows(result["rows"]))
    summary = (f"Map: {m['items']} roadmap items, {m['tokens']} of {m['budget_tokens']} tokens, prefilled once in "
               f"{m['prefill_ms']:.0f} ms, then reused from memory. Local refreshes (SmolLM2): "
               f"{r['status_counts']}.\n\n")
    markdown = summary + doc_markdown(result, TABLE_HEADERS, table_rows(result["rows"]))
    publish_doc_table("context_map", markdown)
    publish_doc_table("context_map_refresh", refresh_markdown(r))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
