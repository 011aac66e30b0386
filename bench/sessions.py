"""Agent sessions on SQuAD: an orchestrator's trajectory handed to workers (Latent Briefing), pruned (SideQuest).

Each *episode* is an orchestrator trajectory built from the SQuAD excerpt: a goal, then steps of one
search result (a paragraph, as a tool output) and a short note each; some results hold the answers to
the workers' subquestions, the others are distractor paragraphs of the same article. Per worker call
(subquestion, asked after the whole trajectory) the variants are:

- ``text``: the whole trajectory replayed as text after the cached system prefix (the reference:
  TTFT is the measured prefill of the trajectory plus the question's);
- ``kv``: the whole trajectory's stored KV (a brief with no compaction);
- ``brief@...``: briefs compacted by the task's attention (``tau`` or a budget share of the tokens; whole
  segments by attention density, then chunks, the default selection, or ``/tokens``: the best tokens);
- ``retrieval``: plain kv retrieval of the top-2 paragraphs from a bank holding the whole excerpt.

Reported: SQuAD F1 (and, for each variant against ``kv`` on the same subquestions, the mean F1 difference
with a paired bootstrap 95% interval), KL(text || variant) over question + gold answer tokens, the mean
NLL of the gold answer's tokens (steadier than F1 when a small model answers few subquestions), the
context tokens the worker got, compaction ms and TTFT.

Prune: the peak session tokens are the most live KV tokens the session ever holds, so pruning has to
happen while the trajectory grows. Each episode is replayed step by step: the orchestrator appends a
search result and its note, then delegates the worker calls due at that step (full-KV briefs): the first
subquestion of an answer paragraph when it arrives, the next ones ``--lag`` steps later (so a passage
must outlive the step it arrived in), and on a step with no subquestion due one unscored call that reads
the new result. After the step's calls the orchestrator prunes. Settings: ``attention@<t>`` drops
segments whose mean attention share over their recent briefs is below ``t`` times an even share;
``model`` asks the loaded model (an auxiliary call, strict JSON) which segments the goal and the still
open subquestions need. Each setting runs beside an unpruned twin asking the same scored subquestions;
reported are peak live tokens and F1 of both, segments pruned and, for ``model``, how often the judge's
reply parsed.
Writes bench/results/sessions.json and sessions.png.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import re
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
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
    markdown_table,
    open_store,
    print_table,
    publish_doc_table,
    save_figure,
    squad_scores,
    write_json,
)
from kvstore.bank import BankStore
from kvstore.sessions.append import render_segment
from kvstore.sessions.service import SessionStore
from kvstore.storage.catalog import BlockRow
from kvstore.types import Context

GOAL = ("Goal: answer the team's questions about the Normans. Plan: search the archive, read each result, "
        "and note what matters for the questions.")
# name -> {"tau": ...} or {"share": budget as a share of the tokens}, and the selection when not the default
BRIEFS: dict[str, dict[str, Any]] = {
    "brief@tau=0": {"tau": 0.0}, "brief@tau=1": {"tau": 1.0}, "brief@40%": {"share": 0.40},
    "brief@35%": {"share": 0.35}, "brief@30%": {"share": 0.30}, "brief@25%": {"share": 0.25},
    "brief@40%/tokens": {"share": 0.40, "selection": "tokens"},
    "brief@30%/tokens": {"share": 0.30, "selection": "tokens"},
}
VARIANTS = ("text", "kv", *BRIEFS, "retrieval")
RETRIEVAL_K = 2
BOOTSTRAP_RESAMPLES = 2000
PRUNES: dict[str, dict[str, Any]] = {  # name -> SessionStore.prune keyword arguments
    "attention@0.25": {"policy": "attention", "threshold": 0.25},
    "attention@0.5": {"policy": "attention", "threshold": 0.5},
    "attention@1.0": {"policy": "attention", "threshold": 1.0},
    "attention@2.0": {"policy": "attention", "threshold": 2.0},
    "attention@1.5": {"policy": "attention", "threshold": 1.5},
    "attention@1.0/w2": {"policy": "attention", "threshold": 1.0, "window": 2},
    "attention@1.5/w2": {"policy": "attention", "threshold": 1.5, "window": 2},
    "model": {"policy": "model"},
}


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
    nll: float | None = None  # mean NLL of the gold answer's tokens (None in results from before it was recorded)
    trajectory_share: float | None = None  # trajectory tokens the worker got / the session's (None: retrieval)


@dataclass
class PruneRun:
    """One episode replayed under one prune setting (``keep``: never pruned)."""

    setting: str
    episode: int
    peak_tokens: int = 0
    final_tokens: int = 0
    f1: list[float] = field(default_factory=list)
    pruned_segments: int = 0
    prunes: int = 0
    judge_errors: list[str] = field(default_factory=list)
    judge_ms: list[float] = field(default_factory=list)


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


def gold_nll(logprobs: torch.Tensor, question_tokens: int, answer_ids: Sequence[int]) -> float:
    """Mean NLL per gold-answer token from ``logprobs: [question + answer tokens, vocab]`` of the forced
    question and answer: answer token i is predicted at input ``question_tokens - 1 + i``."""
    targets = torch.tensor(list(answer_ids), device=logprobs.device)
    start = question_tokens - 1
    return float(-logprobs[start:start + len(targets)].gather(1, targets[:, None]).mean())


def _copy(ctx: Context) -> Context:
    with torch.inference_mode():
        return replace(ctx, cache=copy.deepcopy(ctx.cache))


def compare(store: BankStore, ss: SessionStore, index: int, episode: Episode, max_new_tokens: int,
            variants: Sequence[str] = VARIANTS) -> list[Record]:
    """The variants (``text`` always: it is the KL reference) on every subquestion of one episode, after the
    whole trajectory."""
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
        answer_ids = runner.tokenize(question.answers[0])
        forced = q_ids + answer_ids
        reference = _logprobs(store, _copy(text_ctx), forced)
        gen = runner.generate(_copy(text_ctx), q_ids, max_new_tokens)
        records.append(Record("text", index, question.qid, squad_scores(gen.text, question.answers)[1], 0.0,
                              len(trajectory) + len(q_ids), 0.0, trajectory_ms + gen.prefill_ms, gen.text,
                              gold_nll(reference, len(q_ids), answer_ids), 1.0))
        session_tokens = ss.get(BANK, sid, with_text=False).tokens
        for name, knobs in [("kv", {}), *BRIEFS.items()]:
            if name not in variants:
                continue
            tau, selection = knobs.get("tau"), knobs.get("selection", "segments")
            budget = int(knobs["share"] * session_tokens) if "share" in knobs else None  # floor: never over
            ctx, _, kept = ss.briefing_context(BANK, sid, question.text, tau=tau, budget_tokens=budget,
                                               selection=selection)
            logprobs = _logprobs(store, ctx, forced)
            result = ss.brief(BANK, sid, question.text, tau=tau, budget_tokens=budget, selection=selection,
                              max_new_tokens=max_new_tokens)
            records.append(Record(name, index, question.qid, squad_scores(result.answer, question.answers)[1],
                                  kl_per_token(reference, logprobs), result.kept_tokens + len(q_ids),
                                  result.compaction_ms, result.timings.ttft_ms, result.answer,
                                  gold_nll(logprobs, len(q_ids), answer_ids),
                                  result.kept_tokens / result.session_tokens))
        if "retrieval" in variants:
            records.append(_retrieval(store, index, question, reference, forced, len(q_ids), max_new_tokens))
    return records


def _retrieval(store: BankStore, index: int, question: Question, reference: torch.Tensor, forced: list[int],
               question_tokens: int, max_new_tokens: int) -> Record:
    """Plain kv retrieval of the top-k paragraphs (no trajectory at all)."""
    result = store.query(BANK, question.text, k=RETRIEVAL_K, mode="kv", max_new_tokens=max_new_tokens,
                         recompute=0.0)
    with store.session() as s:
        bank = store.bank_row(s, BANK)
        rows = {r.id: r for r in s.query(BlockRow).filter(BlockRow.id.in_([h.block_id for h in result.sources]))}
        blocks = [store.load_block(s, bank, rows[h.block_id]) for h in result.sources]
    logprobs = _logprobs(store, store.runner.assemble(blocks), forced)
    return Record("retrieval", index, question.qid, squad_scores(result.answer, question.answers)[1],
                  kl_per_token(reference, logprobs), result.usage.context_tokens + result.usage.question_tokens,
                  0.0, result.timings.ttft_ms, result.answer,
                  gold_nll(logprobs, question_tokens, forced[question_tokens:]))


def schedule(episode: Episode, lag: int) -> dict[int, list[Question]]:
    """Step -> the subquestions delegated after it: a paragraph's first when it arrives, the others ``lag``
    steps later (at the last step when that is past the end)."""
    last = len(episode.steps) - 1
    due: dict[int, list[Question]] = {}
    seen: set[int] = set()
    for question, step in episode.questions:
        at = step if step not in seen else min(step + lag, last)
        seen.add(step)
        due.setdefault(at, []).append(question)
    return due


def prune_run(ss: SessionStore, index: int, episode: Episode, setting: str, lag: int, max_new_tokens: int
              ) -> PruneRun:
    """Replay the episode step by step: append, the step's worker calls, then prune with ``setting``
    (``keep``: no prune); the peak is the most live tokens right after an append."""
    sid = f"{re.sub(r'[^A-Za-z0-9._-]', '-', setting)}-{index}"
    run = PruneRun(setting=setting, episode=index)
    due = schedule(episode, lag)
    asked: set[str] = set()
    ss.create(BANK, sid)
    ss.append(BANK, sid, [episode.segments[0]])
    for step, segments in enumerate(episode.steps):
        run.peak_tokens = max(run.peak_tokens, ss.append(BANK, sid, segments).tokens)
        for q in due.get(step, []):
            answer = ss.brief(BANK, sid, q.text, max_new_tokens=max_new_tokens).answer
            run.f1.append(squad_scores(answer, q.answers)[1])
            asked.add(q.qid)
        if setting == "keep":
            continue
        knobs = PRUNES[setting]
        if knobs["policy"] == "attention" and not due.get(step):
            # Every tool result goes to some worker; this call is unscored, only its attention is recorded.
            ss.brief(BANK, sid, f"What does search result {step + 1} say?", max_new_tokens=1)
        open_questions = [q.text for q, _ in episode.questions if q.qid not in asked]
        goal = GOAL + (" Questions still open: " + " ".join(open_questions) if open_questions else "")
        result = ss.prune(BANK, sid, goal=goal, **knobs)
        run.prunes += 1
        run.pruned_segments += len(result.pruned)
        if knobs["policy"] == "model":
            run.judge_ms.append(result.judge_ms)
            if result.error:
                run.judge_errors.append(result.error)
    run.final_tokens = ss.get(BANK, sid, with_text=False).tokens
    return run


def prune_runs(ss: SessionStore, episodes: Sequence[Episode], settings: Sequence[str], lag: int,
               max_new_tokens: int) -> list[PruneRun]:
    """Every episode unpruned (``keep``) and under every prune setting."""
    return [prune_run(ss, i, e, setting, lag, max_new_tokens)
            for i, e in enumerate(tqdm(episodes, desc="prune", unit="ep")) for setting in ("keep", *settings)]


def summarise_prune(runs: Sequence[PruneRun]) -> dict[str, dict[str, Any]]:
    """Per prune setting: mean peak tokens and F1 beside the unpruned twin's, and what the prunes did."""
    keep = [r for r in runs if r.setting == "keep"]
    if not keep:
        return {}
    peak_keep = statistics.mean(r.peak_tokens for r in keep)
    f1_keep = statistics.mean(f for r in keep for f in r.f1)
    out: dict[str, dict[str, Any]] = {}
    for setting in dict.fromkeys(r.setting for r in runs if r.setting != "keep"):
        rs = [r for r in runs if r.setting == setting]
        peak = statistics.mean(r.peak_tokens for r in rs)
        f1 = statistics.mean(f for r in rs for f in r.f1)
        errors = [e for r in rs for e in r.judge_errors]
        out[setting] = {
            "peak_tokens_keep": peak_keep, "peak_tokens_prune": peak, "peak_cut": 1 - peak / peak_keep,
            "final_tokens_keep": statistics.mean(r.final_tokens for r in keep),
            "final_tokens_prune": statistics.mean(r.final_tokens for r in rs),
            "f1_keep": f1_keep, "f1_prune": f1, "f1_loss_points": 100 * (f1_keep - f1),
            "pruned_segments": sum(r.pruned_segments for r in rs), "prunes": sum(r.prunes for r in rs),
            "judge_errors": len(errors), "judge_error_examples": sorted(set(errors))[:5],
            "judge_ms_median": statistics.median(ms) if (ms := [m for r in rs for m in r.judge_ms]) else None,
            "goal_met": 1 - peak / peak_keep >= 0.5 and 100 * (f1_keep - f1) <= 2.0,
        }
    return out


def paired_difference(records: Sequence[Record], variant: str, baseline: str = "kv",
                      resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> tuple[float, float, float] | None:
    """Mean F1 of ``variant`` minus ``baseline`` over the subquestions both answered, with a paired
    bootstrap 95% interval (subquestions resampled with replacement): (mean, low, high), or None when
    they share no subquestion."""
    base = {(r.episode, r.qid): r.f1 for r in records if r.variant == baseline}
    diffs = [r.f1 - base[(r.episode, r.qid)] for r in records if r.variant == variant and (r.episode, r.qid) in base]
    if not diffs:
        return None
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(diffs, k=len(diffs))) for _ in range(resamples))
    return statistics.fmean(diffs), means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]


def summarise(records: Sequence[Record], runs: Sequence[PruneRun]) -> dict[str, Any]:
    by_variant = {v: rs for v in VARIANTS if (rs := [r for r in records if r.variant == v])}
    text_tokens = statistics.mean(r.worker_tokens for r in by_variant["text"])
    text_ttft = statistics.median(r.ttft_ms for r in by_variant["text"])
    rows: list[dict[str, Any]] = []
    for variant, rs in by_variant.items():
        nlls = [r.nll for r in rs if r.nll is not None]
        shares = [r.trajectory_share for r in rs if r.trajectory_share is not None]
        diff = paired_difference(records, variant) if variant != "kv" else None
        rows.append({
            "variant": variant, "f1": statistics.mean(r.f1 for r in rs), "kl_mean": statistics.mean(r.kl for r in rs),
            "gold_nll": statistics.mean(nlls) if nlls else None,
            "f1_minus_kv": list(diff) if diff is not None else None,
            "worker_tokens": statistics.mean(r.worker_tokens for r in rs),
            "token_share": statistics.mean(r.worker_tokens for r in rs) / text_tokens,
            "trajectory_share": statistics.mean(shares) if shares else None,
            "compaction_ms": statistics.median(r.compaction_ms for r in rs),
            "ttft_ms_median": statistics.median(r.ttft_ms for r in rs),
            "speedup_vs_text": text_ttft / statistics.median(r.ttft_ms for r in rs),
        })
    prune = summarise_prune(runs)
    kv_f1 = next((r["f1"] for r in rows if r["variant"] == "kv"), None)
    briefs = [r for r in rows if r["variant"].startswith("brief")]
    # The goal counts trajectory tokens: the task's own tokens, which every variant adds, are not handed over.
    ok = [r for r in briefs if kv_f1 is not None and r["f1"] >= 0.95 * kv_f1
          and (r.get("trajectory_share") or r["token_share"]) <= 0.40]
    min_speedup = min((r["speedup_vs_text"] for r in briefs), default=None)
    goals = {
        "brief_f1_95pct_at_40pct_tokens": {"met": bool(ok), "variants": [r["variant"] for r in ok]},
        "prune_peak_cut_50pct_f1_loss_2pts": {"met": any(p["goal_met"] for p in prune.values()),
                                              "settings": [k for k, p in prune.items() if p["goal_met"]]},
        "worker_ttft_5x_vs_text": {"met": min_speedup is not None and min_speedup >= 5.0,
                                   "min_speedup": min_speedup},
    }
    return {"rows": rows, "prune": prune, "goals": goals}


def plot(summary: dict[str, Any]) -> Figure:
    fig = Figure(figsize=(16, 4))
    ax1, ax2, ax3 = fig.subplots(1, 3)
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
    for name, p in summary["prune"].items():
        ax3.scatter(100 * p["peak_cut"], p["f1_loss_points"], s=40)
        ax3.annotate(name, (100 * p["peak_cut"], p["f1_loss_points"]), fontsize=8, xytext=(4, 4),
                     textcoords="offset points")
    ax3.axvline(50, color="grey", linestyle=":")
    ax3.axhline(2, color="grey", linestyle=":")
    ax3.set_xlabel("peak session tokens cut, %")
    ax3.set_ylabel("F1 loss vs unpruned, points")
    ax3.set_title("Prune during the trajectory (goal: right of and below the lines)")
    fig.tight_layout()
    return fig


def _episodes(squad: Squad, args: argparse.Namespace, count: int) -> list[Episode]:
    """``count`` episodes (the first ones are the same whatever the count), their subquestions capped."""
    episodes = build_episodes(squad, count, args.relevant, args.distractors, args.per_paragraph)
    per_episode = -(-args.questions // args.episodes)
    for e in episodes:
        e.questions = e.questions[:per_episode]
    return episodes


def _prune_result(args: argparse.Namespace, runs: Sequence[PruneRun]) -> dict[str, Any]:
    return {"prune_episodes": args.prune_episodes if runs else 0, "lag": args.lag,
            "prune_questions": sum(len(r.f1) for r in runs if r.setting == "keep"),
            "prune_runs": [r.__dict__ for r in runs]}


def run_prune_only(args: argparse.Namespace) -> dict[str, Any]:
    """Only the given prune settings, measured again; the worker-call rows and the other settings' prune rows
    are kept from bench/results/sessions.json (read once the prune is measured, so a full run with
    ``--prune-episodes 0`` may still be writing it)."""
    episodes = _episodes(load_or_exit(args.data), args, args.prune_episodes)
    with tempfile.TemporaryDirectory(prefix="kvrag-bench-sessions-") as tmp:
        store = open_store(Path(tmp), torch_threads=args.threads)
        store.create_bank(BANK)
        runs = prune_runs(store.agent_sessions, episodes, args.prune_settings, args.lag, args.max_new_tokens)
        machine = machine_info(store.llm.name)
        store.close()
    previous = json.loads((RESULTS_DIR / "sessions.json").read_text())
    records = [Record(**r) for r in previous["records"]]
    rerun = {*args.prune_settings, "keep"}
    runs = [*(PruneRun(**r) for r in previous.get("prune_runs", []) if r["setting"] not in rerun), *runs]
    return {**previous, **summarise(records, runs), **_prune_result(args, runs), "prune_machine": machine}


def run(args: argparse.Namespace) -> dict[str, Any]:
    squad = load_or_exit(args.data)
    episodes = _episodes(squad, args, args.episodes)
    variants = ("text", *args.variants)
    with tempfile.TemporaryDirectory(prefix="kvrag-bench-sessions-") as tmp:
        store = open_store(Path(tmp), torch_threads=args.threads)
        if "retrieval" in variants:
            ingest(store, squad.paragraphs)
        else:
            store.create_bank(BANK)
        ss = store.agent_sessions
        records: list[Record] = []
        for i, episode in enumerate(tqdm(episodes, desc="episodes", unit="ep")):
            records += compare(store, ss, i, episode, args.max_new_tokens, variants)
        runs = prune_runs(ss, _episodes(squad, args, args.prune_episodes), args.prune_settings, args.lag,
                          args.max_new_tokens) if args.prune_episodes and not args.keep_prune else []
        machine = machine_info(store.llm.name)
        store.close()
    trajectory_tokens = statistics.mean(r.worker_tokens for r in records if r.variant == "text")
    prune: dict[str, Any] = _prune_result(args, runs)
    if args.keep_prune:
        previous = json.loads((RESULTS_DIR / "sessions.json").read_text())
        runs = [PruneRun(**r) for r in previous["prune_runs"]]
        prune = {k: previous[k] for k in ("prune_episodes", "lag", "prune_questions", "prune_runs")}
        prune["prune_machine"] = previous.get("prune_machine", previous["machine"])
    return {
        "benchmark": "sessions", "data": str(args.data), "questions": sum(len(e.questions) for e in episodes),
        "episodes": len(episodes), "relevant_per_episode": args.relevant, "distractors_per_episode": args.distractors,
        "per_paragraph": args.per_paragraph, "max_new_tokens": args.max_new_tokens,
        "mean_text_worker_tokens": trajectory_tokens, "machine": machine,
        **summarise(records, runs), **prune, "records": [r.__dict__ for r in records],
    }


TABLE_HEADERS = ("variant", "F1", "F1 - kv [95% CI]", "gold NLL", "KL mean", "worker tokens", "share of text",
                 "trajectory kept", "compaction ms p50", "TTFT p50 ms", "text/variant")
PRUNE_HEADERS = ("prune setting", "peak tokens (unpruned)", "peak cut", "final tokens (unpruned)", "F1 (unpruned)",
                 "F1 loss, points", "segments pruned", "judge replies unusable", "judge ms p50", "goal met")


def _difference_cell(diff: Sequence[float] | None) -> str:
    return f"{diff[0]:+.3f} [{diff[1]:+.3f}, {diff[2]:+.3f}]" if diff else ""


def table_rows(result: dict[str, Any]) -> list[list[Any]]:
    return [[r["variant"], r["f1"], _difference_cell(r.get("f1_minus_kv")),
             r["gold_nll"] if r.get("gold_nll") is not None else "", r["kl_mean"], int(r["worker_tokens"]),
             r["token_share"], r["trajectory_share"] if r.get("trajectory_share") is not None else "",
             r["compaction_ms"], r["ttft_ms_median"], f"{r['speedup_vs_text']:.1f}x"]
            for r in result["rows"]]


def prune_rows(result: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for name, p in result["prune"].items():
        judge_ms = p["judge_ms_median"]
        rows.append([name, f"{p['peak_tokens_prune']:.0f} ({p['peak_tokens_keep']:.0f})", f"{100 * p['peak_cut']:.1f}%",
                     f"{p['final_tokens_prune']:.0f} ({p['final_tokens_keep']:.0f})",
                     f"{p['f1_prune']:.3f} ({p['f1_keep']:.3f})", f"{p['f1_loss_points']:.1f}", p["pruned_segments"],
                     f"{p['judge_errors']}/{p['prunes']}" if name == "model" else "",
                     f"{judge_ms:.0f}" if judge_ms is not None else "", "yes" if p["goal_met"] else "no"])
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
    parser.add_argument("--prune-episodes", type=int, default=4,
                        help="trajectories replayed for the prune settings (default: 4, the compared ones; more "
                             "add new trajectories; 0 skips the prune, for a later --prune-only run)")
    parser.add_argument("--lag", type=int, default=1,
                        help="steps between an answer paragraph's arrival and its later subquestions (default: 1)")
    parser.add_argument("--prune-settings", nargs="+", default=list(PRUNES), choices=list(PRUNES),
                        help=f"prune settings to replay (default: all of {', '.join(PRUNES)})")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS[1:]), choices=list(VARIANTS[1:]),
                        help="worker-call variants besides text, the KL reference that always runs (default: all; "
                             "the F1 differences need kv)")
    parser.add_argument("--keep-prune", action="store_true",
                        help="measure only the worker calls again, keeping the prune rows of "
                             "bench/results/sessions.json (the converse of --prune-only)")
    parser.add_argument("--prune-only", action="store_true",
                        help="measure only the prune settings again, keeping the other rows of "
                             "bench/results/sessions.json")
    args = parser.parse_args(argv)
    result = run_prune_only(args) if args.prune_only else run(args)
    print_table(f"sessions: {result['questions']} worker subquestions over {result['episodes']} trajectories",
                TABLE_HEADERS, table_rows(result))
    markdown = doc_markdown(result, TABLE_HEADERS, table_rows(result))
    if result["prune"]:
        print_table(f"prune: {result['prune_questions']} subquestions over {result['prune_episodes']} trajectories, "
                    f"lag {result['lag']}", PRUNE_HEADERS, prune_rows(result))
        m = result.get("prune_machine", result["machine"])
        markdown += (f"\n\nPrune: {result['prune_questions']} scored subquestions over {result['prune_episodes']} "
                     f"trajectories, later subquestions {result['lag']} step(s) after their passage; the unpruned "
                     f"twin in parentheses; load average {m['load_average'][0]:.1f} at the end, commit "
                     f"{m['git_commit']}, {m['measured_at']}.\n\n" + markdown_table(PRUNE_HEADERS, prune_rows(result)))
    print("goals:", result["goals"])
    print(f"wrote {write_json('sessions', result)} and {save_figure(plot(result), 'sessions')}")
    publish_doc_table("sessions", markdown)


if __name__ == "__main__":
    main()
