"""Agent sessions on SQuAD: an orchestrator's trajectory handed to workers (Latent Briefing), pruned (SideQuest).

Each *episode* is an orchestrator trajectory built from the SQuAD excerpt: a goal, then steps of one
search result (a paragraph, as a tool output) and a short note each; some results hold the answers to
the workers' subquestions, the others are distractor paragraphs of the same article. Per worker call
(subquestion, asked after the whole trajectory) the variants are:

- ``text``: the whole trajectory replayed as text after the cached system prefix (the reference:
  TTFT is the measured prefill of the trajectory plus the question's);
- ``kv``: the whole trajectory's stored KV (a brief with no compaction);
- ``brief@...``: briefs compacted by the task's attention (``tau`` or a budget share of the tokens);
- ``retrieval``: plain kv retrieval of the top-2 paragraphs from a bank holding the whole excerpt.

Reported: SQuAD F1, KL(text || variant) over question + gold answer tokens, the context tokens the
worker got, compaction ms and TTFT. Prune: each episode is replayed with its subquestions asked when
their passage arrives (full-KV briefs) and ``prune(policy="attention")`` after every step, beside an
unpruned twin; reported are peak live session tokens and F1 of both.
Writes bench/results/sessions.json and sessions.png.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from tqdm import tqdm

from bench.quality import kl_per_token
from bench.squad import (
    BANK,
    RESULTS_DIR,
    Question,
    Squad,
    add_data_args,
    doc_markdown,
    ingest,
    load_or_exit,
    machine_info,
    open_store,
    print_table,
    publish_doc_table,
    save_figure,
    squad_scores,
    write_json,
)
from kvstore.bank import BankStore
from kvstore.catalog import BlockRow
from kvstore.runner import Context
from kvstore.sessions import SessionStore, render_segment, sessions_of

GOAL = ("Goal: answer the team's questions about the Normans. Plan: search the archive, read each result, "
        "and note what matters for the questions.")
BRIEFS: dict[str, dict[str, float]] = {  # name -> {"tau": ...} or {"share": budget as a share of the tokens}
    "brief@tau=0": {"tau": 0.0}, "brief@tau=1": {"tau": 1.0}, "brief@40%": {"share": 0.40},
    "brief@25%": {"share": 0.25},
}
VARIANTS = ("text", "kv", *BRIEFS, "retrieval")
RETRIEVAL_K = 2


@dataclass
class Episode:
    """An orchestrator trajectory: the goal, then per step a tool output and a note; subquestions by step."""

    steps: list[list[dict[str, str]]]
    questions: list[tuple[Question, int]]  # (subquestion, the step whose tool output answers it)

    @property
    def segments(self) -> list[dict[str, str]]:
        return [{"role": "orchestrator", "text": GOAL}, *(seg for step in self.steps for seg in step)]


@dataclass
class Record:
    variant: str
    episode: int
    qid: str
    f1: float
    kl: float
    worker_tokens: int
    compaction_ms: float
    ttft_ms: float
    answer: str


@dataclass
class PruneRun:
    episode: int
    peak_keep: int = 0
    peak_prune: int = 0
    f1_keep: list[float] = field(default_factory=list)
    f1_prune: list[float] = field(default_factory=list)
    pruned_segments: int = 0


def build_episodes(squad: Squad, episodes: int, relevant: int, distractors: int, per_paragraph: int,
                   seed: int = 0) -> list[Episode]:
    """Episodes over disjoint answer paragraphs; distractors drawn from the rest of the article."""
    rng = random.Random(seed)
    by_paragraph: dict[int, list[Question]] = {}
    for q in squad.questions:
        by_paragraph.setdefault(q.paragraph, []).append(q)
    answerable = [p for p, qs in sorted(by_paragraph.items()) if len(qs) >= per_paragraph]
    rng.shuffle(answerable)
    out = []
    for e in range(episodes):
        gold = answerable[e * relevant:(e + 1) * relevant]
        others = [p for p in range(len(squad.paragraphs)) if p not in gold]
        order = [(p, True) for p in gold] + [(p, False) for p in rng.sample(others, distractors)]
        rng.shuffle(order)
        steps, questions = [], []
        for step, (p, is_gold) in enumerate(order):
            text = squad.paragraphs[p]
            steps.append([{"role": "tool", "text": f"search result {step + 1}: {text}"},
                          {"role": "note", "text": f"Read result {step + 1} ({' '.join(text.split()[:6])} ...)."}])
            if is_gold:
                questions += [(q, step) for q in by_paragraph[p][:per_paragraph]]
        out.append(Episode(steps=steps, questions=questions))
    return out


def _logprobs(store: BankStore, ctx: Context, ids: Sequence[int]) -> torch.Tensor:
    return torch.log_softmax(store.runner.logits(ctx, ids), dim=-1)


def _copy(ctx: Context) -> Context:
    with torch.inference_mode():
        return Context(copy.deepcopy(ctx.cache), ctx.next_position, ctx.context_tokens)


def compare(store: BankStore, ss: SessionStore, index: int, episode: Episode, max_new_tokens: int) -> list[Record]:
    """Every variant on every subquestion of one episode, after the whole trajectory."""
    runner = store.runner
    sid = f"e{index}"
    ss.create(BANK, sid)
    for step in [[episode.segments[0]], *episode.steps]:
        ss.append(BANK, sid, step)
    trajectory = [t for seg in episode.segments
                  for t in runner.tokenize(render_segment(seg["role"], seg["text"], seg.get("agent")))]
    # The text replay: prefill the trajectory after the cached prefix, once, timed; each worker call pays it.
    text_ctx = runner.text_context()
    t0 = time.perf_counter()
    with store.model_lock:
        runner.extend(text_ctx, trajectory)
    trajectory_ms = (time.perf_counter() - t0) * 1000
    records = []
    for question, _ in episode.questions:
        q_ids = runner.question_ids(question.text)
        forced = q_ids + runner.tokenize(question.answers[0])
        reference = _logprobs(store, _copy(text_ctx), forced)
        gen = runner.generate(_copy(text_ctx), q_ids, max_new_tokens)
        records.append(Record("text", index, question.qid, squad_scores(gen.text, question.answers)[1], 0.0,
                              len(trajectory) + len(q_ids), 0.0, trajectory_ms + gen.prefill_ms, gen.text))
        session_tokens = ss.get(BANK, sid, with_text=False).tokens
        for name, knobs in [("kv", {}), *BRIEFS.items()]:
            tau = knobs.get("tau")
            budget = round(knobs["share"] * session_tokens) if "share" in knobs else None
            ctx, _, kept = ss.briefing_context(BANK, sid, question.text, tau=tau, budget_tokens=budget)
            kl = kl_per_token(reference, _logprobs(store, ctx, forced))
            result = ss.brief(BANK, sid, question.text, tau=tau, budget_tokens=budget, max_new_tokens=max_new_tokens)
            records.append(Record(name, index, question.qid, squad_scores(result.answer, question.answers)[1], kl,
                                  result.kept_tokens + len(q_ids), result.compaction_ms, result.timings.ttft_ms,
                                  result.answer))
        records.append(_retrieval(store, index, question, reference, forced, max_new_tokens))
    return records


def _retrieval(store: BankStore, index: int, question: Question, reference: torch.Tensor, forced: list[int],
               max_new_tokens: int) -> Record:
    """Plain kv retrieval of the top-k paragraphs (no trajectory at all)."""
    result = store.query(BANK, question.text, k=RETRIEVAL_K, mode="kv", max_new_tokens=max_new_tokens,
                         recompute=0.0)
    with store.session() as s:
        bank = store._bank(s, BANK)
        rows = {r.id: r for r in s.query(BlockRow).filter(BlockRow.id.in_([h.block_id for h in result.sources]))}
        blocks = [store.load_block(s, bank, rows[h.block_id]) for h in result.sources]
    kl = kl_per_token(reference, _logprobs(store, store.runner.assemble(blocks), forced))
    return Record("retrieval", index, question.qid, squad_scores(result.answer, question.answers)[1], kl,
                  result.usage.context_tokens + result.usage.question_tokens, 0.0, result.timings.ttft_ms,
                  result.answer)


def prune_run(ss: SessionStore, index: int, episode: Episode, max_new_tokens: int) -> PruneRun:
    """Replay the episode asking each subquestion when its passage arrives; prune by attention after each step."""
    keep, prune = f"keep{index}", f"prune{index}"
    run = PruneRun(episode=index)
    for sid in (keep, prune):
        ss.create(BANK, sid)
        ss.append(BANK, sid, [episode.segments[0]])
    for step, segments in enumerate(episode.steps):
        due = [q for q, at in episode.questions if at == step]
        for sid, f1s in ((keep, run.f1_keep), (prune, run.f1_prune)):
            live = ss.append(BANK, sid, segments).tokens
            if sid == keep:
                run.peak_keep = max(run.peak_keep, live)
            else:
                run.peak_prune = max(run.peak_prune, live)
            for q in due:
                answer = ss.brief(BANK, sid, q.text, max_new_tokens=max_new_tokens).answer
                f1s.append(squad_scores(answer, q.answers)[1])
        run.pruned_segments += len(ss.prune(BANK, prune, policy="attention").pruned)
    return run


def summarise(records: Sequence[Record], runs: Sequence[PruneRun]) -> dict[str, Any]:
    by_variant = {v: [r for r in records if r.variant == v] for v in VARIANTS}
    text_tokens = statistics.mean(r.worker_tokens for r in by_variant["text"])
    text_ttft = statistics.median(r.ttft_ms for r in by_variant["text"])
    rows = []
    for variant, rs in by_variant.items():
        rows.append({
            "variant": variant, "f1": statistics.mean(r.f1 for r in rs), "kl_mean": statistics.mean(r.kl for r in rs),
            "worker_tokens": statistics.mean(r.worker_tokens for r in rs),
            "token_share": statistics.mean(r.worker_tokens for r in rs) / text_tokens,
            "compaction_ms": statistics.median(r.compaction_ms for r in rs),
            "ttft_ms_median": statistics.median(r.ttft_ms for r in rs),
            "speedup_vs_text": text_ttft / statistics.median(r.ttft_ms for r in rs),
        })
    f1_keep = statistics.mean(f for r in runs for f in r.f1_keep)
    f1_prune = statistics.mean(f for r in runs for f in r.f1_prune)
    peak_keep = statistics.mean(r.peak_keep for r in runs)
    peak_prune = statistics.mean(r.peak_prune for r in runs)
    prune = {"peak_tokens_keep": peak_keep, "peak_tokens_prune": peak_prune, "peak_cut": 1 - peak_prune / peak_keep,
             "f1_keep": f1_keep, "f1_prune": f1_prune, "f1_loss_points": 100 * (f1_keep - f1_prune),
             "pruned_segments": sum(r.pruned_segments for r in runs)}
    kv = next(r for r in rows if r["variant"] == "kv")
    briefs = [r for r in rows if r["variant"].startswith("brief")]
    ok = [r for r in briefs if r["f1"] >= 0.95 * kv["f1"] and r["token_share"] <= 0.40]
    goals = {
        "brief_f1_95pct_at_40pct_tokens": {"met": bool(ok), "variants": [r["variant"] for r in ok]},
        "prune_peak_cut_50pct_f1_loss_2pts": {"met": prune["peak_cut"] >= 0.5 and prune["f1_loss_points"] <= 2.0},
        "worker_ttft_5x_vs_text": {"met": min(r["speedup_vs_text"] for r in briefs) >= 5.0,
                                   "min_speedup": min(r["speedup_vs_text"] for r in briefs)},
    }
    return {"rows": rows, "prune": prune, "goals": goals}


def plot(summary: dict[str, Any]) -> Figure:
    fig = Figure(figsize=(11, 4))
    ax1, ax2 = fig.subplots(1, 2)
    rows = summary["rows"]
    for r in rows:
        ax1.scatter(r["token_share"], r["f1"], s=40)
        ax1.annotate(r["variant"], (r["token_share"], r["f1"]), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax1.set_xlabel("worker context tokens / full trajectory")
    ax1.set_ylabel("SQuAD F1")
    ax1.set_title("Worker F1 vs tokens handed over")
    names = [r["variant"] for r in rows]
    ax2.bar(names, [r["ttft_ms_median"] for r in rows])
    ax2.set_yscale("log")
    ax2.set_ylabel("TTFT p50 ms (log)")
    ax2.set_title("Worker time to first token")
    ax2.tick_params(axis="x", rotation=40, labelsize=8)
    fig.tight_layout()
    return fig


def run_prune_only(args: argparse.Namespace) -> dict[str, Any]:
    """Only the prune row, measured again; the worker-call rows are kept from bench/results/sessions.json."""
    previous = json.loads((RESULTS_DIR / "sessions.json").read_text())
    squad = load_or_exit(args.data)
    episodes = build_episodes(squad, previous["episodes"], previous["relevant_per_episode"],
                              previous["distractors_per_episode"], args.per_paragraph)
    per_episode = -(-previous["questions"] // len(episodes))
    for e in episodes:
        e.questions = e.questions[:per_episode]
    with tempfile.TemporaryDirectory(prefix="kvrag-bench-sessions-") as tmp:
        store = open_store(Path(tmp), torch_threads=args.threads)
        store.create_bank(BANK)
        ss = sessions_of(store)
        runs = [prune_run(ss, i, e, previous["max_new_tokens"]) for i, e in enumerate(tqdm(episodes, desc="prune"))]
        machine = machine_info(store.llm.name)
        store.close()
    records = [Record(**r) for r in previous["records"]]
    return {**previous, **summarise(records, runs), "prune_runs": [r.__dict__ for r in runs], "prune_machine": machine}


def run(args: argparse.Namespace) -> dict[str, Any]:
    squad = load_or_exit(args.data)
    episodes = build_episodes(squad, args.episodes, args.relevant, args.distractors, args.per_paragraph)
    per_episode = -(-args.questions // len(episodes))
    for e in episodes:
        e.questions = e.questions[:per_episode]
    with tempfile.TemporaryDirectory(prefix="kvrag-bench-sessions-") as tmp:
        store = open_store(Path(tmp), torch_threads=args.threads)
        ingest(store, squad.paragraphs)
        ss = sessions_of(store)
        records: list[Record] = []
        for i, episode in enumerate(tqdm(episodes, desc="episodes", unit="ep")):
            records += compare(store, ss, i, episode, args.max_new_tokens)
        runs = [prune_run(ss, i, e, args.max_new_tokens) for i, e in enumerate(tqdm(episodes, desc="prune"))]
        machine = machine_info(store.llm.name)
        store.close()
    trajectory_tokens = statistics.mean(r.worker_tokens for r in records if r.variant == "text")
    return {
        "benchmark": "sessions", "data": str(args.data), "questions": sum(len(e.questions) for e in episodes),
        "episodes": len(episodes), "relevant_per_episode": args.relevant, "distractors_per_episode": args.distractors,
        "max_new_tokens": args.max_new_tokens, "mean_text_worker_tokens": trajectory_tokens, "machine": machine,
        **summarise(records, runs),
        "records": [r.__dict__ for r in records], "prune_runs": [r.__dict__ for r in runs],
    }


TABLE_HEADERS = ("variant", "F1", "KL mean", "worker tokens", "share of text", "compaction ms p50", "TTFT p50 ms",
                 "text/variant")


def table_rows(result: dict[str, Any]) -> list[list[Any]]:
    rows = [[r["variant"], r["f1"], r["kl_mean"], int(r["worker_tokens"]), r["token_share"], r["compaction_ms"],
             r["ttft_ms_median"], f"{r['speedup_vs_text']:.1f}x"] for r in result["rows"]]
    p = result["prune"]
    rows.append(["prune (attention): peak tokens", f"{p['f1_prune']:.3f} vs {p['f1_keep']:.3f}", "",
                 f"{p['peak_tokens_prune']:.0f} vs {p['peak_tokens_keep']:.0f}", 1 - p["peak_cut"], "", "", ""])
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.sessions",
        description="Sessions on SQuAD: workers briefed from an orchestrator trajectory (text replay, full KV, "
                    "attention-compacted briefs, plain retrieval) and attention pruning. Writes "
                    "bench/results/sessions.{json,png}.")
    add_data_args(parser, default_questions=24)
    parser.add_argument("--episodes", type=int, default=4, help="orchestrator trajectories (default: 4)")
    parser.add_argument("--relevant", type=int, default=3, help="answer paragraphs per trajectory (default: 3)")
    parser.add_argument("--distractors", type=int, default=3, help="distractor paragraphs per trajectory (default: 3)")
    parser.add_argument("--per-paragraph", type=int, default=2, help="subquestions per answer paragraph (default: 2)")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="greedy answer length cap (default: 16)")
    parser.add_argument("--prune-only", action="store_true",
                        help="measure only the prune row again, keeping the other rows of bench/results/sessions.json")
    args = parser.parse_args(argv)
    result = run_prune_only(args) if args.prune_only else run(args)
    print_table(f"sessions: {result['questions']} worker subquestions over {result['episodes']} trajectories",
                TABLE_HEADERS, table_rows(result))
    print("goals:", result["goals"])
    print(f"wrote {write_json('sessions', result)} and {save_figure(plot(result), 'sessions')}")
    markdown = doc_markdown(result, TABLE_HEADERS, table_rows(result))
    publish_doc_table("sessions", markdown)


if __name__ == "__main__":
    main()
