"""Fidelity of kv mode against text mode on SQuAD: the quality harness of issue 7.

For each answerable question the top-k blocks are retrieved once (top-1 and top-3 are prefixes of
top-5, so every k and every variant sees the same blocks). A *variant* builds the KV context the
question is asked after; the harness then, on copies of that context,

- generates a greedy answer (``--max-new-tokens``, default 24) -> SQuAD EM/F1, agreement with text,
- teacher-forces ``question + gold answer`` -> next-token log-probabilities at every one of those
  positions: mean KL(text || variant) over them, and the gold answer's mean NLL per token,

and times retrieval + building the context + the question's prefill up to the first token (TTFT).
Every variant is compared with ``text`` (an exact prefill of the same block tokens after the cached
prefix), so KL is 0 for text by definition, ~1e-5 for one lossless block, and larger where blocks
that never attended to each other are concatenated.

Variants live in ``VARIANTS`` (name -> function); recompute and compaction variants go there.
Writes bench/results/quality.json and quality.png.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator
from sqlalchemy.orm import Session
from tqdm import tqdm

from bench.squad import (
    BANK,
    Question,
    add_data_args,
    bootstrap_ci,
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
from kvstore.bank import BankStore
from kvstore.model.compaction import CompactionSpec, compact
from kvstore.model.recompute import blend, blend_and_ask
from kvstore.storage.catalog import BankRow, BlockRow
from kvstore.storage.token_ids import bytes_to_ids
from kvstore.types import Context

REFERENCE = "text"


@dataclass
class Env:
    """What a variant may use: the store (runner, hot tier, blobs) and an open catalog session."""

    store: BankStore
    session: Session
    bank: BankRow


@dataclass
class Case:
    """One question at one k: the retrieved blocks (best first) and the token ids both paths use."""

    question: Question
    k: int
    blocks: list[BlockRow]
    block_ids: list[list[int]]
    question_ids: list[int]
    answer_ids: list[int]
    retrieve_ms: float
    gold_retrieved: bool


@dataclass
class Prefilled:
    """A context whose variant prefilled the question itself, as a server answering would (text mode with the
    blocks, recompute with its passes): ``ctx``'s cache ends with the question's rows, ``logits: [vocab]`` predict
    the first answer token."""

    ctx: Context
    logits: torch.Tensor


# A variant returns the context (prefix + whatever stands for the k blocks) the question follows, or that context
# with the question already prefilled.
Variant = Callable[[Env, Case], Context | Prefilled]


def text_variant(env: Env, case: Case) -> Prefilled:
    """The baseline: the blocks' tokens and the question prefilled in one pass after the cached prefix (text mode)."""
    runner = env.store.runner
    ctx = runner.text_context()
    flat = [tok for ids in case.block_ids for tok in ids]
    logits = runner.prefill(ctx, flat + case.question_ids)
    return Prefilled(Context(ctx.cache, ctx.next_position + len(flat), len(flat)), logits)


def kv_variant(env: Env, case: Case) -> Context:
    """kv mode as BankStore.query does it: load stored blocks (hot tier, else decode) and assemble."""
    blocks = [env.store.load_block(env.session, env.bank, row) for row in case.blocks]
    return env.store.runner.assemble(blocks)


VARIANTS: dict[str, Variant] = {REFERENCE: text_variant, "kv": kv_variant}


def recompute_variant(ratio: float, weighted: bool = True) -> Variant:
    """kv, then the KV of the ``ratio`` context tokens that matter most recomputed (CacheBlend): the question's
    most attended tokens ranked by probe-layer value deviation times that attention, the question prefilled along
    the recompute's passes as BankStore.query does; or every token by deviation alone (``weighted=False``), the
    question prefilled after."""
    def variant(env: Env, case: Case) -> Context | Prefilled:
        ctx = kv_variant(env, case)
        ids = [tok for ids in case.block_ids for tok in ids]
        # The first block was encoded right after the prefix, as BankStore.query tells blend too.
        exact = len(case.block_ids[0])
        if not weighted:
            blend(env.store.runner, ctx, ids, ratio, exact_tokens=exact)
            return ctx
        asked = blend_and_ask(env.store.runner, ctx, ids, case.question_ids, ratio, exact_tokens=exact)
        return Prefilled(ctx, asked.logits)
    return variant


def compact_variant(tau: float | None = None, share: float | None = None) -> Variant:
    """kv, then compacted to the tokens the question attends to: above median + tau * MAD, or the best
    ``share`` of the context tokens."""
    def variant(env: Env, case: Case) -> Context:
        ctx = kv_variant(env, case)
        budget = int(share * ctx.context_tokens) if share is not None else None
        return compact(env.store.runner, ctx, case.question_ids, CompactionSpec(tau=tau, budget_tokens=budget))
    return variant


VARIANTS.update({f"kv+recompute@{r:.2f}": recompute_variant(r) for r in (0.05, 0.10, 0.15, 0.25, 0.50)})
VARIANTS["kv+recompute@0.15/dev-only"] = recompute_variant(0.15, weighted=False)
VARIANTS.update({"kv+compact@tau=0": compact_variant(tau=0.0), "kv+compact@tau=1": compact_variant(tau=1.0),
                 "kv+compact@50%": compact_variant(share=0.5)})


@dataclass
class Outcome:
    """What one variant produced for one case."""

    answer: str
    ttft_ms: float
    kept_tokens: int  # context tokens the answer was generated from (fewer than the blocks' after compaction)
    logprobs: torch.Tensor  # [len(question_ids) + len(answer_ids), vocab], teacher forced


def run_variant(env: Env, case: Case, variant: Variant, max_new_tokens: int) -> Outcome:
    """Build the variant's context, answer greedily on a copy, and teacher-force on the original."""
    runner = env.store.runner
    t0 = time.perf_counter()
    built = variant(env, case)
    t_built = time.perf_counter()
    ctx = built.ctx if isinstance(built, Prefilled) else built
    with torch.inference_mode():
        gen_ctx = replace(ctx, cache=copy.deepcopy(ctx.cache))
    # The cache copy is harness overhead, not part of answering: leave it out of TTFT.
    if isinstance(built, Prefilled):
        gen = runner.decode(gen_ctx, built.logits, ctx.next_position + len(case.question_ids), max_new_tokens)
        ttft_ms = case.retrieve_ms + (t_built - t0) * 1000
        rows = ctx.next_position  # prefix + context: the question's rows go, teacher forcing puts them back
        for layer in ctx.cache.layers:
            layer.keys, layer.values = layer.keys[:, :, :rows], layer.values[:, :, :rows]
    else:
        gen = runner.generate(gen_ctx, case.question_ids, max_new_tokens)
        ttft_ms = case.retrieve_ms + (t_built - t0 + gen.prefill_ms / 1000) * 1000
    logits = runner.logits(ctx, case.question_ids + case.answer_ids)
    return Outcome(gen.text, ttft_ms, ctx.context_tokens, torch.log_softmax(logits, dim=-1))


def kl_per_token(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Mean over positions of KL(reference || other), both log-probabilities, in nats."""
    # float64: near-identical fp32 distributions otherwise give rounding noise of either sign.
    ref, oth = reference.double(), other.double()
    return float((ref.exp() * (ref - oth)).sum(-1).mean())


def answer_nll(logprobs: torch.Tensor, case: Case) -> float:
    """Mean NLL per gold-answer token: position i of the answer is predicted at input i - 1."""
    start = len(case.question_ids) - 1
    targets = torch.tensor(case.answer_ids)
    picked = logprobs[start:start + len(targets)].gather(1, targets[:, None])
    return float(-picked.mean())


def retrieve_cases(env: Env, questions: Sequence[Question], ks: Sequence[int]) -> list[Case]:
    """Retrieve each question's top-max(k) once and load every block, so the hot tier is warm."""
    store, runner = env.store, env.store.runner
    cases = []
    for question in tqdm(questions, desc="retrieve", unit="q"):
        t0 = time.perf_counter()
        hits = store.retriever.retrieve(env.session, env.bank, question.text, max(ks), None)
        retrieve_ms = (time.perf_counter() - t0) * 1000
        for block, _, _ in hits:
            store.load_block(env.session, env.bank, block)
        q_ids = runner.question_ids(question.text)
        a_ids = runner.tokenize(question.answers[0])
        for k in ks:
            top = hits[:k]
            cases.append(Case(question=question, k=k, blocks=[b for b, _, _ in top],
                              block_ids=[bytes_to_ids(b.token_ids) for b, _, _ in top], question_ids=q_ids,
                              answer_ids=a_ids, retrieve_ms=retrieve_ms,
                              gold_retrieved=any(d.doc_id == f"p{question.paragraph:03d}" for _, d, _ in top)))
    return cases


def evaluate(env: Env, cases: Sequence[Case], variants: dict[str, Variant], max_new_tokens: int
             ) -> list[dict[str, Any]]:
    """One record per (case, variant); the reference runs first so the others are scored against it."""
    names = [REFERENCE] + [n for n in variants if n != REFERENCE]
    records = []
    for case in tqdm(cases, desc="evaluate", unit="case"):
        ref: Outcome | None = None
        for name in names:
            out = run_variant(env, case, variants[name], max_new_tokens)
            if ref is None:
                ref = out
            em, f1 = squad_scores(out.answer, case.question.answers)
            records.append({"variant": name, "k": case.k, "qid": case.question.qid, "answer": out.answer,
                            "em": em, "f1": f1, "kl": kl_per_token(ref.logprobs, out.logprobs),
                            "nll": answer_nll(out.logprobs, case), "agree": out.answer == ref.answer,
                            "ttft_ms": round(out.ttft_ms, 2), "context_tokens": sum(map(len, case.block_ids)),
                            "kept_tokens": out.kept_tokens,
                            "gold_retrieved": case.gold_retrieved})
    return records


def summarise(records: Sequence[dict[str, Any]], names: Sequence[str], ks: Sequence[int]) -> list[dict[str, Any]]:
    """Means of the quality metrics, median TTFT and the speedup over text, per (variant, k); F1 minus text
    F1 with a paired bootstrap 95% interval over the questions (F1 ~0.1 moves a lot between question sets)."""
    rows = []
    for k in ks:
        ref_ttft = statistics.median(r["ttft_ms"] for r in records if r["variant"] == REFERENCE and r["k"] == k)
        ref_f1 = {r["qid"]: r["f1"] for r in records if r["variant"] == REFERENCE and r["k"] == k}
        for name in names:
            mine = [r for r in records if r["variant"] == name and r["k"] == k]
            ttft = statistics.median(r["ttft_ms"] for r in mine)
            diffs = [r["f1"] - ref_f1[r["qid"]] for r in mine]
            rows.append({
                "variant": name, "k": k, "n": len(mine),
                "context_tokens": statistics.median(r["context_tokens"] for r in mine),
                "kept_share": statistics.fmean(r["kept_tokens"] / r["context_tokens"] for r in mine),
                "gold_retrieved": statistics.fmean(r["gold_retrieved"] for r in mine),
                "em": statistics.fmean(r["em"] for r in mine), "f1": statistics.fmean(r["f1"] for r in mine),
                "f1_vs_text": statistics.fmean(diffs), "f1_vs_text_ci95": bootstrap_ci(diffs),
                "kl_mean": statistics.fmean(r["kl"] for r in mine), "kl_max": max(r["kl"] for r in mine),
                "nll": statistics.fmean(r["nll"] for r in mine),
                "agreement": statistics.fmean(r["agree"] for r in mine),
                "ttft_ms_median": round(ttft, 2), "speedup_vs_text": round(ref_ttft / ttft, 2),
            })
    return rows


def plot(rows: Sequence[dict[str, Any]]) -> Figure:
    """F1 and KL against median TTFT, one line per variant through its k points."""
    names = list(dict.fromkeys(r["variant"] for r in rows))
    # A bare Figure needs no pyplot and no display backend.
    fig = Figure(figsize=(11, 4.2))
    left, right = fig.subplots(1, 2)
    for name in names:
        mine = [r for r in rows if r["variant"] == name]
        xs = [r["ttft_ms_median"] for r in mine]
        line = left.plot(xs, [r["f1"] for r in mine], marker="o", label=name)[0]
        if name != REFERENCE:  # KL of text against itself is 0: nothing to draw on a log axis
            right.plot(xs, [max(r["kl_mean"], 1e-9) for r in mine], marker="o", label=name, color=line.get_color())
        for r, x in zip(mine, xs, strict=True):
            left.annotate(f"k={r['k']}", (x, r["f1"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
            if name != REFERENCE:
                right.annotate(f"k={r['k']}", (x, max(r["kl_mean"], 1e-9)), textcoords="offset points",
                               xytext=(4, 4), fontsize=8)
    left.set(xscale="log", xlabel="median TTFT, ms", ylabel="SQuAD F1 (mean)", title="task quality vs TTFT")
    right.set(xscale="log", yscale="log", xlabel="median TTFT, ms", ylabel="KL(text || variant), nats/token",
              title="fidelity to text mode vs TTFT")
    for ax in (left, right):
        # Ticks at 1-2-5 steps with plain labels: the default minor labels overlap on a span under a decade.
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.tight_layout()
    return fig


def held_out_questions(questions: Sequence[Question], published: int, count: int) -> list[Question]:
    """``count`` questions spread over those a ``published``-question run does not ask: a dev set to tune on
    that never overlaps the questions the published numbers come from."""
    asked = {q.qid for q in pick_questions(questions, published)}
    return pick_questions([q for q in questions if q.qid not in asked], count)


def run(args: argparse.Namespace) -> dict[str, Any]:
    squad = load_or_exit(args.data)
    questions = (held_out_questions(squad.questions, args.held_out, args.questions) if args.held_out
                 else pick_questions(squad.questions, args.questions))
    ks = sorted(args.k)
    unknown = set(args.variants) - VARIANTS.keys()
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; known: {sorted(VARIANTS)}")
    variants = {n: VARIANTS[n] for n in [REFERENCE, *args.variants] if n in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="kvrag-bench-quality-") as tmp:
        store = open_store(Path(tmp), torch_threads=args.threads)
        ingest(store, squad.paragraphs)
        with store.session() as s:
            env = Env(store, s, store.bank_row(s, BANK))
            cases = retrieve_cases(env, questions, ks)
            records = evaluate(env, cases, variants, args.max_new_tokens)
        stats = store.stats(BANK)
        codec = store.get_bank(BANK).codec  # the default codec as the bank resolved it (auto: by model)
        machine = machine_info(store.llm.name)
        machine["embedder"] = store.embedder.name
        store.close()
    return {
        "benchmark": "quality",
        "data": str(args.data),
        "questions": len(questions),
        "held_out_from": args.held_out,
        "ks": ks,
        "max_new_tokens": args.max_new_tokens,
        "reference": REFERENCE,
        "bank": {"documents": stats.documents, "blocks": stats.blocks, "tokens": stats.tokens,
                 "codec": codec, "block_tokens": store.settings.block_tokens},
        "machine": machine,
        "rows": summarise(records, list(variants), ks),
        "records": records,
    }


TABLE_HEADERS = ("k", "variant", "ctx tokens", "kept", "gold in top-k", "EM", "F1", "F1 - text [95% CI]", "KL mean",
                 "KL max", "gold NLL", "agree w/ text", "TTFT p50 ms", "text/variant")


def table_rows(rows: Sequence[dict[str, Any]]) -> list[list[Any]]:
    def vs_text(r: dict[str, Any]) -> str:
        low, high = r["f1_vs_text_ci95"]
        return f"{r['f1_vs_text']:+.3f} [{low:+.3f}, {high:+.3f}]"

    return [[r["k"], r["variant"], int(r["context_tokens"]), f"{r['kept_share']:.0%}", r["gold_retrieved"], r["em"],
             r["f1"], vs_text(r), r["kl_mean"], r["kl_max"], r["nll"], r["agreement"], r["ttft_ms_median"],
             f"{r['speedup_vs_text']:.1f}x"]
            for r in rows]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.quality",
        description="Fidelity of kv mode (and later variants) to text mode on the SQuAD excerpt: EM/F1 of greedy "
                    "answers, KL(text || variant) and gold-answer NLL teacher-forced over question + answer tokens, "
                    "greedy agreement with text, TTFT. Writes bench/results/quality.{json,png}.")
    add_data_args(parser, default_questions=60)
    parser.add_argument("--k", type=int, nargs="+", default=[1, 3, 5], help="k values (default: 1 3 5)")
    parser.add_argument("--max-new-tokens", type=int, default=24, help="greedy answer length cap (default: 24)")
    parser.add_argument("--variants", nargs="+", default=[n for n in VARIANTS if n != REFERENCE],
                        help=f"variants besides the text reference (known: {', '.join(VARIANTS)})".replace("%", "%%"))
    parser.add_argument("--held-out", type=int, default=0, metavar="N",
                        help="dev run: ask --questions questions spread over those an N-question run does not ask "
                             "(tuning never sees the published questions); prints the table, writes nothing")
    args = parser.parse_args(argv)
    result = run(args)
    print_table(f"quality vs text mode, {result['questions']} questions", TABLE_HEADERS, table_rows(result["rows"]))
    if args.held_out:
        return
    print(f"wrote {write_json('quality', result)} and {save_figure(plot(result['rows']), 'quality')}")
    markdown = doc_markdown(result, TABLE_HEADERS, table_rows(result["rows"]))
    publish_doc_table("quality", markdown)


if __name__ == "__main__":
    main()
