"""Time to first token end to end through the HTTP API (``python -m bench.ttft --http``).

Starts the real server (``kvrag serve`` in a subprocess: SQLite, packaged SmolLM2 + MiniLM, defaults
everywhere), PUTs every SQuAD paragraph through the API, then asks each question as a streamed query at
k = 5 with the default query settings, timing from the request leaving the client to the first ``token``
event. ``max_new_tokens=1``: it does not change what happens before the first token and keeps the single
model worker from decoding answers nobody times. Modes interleaved per question:

- ``kv``: the server's kv mode (hot tier warmed by one pass over the questions first),
- ``text``: the server's text mode (the baseline: the retrieved blocks' tokens prefilled),
- ``llama.cpp``: text-RAG on the same GGUF with llama-cpp-python (optional ``bench`` extra): the same
  blocks (the server's ``/search``, same default retrieval) in the same prompt layout, prefilled by
  llama.cpp; its time is the search call plus llama.cpp's time to its first token.

Writes bench/results/ttft_http.json and ttft_http.png. Goals (issue 9): kv >= 10x lower TTFT than text,
and >= 12x lower than llama.cpp.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import httpx
from matplotlib.figure import Figure
from tqdm import tqdm

from bench.live import LiveServer, ingest_http, live_server, streamed_query
from bench.squad import (
    BANK,
    Question,
    load_or_exit,
    machine_info,
    pick_questions,
    print_table,
    publish_doc_table,
    save_figure,
    write_json,
)
from bench.ttft import percentile
from kvstore.config import DEFAULT_SYSTEM_PROMPT, Settings

K = 5
GOALS = {"text": 10.0, "llama.cpp": 12.0}  # kv must be this many times faster than the row


def _llama_cpp(threads: int) -> Callable[[str], float] | None:
    """A function timing llama.cpp's first token for a prompt (seconds), or None without llama-cpp-python."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    from kvstore.models import SMOLLM2_GGUF, SMOLLM2_PACKAGE, package_dir

    llm = Llama(model_path=str(package_dir(SMOLLM2_PACKAGE) / SMOLLM2_GGUF), n_ctx=4096, n_threads=threads,
                n_threads_batch=threads, n_batch=2048, verbose=False)

    def first_token(prompt: str) -> float:
        t0 = time.perf_counter()
        for _ in llm.create_completion(prompt, max_tokens=1, temperature=0.0, stream=True):
            break
        return time.perf_counter() - t0

    return first_token


def _prompt_parts() -> tuple[str, str, str]:
    """The server's prompt layout (prefix, question prefix, question suffix) from the packaged tokenizer."""
    from transformers import AutoTokenizer

    from kvstore.models import _convert_packaged_smollm2
    from kvstore.runner import prompt_layout

    settings = Settings()
    tokenizer = AutoTokenizer.from_pretrained(_convert_packaged_smollm2(settings.resolved_model_cache_dir()))
    layout = prompt_layout(tokenizer, DEFAULT_SYSTEM_PROMPT)
    return layout.prefix, layout.question_prefix, layout.question_suffix


def _llama_row(client: httpx.Client, first_token: Callable[[str], float], parts: tuple[str, str, str],
               question: Question) -> dict[str, float]:
    t0 = time.perf_counter()
    r = client.post(f"/v1/banks/{BANK}/search", json={"query": question.text, "k": K})
    r.raise_for_status()
    retrieve = time.perf_counter() - t0
    prefix, q_prefix, q_suffix = parts
    prompt = prefix + "".join(h["text"] for h in r.json()["hits"]) + q_prefix + question.text + q_suffix
    prefill = first_token(prompt)
    return {"ttft_ms": (retrieve + prefill) * 1000, "retrieve_ms": retrieve * 1000, "prefill_ms": prefill * 1000}


def measure(server: LiveServer, questions: Sequence[Question], first_token: Callable[[str], float] | None
            ) -> list[dict[str, Any]]:
    """Every question once per mode, modes interleaved; one sample dict per (question, mode)."""
    parts = _prompt_parts() if first_token is not None else None
    samples: list[dict[str, Any]] = []
    with server.client() as c:
        for q in questions[:3]:  # first forward passes (allocator, kernels) are slow in every mode
            for mode in ("kv", "text"):
                streamed_query(c, q.text, k=K, mode=mode, max_new_tokens=1)
            if first_token is not None and parts is not None:
                _llama_row(c, first_token, parts, q)
        for q in tqdm(questions, desc="warm hot tier", unit="q"):
            streamed_query(c, q.text, k=K, mode="kv", max_new_tokens=1)
        for q in tqdm(questions, desc="measure", unit="q"):
            for mode in ("kv", "text"):
                got = streamed_query(c, q.text, k=K, mode=mode, max_new_tokens=1)
                t = got.server.get("timings", {})
                samples.append({"variant": mode, "qid": q.qid, "ttft_ms": got.ttft_ms,
                                "server_ttft_ms": t.get("ttft_ms"), "retrieve_ms": t.get("retrieve_ms"),
                                "load_ms": t.get("load_ms"), "prefill_ms": t.get("prefill_ms"),
                                "context_tokens": got.server.get("usage", {}).get("context_tokens")})
            if first_token is not None and parts is not None:
                samples.append({"variant": "llama.cpp", "qid": q.qid, **_llama_row(c, first_token, parts, q)})
    return samples


def summarise(samples: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    names = list(dict.fromkeys(s["variant"] for s in samples))
    for name in names:
        picked = [s for s in samples if s["variant"] == name]
        ttft = [s["ttft_ms"] for s in picked]
        server = [s["server_ttft_ms"] for s in picked if s.get("server_ttft_ms") is not None]
        rows.append({"variant": name, "n": len(picked), "ttft_ms_median": round(statistics.median(ttft), 1),
                     "ttft_ms_p90": round(percentile(ttft, 90), 1),
                     "server_ttft_ms_median": round(statistics.median(server), 1) if server else None,
                     "prefill_ms_median": round(statistics.median(s["prefill_ms"] for s in picked), 1)})
    kv = next(r["ttft_ms_median"] for r in rows if r["variant"] == "kv")
    for row in rows:
        row["kv_speedup"] = round(row["ttft_ms_median"] / kv, 2)
    return rows


def plot(rows: Sequence[dict[str, Any]]) -> Figure:
    fig = Figure(figsize=(6.5, 4))
    ax = fig.subplots()
    xs = range(len(rows))
    ax.bar(xs, [r["ttft_ms_median"] for r in rows], color=["tab:green", "tab:blue", "tab:orange"][:len(rows)])
    ax.errorbar(xs, [r["ttft_ms_median"] for r in rows],
                yerr=[[0] * len(rows), [r["ttft_ms_p90"] - r["ttft_ms_median"] for r in rows]], fmt="none",
                ecolor="black", capsize=4)
    ax.set_xticks(list(xs), [f"{r['variant']}\n{r['kv_speedup']:.1f}x kv" for r in rows])
    ax.set(ylabel="client-side TTFT, ms (median, whisker p90)", yscale="log",
           title=f"TTFT through the HTTP API, SmolLM2, k = {K}")
    ax.grid(alpha=0.3, axis="y", which="both")
    fig.tight_layout()
    return fig


def run(args: argparse.Namespace) -> dict[str, Any]:
    squad = load_or_exit(args.data)
    questions = pick_questions(squad.questions, args.questions)
    first_token = None if args.no_llama_cpp else _llama_cpp(max(args.threads, 1))
    with live_server(args.threads) as server:
        ingest_http(server, squad.paragraphs)
        load_before = os.getloadavg()
        samples = measure(server, questions, first_token)
    machine = machine_info("SmolLM2-135M-Instruct")
    machine["load_average_before"] = load_before
    rows = summarise(samples)
    goals = {name: {"speedup": goal, "measured": r["kv_speedup"], "met": r["kv_speedup"] >= goal}
             for name, goal in GOALS.items() for r in rows if r["variant"] == name}
    return {"benchmark": "ttft_http", "data": str(args.data), "questions": len(questions), "k": K,
            "max_new_tokens": 1, "server_threads": args.threads,
            "llama_cpp": "measured" if first_token is not None else "llama-cpp-python not installed (or skipped)",
            "machine": machine, "goals": goals, "rows": rows, "samples": samples}


HEADERS = ("variant", "n", "TTFT p50 ms", "TTFT p90 ms", "server TTFT p50", "prefill p50", "variant/kv")


def table_rows(rows: Sequence[dict[str, Any]]) -> list[list[Any]]:
    return [[r["variant"], r["n"], r["ttft_ms_median"], r["ttft_ms_p90"],
             "-" if r["server_ttft_ms_median"] is None else r["server_ttft_ms_median"], r["prefill_ms_median"],
             f"{r['kv_speedup']:.1f}x"] for r in rows]


def report(result: dict[str, Any]) -> None:
    """Table, goals, JSON + PNG, and the docs/BENCHMARKS.md section."""
    from bench.squad import doc_markdown

    print_table(f"TTFT through the HTTP API, k = {K}, {result['questions']} questions, "
                f"{result['server_threads']} server torch threads", HEADERS, table_rows(result["rows"]))
    for name, goal in result["goals"].items():
        print(f"goal: kv >= {goal['speedup']:.0f}x lower TTFT than {name}: measured {goal['measured']:.1f}x -> "
              f"{'met' if goal['met'] else 'NOT met'}")
    if "llama.cpp" not in result["goals"]:
        print(f"llama.cpp baseline: {result['llama_cpp']}")
    print(f"wrote {write_json('ttft_http', result)} and {save_figure(plot(result['rows']), 'ttft_http')}")
    m = result["machine"]
    note = (f"Load average {m['load_average_before'][0]:.1f} when measuring started. llama.cpp: "
            f"{result['llama_cpp']}.\n\n")
    publish_doc_table("ttft_http", note + doc_markdown(result, HEADERS, table_rows(result["rows"])))
