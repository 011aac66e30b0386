"""Codec presets on the real model: size against fidelity to the lossless ``fp16`` path (issue 5).

For each answerable SQuAD question the context is k = 3 blocks: the gold paragraph and the two
other paragraphs the embedder ranks highest. Every paragraph is prefilled once (after the shared
prefix); each preset then encodes and decodes those blocks through the real block format, and the
question is asked after the assembled, decoded KV. Against the ``fp16`` preset (the reference) it
reports

- the compression ratio: fp16 KV bytes (the bank's ``raw_bytes``) over stored block bytes,
- mean KL(fp16 || preset) of next-token distributions, teacher-forced over question + gold answer,
- the change of the gold answer's mean NLL per token,
- greedy answer agreement with fp16 (``--max-new-tokens``, default 16): the exact decoded string (the
  issue's must-pass), and as a second column the SQuAD-normalized first sentence of the answer,
- encode and decode CPU time per 1k tokens (one thread, all blocks of the run).

Writes bench/results/codec.{json,png} and the "Codec presets" section of docs/BENCHMARKS.md.
Run: ``python -m bench.codec`` (``--questions 10`` while iterating).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from tqdm import tqdm

from bench.squad import (
    REPO_ROOT,
    RESULTS_DIR,
    Question,
    add_data_args,
    load_or_exit,
    machine_info,
    markdown_table,
    normalize_answer,
    pick_questions,
    print_table,
    save_figure,
    write_json,
)
from kvstore.codec.format import PRESETS, decode_block, default_codec, encode_block
from kvstore.config import Settings
from kvstore.model.loader import Embedder, load_llm
from kvstore.model.runner import Runner, set_threads
from kvstore.types import BlockKV

REFERENCE = "fp16"
DOCS = REPO_ROOT / "docs" / "BENCHMARKS.md"
SECTION = "## Codec: compression vs fidelity per preset (`bench/codec.py`, issue 5)"


@dataclass
class Case:
    """One question: its k block indices (gold first) and the token ids both paths use."""

    question: Question
    blocks: list[int]
    question_ids: list[int]
    answer_ids: list[int]


@dataclass
class Coded:
    """One preset applied to every block the run uses."""

    blocks: dict[int, BlockKV]
    stored_bytes: int
    encode_s: float
    decode_s: float


def build_cases(runner: Runner, embedder: Embedder, paragraphs: Sequence[str], questions: Sequence[Question],
                k: int) -> list[Case]:
    """Gold paragraph + the ``k - 1`` best other paragraphs by embedding similarity."""
    para_vecs = embedder.embed(list(paragraphs))
    q_vecs = embedder.embed([q.text for q in questions])
    cases = []
    for question, vec in zip(questions, q_vecs, strict=True):
        ranked = [int(i) for i in np.argsort(-(para_vecs @ vec)) if int(i) != question.paragraph]
        cases.append(Case(question=question, blocks=[question.paragraph, *ranked[:k - 1]],
                          question_ids=runner.question_ids(question.text),
                          answer_ids=runner.tokenize(question.answers[0])))
    return cases


def apply_preset(name: str, kv: dict[int, BlockKV], fingerprint: str) -> Coded:
    """Encode and decode every block through the real format, timing both.

    Times are the process's CPU time (torch runs on one thread), so other jobs sharing the machine
    do not inflate them.
    """
    blobs: dict[int, bytes] = {}
    t0 = time.process_time()
    for i, block in kv.items():
        blobs[i] = encode_block(block, fingerprint, name)
    t1 = time.process_time()
    decoded = {i: decode_block(data, fingerprint) for i, data in blobs.items()}
    t2 = time.process_time()
    return Coded(decoded, sum(map(len, blobs.values())), t1 - t0, t2 - t1)


def kl_per_token(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Mean over positions of KL(reference || other), both log-probabilities, in nats."""
    return float((reference.exp() * (reference - other)).sum(-1).mean())


def answer_nll(logprobs: torch.Tensor, case: Case) -> float:
    """Mean NLL per gold-answer token: answer token i is predicted at input position q + i - 1."""
    start = len(case.question_ids) - 1
    targets = torch.tensor(case.answer_ids)
    return float(-logprobs[start:start + len(targets)].gather(1, targets[:, None]).mean())


_SENTENCE_END = re.compile(r"(?<=[.!?])\s|\n")


def first_sentence(answer: str) -> str:
    """The SQuAD-normalized answer up to its first sentence end or newline.

    A 16-token greedy answer of a small model often goes on past the answer; two answers that
    agree on this prefix give the same answer even when a near-tie later flips a word.
    """
    return normalize_answer(_SENTENCE_END.split(answer.strip(), maxsplit=1)[0])


@dataclass
class Answer:
    """A greedy answer: its tokens (without the stop token) and text."""

    token_ids: list[int]
    text: str


def logits_along(runner: Runner, blocks: Sequence[BlockKV], case: Case, answer: Answer) -> torch.Tensor:
    """``[answer tokens + 1, vocab]``: the next-token logits at each of ``answer``'s picks, teacher-forced after
    ``blocks`` and the question, and the pick after its last token."""
    logits = runner.logits(runner.assemble(blocks), case.question_ids + answer.token_ids)
    return logits[len(case.question_ids) - 1:]


def repeats(runner: Runner, along: torch.Tensor, reference: Answer, max_new_tokens: int) -> bool:
    """Whether greedy decoding with the logits ``along`` the reference (:func:`logits_along`) would produce
    exactly its tokens: every argmax is the reference's token and, where it stopped early, a stop comes next."""
    picks = along.argmax(-1).tolist()
    if picks[:len(reference.token_ids)] != reference.token_ids:
        return False
    return len(reference.token_ids) >= max_new_tokens or picks[len(reference.token_ids)] in runner.stop_ids


def follows_reference(runner: Runner, blocks: Sequence[BlockKV], case: Case, reference: Answer,
                      max_new_tokens: int) -> bool:
    """Whether greedy decoding after ``blocks`` would produce exactly ``reference``'s tokens: one teacher-forced
    forward pass along it instead of one per token."""
    return repeats(runner, logits_along(runner, blocks, case, reference), reference, max_new_tokens)


def answer_margin(along: torch.Tensor) -> float:
    """The smallest gap, in log-probability, between the first and second choice at any pick ``along`` an
    answer (:func:`logits_along`): how far the answer is from flipping on a near-tie."""
    top = torch.log_softmax(along.float(), -1).topk(2, dim=-1).values  # [answer tokens + 1, 2]
    return float((top[:, 0] - top[:, 1]).min())


def ask(runner: Runner, coded: Coded, case: Case, max_new_tokens: int, reference: Answer | None
        ) -> tuple[Answer, torch.Tensor]:
    """Greedy answer and teacher-forced log-probabilities after the case's decoded blocks.

    With a ``reference`` answer, decoding runs only where the teacher-forced check says the answer
    differs (:func:`follows_reference`); otherwise the answer is the reference's, token for token.
    """
    blocks = [coded.blocks[i] for i in case.blocks]
    if reference is not None and follows_reference(runner, blocks, case, reference, max_new_tokens):
        answer = reference
    else:
        gen = runner.generate(runner.assemble(blocks), case.question_ids, max_new_tokens)
        answer = Answer(gen.token_ids, gen.text)
    logits = runner.logits(runner.assemble(blocks), case.question_ids + case.answer_ids)
    return answer, torch.log_softmax(logits, dim=-1)


def evaluate(runner: Runner, kv: dict[int, BlockKV], cases: Sequence[Case], presets: Sequence[str],
             max_new_tokens: int) -> list[dict[str, Any]]:
    """One summary row per preset; the reference is asked first and every preset compared with it."""
    tokens = sum(b.tokens for b in kv.values())
    raw_bytes = tokens * runner.bytes_per_token_fp16
    reference: list[tuple[Answer, torch.Tensor]] = []
    self_check: list[bool] = []
    margins: list[float] = []
    rows = []
    for name in [REFERENCE, *[p for p in presets if p != REFERENCE]]:
        coded = apply_preset(name, kv, runner.llm.fingerprint)
        kls, nll_delta, agree, agree_short = [], [], [], []
        for j, case in enumerate(tqdm(cases, desc=name, unit="q")):
            known = reference[j][0] if name != REFERENCE else None
            answer, logprobs = ask(runner, coded, case, max_new_tokens, known)
            if name == REFERENCE:
                reference.append((answer, logprobs))
                # The shortcut of ask() holds only if fp16 teacher-forced along its own answer repeats it.
                blocks = [coded.blocks[i] for i in case.blocks]
                along = logits_along(runner, blocks, case, answer)
                self_check.append(repeats(runner, along, answer, max_new_tokens))
                margins.append(answer_margin(along))
            ref_answer, ref_logprobs = reference[j]
            kls.append(kl_per_token(ref_logprobs, logprobs))
            nll_delta.append(answer_nll(logprobs, case) - answer_nll(ref_logprobs, case))
            agree.append(answer.text == ref_answer.text)
            agree_short.append(first_sentence(answer.text) == first_sentence(ref_answer.text))
        rows.append({
            "preset": name, "ratio": round(raw_bytes / coded.stored_bytes, 3),
            "bits_per_value": round(8 * coded.stored_bytes / (raw_bytes / 2), 3),
            "kl_mean": statistics.fmean(kls), "kl_max": max(kls), "nll_delta": statistics.fmean(nll_delta),
            "agreement": statistics.fmean(agree), "agreement_first_sentence": statistics.fmean(agree_short),
            "encode_ms_per_1k": round(coded.encode_s * 1e6 / tokens, 2),
            "decode_ms_per_1k": round(coded.decode_s * 1e6 / tokens, 2),
            "kl": kls, "agree_each": agree,
        })
    rows[0]["teacher_forced_self_check"] = statistics.fmean(self_check)
    rows[0]["margin"] = margins
    return rows


MUST_RATIO = 5.0
MUST_AGREEMENT = 0.9


def choose_default(rows: Sequence[dict[str, Any]]) -> str:
    """The issue's rule: the highest ratio >= 5x with >= 90% exact greedy agreement; if none, the
    best-agreeing preset, ties broken by ratio (``Settings.default_codec`` is set from this)."""
    passing = [r for r in rows if r["ratio"] >= MUST_RATIO and r["agreement"] >= MUST_AGREEMENT]
    if passing:
        return str(max(passing, key=lambda r: r["ratio"])["preset"])
    return str(max(rows, key=lambda r: (r["agreement"], r["ratio"]))["preset"])


def verdict(rows: Sequence[dict[str, Any]]) -> str:
    """One sentence per target: met, or the measured gap."""
    def best(pool: list[dict[str, Any]], key: str) -> dict[str, Any] | None:
        return max(pool, key=lambda r: (r[key], r["ratio"])) if pool else None

    five = best([r for r in rows if r["ratio"] >= MUST_RATIO], "agreement")
    eight = [r for r in rows if r["ratio"] >= 8]
    low_kl = min(eight, key=lambda r: r["kl_mean"]) if eight else None
    parts = []
    if five is None:
        parts.append("No preset reaches 5x.")
    else:
        met = "Met" if five["agreement"] >= MUST_AGREEMENT else "**Not met**"
        same = sum(five.get("agree_each", []))
        asked = len(five.get("agree_each", []))
        interval = ""
        if asked:
            low, high = wilson_interval(same, asked)
            interval = f" ({same}/{asked}; 95% interval {low:.0%}-{high:.0%})"
        parts.append(f"{met}: the best-agreeing preset >= 5x is `{five['preset']}` ({five['ratio']:.2f}x, "
                     f"{five['agreement']:.0%} exact agreement{interval}, KL {five['kl_mean']:.3g}).")
        parts.append(near_ties(rows, five))
    if low_kl is not None:
        met = "met" if low_kl["kl_mean"] <= 0.05 else "not met"
        parts.append(f"8x goal {met}: `{low_kl['preset']}` at {low_kl['ratio']:.2f}x has KL {low_kl['kl_mean']:.3g}.")
    return " ".join(parts)


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95% at the default ``z``): how far an agreement measured
    on ``trials`` questions could move on other questions like them."""
    share = successes / trials
    centre = (share + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(share * (1 - share) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return centre - half, centre + half


NEAR_TIE = 0.05  # a top-2 log-probability gap this small along an answer is a near-tie


def near_ties(rows: Sequence[dict[str, Any]], row: dict[str, Any]) -> str:
    """Where ``row``'s disagreements sit: on questions whose fp16 answer is a near-tie (:func:`answer_margin`)."""
    margins = rows[0].get("margin") if rows else None
    agree = row.get("agree_each")
    if not margins or not agree or all(agree):
        return ""
    gaps = sorted(m for m, same in zip(margins, agree, strict=True) if not same)
    close = sum(m < NEAR_TIE for m in margins)
    return (f"Its {len(gaps)} disagreements are on questions whose fp16 answer passes a near-tie, the smallest "
            f"top-2 log-probability gap along it {', '.join(f'{g:.3f}' for g in gaps)} (the median question's "
            f"{statistics.median(margins):.3f}; {close} of {len(margins)} questions have one below {NEAR_TIE}).")


def pareto(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows no other row beats on both ratio (higher) and mean KL (lower), by ratio."""
    front = [r for r in rows if not any(o["ratio"] >= r["ratio"] and o["kl_mean"] <= r["kl_mean"] and o is not r
                                        and (o["ratio"], o["kl_mean"]) != (r["ratio"], r["kl_mean"]) for o in rows)]
    return sorted(front, key=lambda r: r["ratio"])


def plot(rows: Sequence[dict[str, Any]]) -> Figure:
    """Compression ratio against mean KL (log), the Pareto front joined, the goal boxes shaded."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    floor = 1e-6  # fp16's KL is 0; put it on the log axis
    for r in rows:
        ax.scatter(r["ratio"], max(r["kl_mean"], floor), color="C0" if r["agreement"] >= 0.9 else "C3", zorder=3)
        ax.annotate(f"{r['preset']} ({r['agreement']:.0%})", (r["ratio"], max(r["kl_mean"], floor)),
                    textcoords="offset points", xytext=(5, 4), fontsize=8)
    front = pareto(rows)
    ax.plot([r["ratio"] for r in front], [max(r["kl_mean"], floor) for r in front], "--", color="C2",
            label="Pareto front")
    ax.axhline(0.01, color="grey", lw=0.8, ls=":")
    ax.axhline(0.05, color="grey", lw=0.8, ls=":")
    ax.axvline(5, color="grey", lw=0.8, ls=":")
    ax.axvline(8, color="grey", lw=0.8, ls=":")
    ax.set(yscale="log", xlabel="compression ratio vs fp16 KV", ylabel="mean KL(fp16 || preset), nats/token",
           title="codec presets on SmolLM2-135M, SQuAD, k = 3 (label: greedy agreement)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


TABLE_HEADERS = ("preset", "ratio", "bits/value", "KL mean", "KL max", "gold NLL delta", "agree w/ fp16",
                 "agree, 1st sentence", "encode ms/1k tok", "decode ms/1k tok")


def table_rows(rows: Sequence[dict[str, Any]]) -> list[list[Any]]:
    return [[r["preset"] + ("*" if r.get("earlier_run") else ""), f"{r['ratio']:.2f}x", r["bits_per_value"],
             r["kl_mean"], r["kl_max"], r["nll_delta"],
             f"{r['agreement']:.0%}", f"{r['agreement_first_sentence']:.0%}", r["encode_ms_per_1k"],
             r["decode_ms_per_1k"]] for r in rows]


def write_docs(result: dict[str, Any]) -> None:
    """Replace (or append) this benchmark's section of docs/BENCHMARKS.md, leaving the others alone."""
    default = result["default_codec"]
    chosen = result["chosen_default"]
    section = "\n".join([
        SECTION,
        "",
        f"`python -m bench.codec --questions {result['questions']} --threads 2` (about 15 minutes on an otherwise "
        "idle 2-core box; `--questions 5` for a quick look). "
        f"{result['questions']} answerable questions of the SQuAD excerpt, k = {result['k']} blocks each (the gold "
        f"paragraph and the two others the embedder ranks highest), {result['tokens']} block tokens in all. Every "
        "preset encodes and decodes the blocks through the real block format; KL and the gold-answer NLL are "
        "teacher-forced over question + answer tokens against the lossless `fp16` preset; agreement compares "
        f"greedy answers ({result['max_new_tokens']} new tokens) with fp16's: the exact string (the must-pass), "
        "and the SQuAD-normalized first sentence (the answer itself, without a near-tie flipping a later word of "
        "a rambling continuation). The ratio is fp16 KV bytes over "
        "stored bytes (the bank's `compression_ratio`), so fp16 itself shows what zstd alone gives."
        + (" Presets marked * were measured by an earlier run on the same questions and kept with `--merge` "
           "(the same KL and agreement; their times are that run's)." if any(r.get("earlier_run")
                                                                            for r in result["rows"]) else ""),
        "",
        markdown_table(TABLE_HEADERS, table_rows(result["rows"])),
        "",
        "![ratio vs KL](../bench/results/codec.png)",
        "",
        f"Default codec (`Settings.default_codec`): **{default}**; this run's rule (the highest ratio >= 5x with "
        f">= 90% exact agreement, else the best-agreeing preset) picks **{chosen}**. Must pass: >= 5x at >= 90% "
        "agreement; goals: "
        "that ratio at KL <= 0.01 and >= 95% agreement, and some preset >= 8x at KL <= 0.05. "
        + verdict(result["rows"]),
        "",
    ])
    text = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    DOCS.write_text(text.rstrip("\n") + "\n")


def merge_rows(rows: list[dict[str, Any]], questions: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """This run's rows, then the previous result's rows of presets not measured now (same questions, k and
    answer length, so KL and agreement are the same measurement; their times come from that earlier run)."""
    path = RESULTS_DIR / "codec.json"
    if not path.exists():
        return rows
    old = json.loads(path.read_text())
    if (old["data"], old["questions"], old["k"], old["max_new_tokens"]) != (str(args.data), questions, args.k,
                                                                            args.max_new_tokens):
        raise SystemExit(f"--merge: {path} was measured with other data, questions, k or answer length")
    measured = {r["preset"] for r in rows}
    kept = [r | {"earlier_run": True} for r in old["rows"] if r["preset"] not in measured and r["preset"] in PRESETS]
    order = list(PRESETS)
    return sorted(rows + kept, key=lambda r: order.index(r["preset"]))


def resolved_default(setting: str, shape: Sequence[int] | None) -> str:
    """``Settings.default_codec`` as a new bank of the measured model (``shape``: layers, KV heads, head dim)
    gets it; ``auto`` stays unresolved for a result that does not record the shape."""
    if setting != "auto" or shape is None:
        return setting
    layers, heads, dim = shape
    return f"auto ({default_codec(setting, layers, heads, dim)} for this model)"


def run(args: argparse.Namespace) -> dict[str, Any]:
    squad = load_or_exit(args.data)
    unknown = set(args.presets) - PRESETS.keys()
    if unknown:
        raise SystemExit(f"unknown presets {sorted(unknown)}; known: {sorted(PRESETS)}")
    settings = Settings()
    set_threads(args.threads)
    runner = Runner(load_llm(settings), settings.system_prompt)
    questions = pick_questions(squad.questions, args.questions)
    cases = build_cases(runner, Embedder(settings), squad.paragraphs, questions, args.k)
    used = sorted({i for c in cases for i in c.blocks})
    encoded = runner.encode([runner.tokenize(squad.paragraphs[i]) for i in used])
    kv = dict(zip(used, encoded, strict=True))
    rows = evaluate(runner, kv, cases, args.presets, args.max_new_tokens)
    shape = [runner.num_layers, runner.kv_heads, runner.head_dim]
    if args.merge:
        rows = merge_rows(rows, len(cases), args)
    return {"chosen_default": choose_default(rows),
        "benchmark": "codec", "data": str(args.data), "questions": len(cases), "k": args.k,
        "blocks": len(kv), "tokens": sum(b.tokens for b in kv.values()), "max_new_tokens": args.max_new_tokens,
        "reference": REFERENCE, "model_shape": shape,
        "default_codec": resolved_default(settings.default_codec, shape),
        "machine": machine_info(runner.llm.name),
        "rows": rows,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.codec",
        description="Codec presets vs the lossless fp16 path on SQuAD (k = 3): compression ratio, KL and gold NLL "
                    "teacher-forced over question + answer, greedy agreement, encode/decode ms per 1k tokens. "
                    "Writes bench/results/codec.{json,png} and its section of docs/BENCHMARKS.md.")
    add_data_args(parser, default_questions=60)
    parser.add_argument("--k", type=int, default=3, help="blocks per question: gold + k-1 retrieved (default: 3)")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="greedy answer length cap (default: 16)")
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), help=f"known: {', '.join(PRESETS)}")
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of bench/results/codec.json for presets not measured in this run")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs/BENCHMARKS.md")
    parser.add_argument("--docs-only", action="store_true",
                        help="measure nothing: rewrite the docs section from bench/results/codec.json, with the "
                             "current Settings.default_codec (after the default was set from a run)")
    args = parser.parse_args(argv)
    if args.docs_only:
        result = json.loads((RESULTS_DIR / "codec.json").read_text())
        result["default_codec"] = resolved_default(Settings().default_codec, result.get("model_shape"))
        write_json("codec", result)
        write_docs(result)
        print(f"updated {DOCS}")
        return
    result = run(args)
    print_table(f"codec presets vs fp16, {result['questions']} questions, k = {result['k']}", TABLE_HEADERS,
                table_rows(result["rows"]))
    print(f"wrote {write_json('codec', result)} and {save_figure(plot(result['rows']), 'codec')}")
    if not args.no_docs:
        write_docs(result)
        print(f"updated {DOCS}")


if __name__ == "__main__":
    main()
