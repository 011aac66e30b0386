"""TTFT of kv vs text mode on a random-weight model of a real size (``python -m bench.ttft --shape NAME``).

No hub download: the model is built from a config (Llama-3-8B: 32 layers, 8 KV heads, head_dim 128, ...)
with random weights on the chosen device, in the dtype the worker uses there (bf16 on CUDA, fp32 on CPU).
Timing does not depend on the weights' values. The context is ``C`` tokens of 256-token blocks with random
KV; for each context length:

- ``kv``: ``Runner.assemble`` of the blocks from host memory (pinned on CUDA: every block crosses the bus
  on every query, the worst case) + the question's prefill to its first token,
- ``kv resident`` (CUDA): the same with the blocks already resident on the GPU (the device cache),
- ``text``: the cached prefix, then the ``C`` context tokens + the question prefilled to the first token,
- ``load``: the assembly alone, waited for; KV bytes / that time is the achieved load bandwidth, set
  against the measured pinned host-to-device bandwidth (on CPU: against a host memory copy's rate).

Writes bench/results/ttft_shape.json and ttft_shape.png. Goals (issue 9, H100): kv >= 5x faster than
text at 4k, >= 12x at 16k, load bandwidth >= 80% of the pinned H2D bandwidth.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from matplotlib.figure import Figure
from transformers import AutoModelForCausalLM
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from bench.squad import machine_info, print_table, publish_doc_table, save_figure, write_json
from kvstore.config import DEFAULT_SYSTEM_PROMPT, Settings
from kvstore.model.device import ResidentBlocks, h2d_bandwidth, pinned
from kvstore.model.loader import LoadedModel, model_dtype, resolve_device, tiny_model_config
from kvstore.model.runner import Runner, set_threads
from kvstore.types import BlockKV

BLOCK_TOKENS = 256
QUESTION_TOKENS = 24
# Published configs (Llama family in transformers). Vocabularies are >= the packaged SmolLM2 tokenizer's, whose
# prompt layout every shape uses.
SHAPES: dict[str, dict[str, Any]] = {
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
                      max_position_embeddings=131072),
    "llama3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=500000.0,
                        max_position_embeddings=131072, tie_word_embeddings=True),
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, rope_theta=100000.0,
                    max_position_embeddings=65536, tie_word_embeddings=True),
    "tiny": dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=65536),
}
GOALS = {4096: 5.0, 16384: 12.0}  # context tokens -> kv/text TTFT ratio wanted on an H100
BANDWIDTH_GOAL = 0.8


def build_runner(shape: str, device: torch.device, tokenizer: PreTrainedTokenizerBase | None = None) -> Runner:
    """A Runner over a random-weight model of ``shape`` on ``device``; by default the packaged SmolLM2
    tokenizer (only the prompt layout and the vocabulary size are used)."""
    if tokenizer is None:
        from transformers import AutoTokenizer

        from kvstore.model.loader import convert_packaged_smollm2

        tokenizer = AutoTokenizer.from_pretrained(convert_packaged_smollm2(Settings().resolved_model_cache_dir()))
    config = tiny_model_config("llama", **SHAPES[shape])
    torch.manual_seed(0)
    with torch.device(device):  # weights are initialised where they will live (8B on the CPU would take minutes)
        model = AutoModelForCausalLM.from_config(config, dtype=model_dtype(device)).eval()
    llm = LoadedModel(model=model, tokenizer=tokenizer, fingerprint=f"shape:{shape}", name=f"{shape} (random)")
    return Runner(llm, DEFAULT_SYSTEM_PROMPT)


def random_blocks(runner: Runner, tokens: int) -> list[BlockKV]:
    """``tokens`` of random pre-RoPE KV in 256-token blocks, where the hot tier would keep them."""
    dtype, cuda = runner.llm.dtype, runner.llm.device.type == "cuda"
    blocks = []
    for i in range(0, tokens, BLOCK_TOKENS):
        n = min(BLOCK_TOKENS, tokens - i)
        shape = (runner.num_layers, runner.kv_heads, n, runner.head_dim)
        k, v = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
        blocks.append(BlockKV(k=pinned(k, dtype) if cuda else k, v=pinned(v, dtype) if cuda else v, key=f"b{i}"))
    return blocks


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn`` (synchronized on CUDA) over ``repeats`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def memcpy_bandwidth(nbytes: int = 256 << 20) -> float:
    """Host memory copy rate in bytes/s (the CPU's 'load' limit: assembly is a copy plus a rotation)."""
    src, dst = torch.empty(nbytes, dtype=torch.uint8), torch.empty(nbytes, dtype=torch.uint8)
    dst.copy_(src)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def measure_context(runner: Runner, tokens: int, repeats: int) -> dict[str, Any]:
    device = runner.llm.device
    cuda = device.type == "cuda"
    blocks = random_blocks(runner, tokens)
    generator = torch.Generator().manual_seed(tokens)
    vocab = runner.tokenizer.vocab_size
    context_ids = torch.randint(0, vocab, (tokens,), generator=generator).tolist()
    q_ids = torch.randint(0, vocab, (QUESTION_TOKENS,), generator=generator).tolist()
    kv_bytes = sum(b.nbytes for b in blocks)

    def load() -> None:
        ctx = runner.assemble(blocks)
        for layer in ctx.cache.layers:  # reading a layer waits for its copy (CUDA)
            layer.keys.sum()

    def kv() -> None:
        runner.generate(runner.assemble(blocks), q_ids, 1)

    def text() -> None:
        runner.generate(runner.text_context(), context_ids + q_ids, 1)

    runner.resident = ResidentBlocks(0)  # every block crosses the bus on every query
    row: dict[str, Any] = {"context_tokens": tokens, "kv_bytes": kv_bytes, "blocks": len(blocks)}
    row["load_ms"] = timed(load, device, repeats) * 1000
    row["kv_ms"] = timed(kv, device, repeats) * 1000
    if cuda:
        runner.resident = ResidentBlocks(2 * kv_bytes)  # the warm-up run puts every block on the GPU
        row["kv_resident_ms"] = timed(kv, device, repeats) * 1000
        runner.resident = ResidentBlocks(0)
    row["text_ms"] = timed(text, device, repeats) * 1000
    row["speedup"] = round(row["text_ms"] / row["kv_ms"], 2)
    row["load_gbps"] = round(kv_bytes / (row["load_ms"] / 1000) / 1e9, 2)
    return row


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(args.device)
    set_threads(args.threads)
    runner = build_runner(args.shape, device)
    cuda = device.type == "cuda"
    limit_name = "pinned H2D" if cuda else "host memcpy"
    limit = h2d_bandwidth() if cuda else memcpy_bandwidth()
    rows = []
    for tokens in sorted(args.contexts):
        row = measure_context(runner, tokens, args.repeats)
        row["load_vs_limit"] = round(row["load_gbps"] * 1e9 / limit, 3)
        rows.append(row)
        print(f"{tokens} tokens: kv {row['kv_ms']:.1f} ms, text {row['text_ms']:.1f} ms ({row['speedup']:.1f}x), "
              f"load {row['load_gbps']:.1f} GB/s", flush=True)
    goals: dict[str, Any] = {f"speedup_at_{t}": {"want": want, "measured": r["speedup"], "met": r["speedup"] >= want}
                             for t, want in GOALS.items() for r in rows if r["context_tokens"] == t}
    if cuda:
        worst = min(r["load_vs_limit"] for r in rows)
        goals["load_bandwidth"] = {"want": BANDWIDTH_GOAL, "measured": worst, "met": worst >= BANDWIDTH_GOAL}
    machine = machine_info(runner.llm.name)
    machine["device"] = str(device)
    machine["dtype"] = str(runner.llm.dtype).removeprefix("torch.")
    return {"benchmark": "ttft_shape", "shape": args.shape, "config": SHAPES[args.shape], "device": str(device),
            "repeats": args.repeats, "question_tokens": QUESTION_TOKENS, "block_tokens": BLOCK_TOKENS,
            "bandwidth_limit": {"kind": limit_name, "gbps": round(limit / 1e9, 2)},
            "goals_apply": cuda and args.shape == "llama3-8b", "goals": goals, "machine": machine, "rows": rows}


def plot(result: dict[str, Any]) -> Figure:
    rows = result["rows"]
    fig = Figure(figsize=(11, 4.2))
    left, right = fig.subplots(1, 2)
    xs = [r["context_tokens"] for r in rows]
    for key, label in (("text_ms", "text"), ("kv_ms", "kv (blocks from host)"), ("kv_resident_ms", "kv resident")):
        if all(key in r for r in rows):
            left.plot(xs, [r[key] for r in rows], marker="o", label=label)
    left.set(xscale="log", yscale="log", xlabel="context tokens", ylabel="TTFT, ms (median)",
             title=f"{result['shape']} on {result['device']}")
    left.grid(alpha=0.3, which="both")
    left.legend()
    limit = result["bandwidth_limit"]
    right.plot(xs, [r["load_gbps"] for r in rows], marker="o", label="achieved KV load")
    right.axhline(limit["gbps"], color="black", ls="--", label=f"measured {limit['kind']}")
    right.set(xscale="log", xlabel="context tokens", ylabel="GB/s", title="KV load bandwidth")
    right.grid(alpha=0.3, which="both")
    right.legend()
    fig.tight_layout()
    return fig


HEADERS = ("context", "blocks", "KV MiB", "kv ms", "kv resident ms", "text ms", "text/kv", "load ms", "load GB/s",
           "load / limit")


def table_rows(rows: Sequence[dict[str, Any]]) -> list[list[Any]]:
    return [[r["context_tokens"], r["blocks"], round(r["kv_bytes"] / 2**20, 1), round(r["kv_ms"], 1),
             round(r["kv_resident_ms"], 1) if "kv_resident_ms" in r else "-", round(r["text_ms"], 1),
             f"{r['speedup']:.1f}x", round(r["load_ms"], 2), r["load_gbps"], f"{r['load_vs_limit']:.0%}"]
            for r in rows]


def report(result: dict[str, Any], name: str) -> None:
    """Table, goals, JSON + PNG (``bench/results/<name>``), and the docs section ``<name>``."""
    limit = result["bandwidth_limit"]
    m = result["machine"]
    title = (f"TTFT by context, {result['shape']} (random weights) on {result['device']} {m['dtype']}, "
             f"{m['torch_threads']} torch threads; {limit['kind']} {limit['gbps']} GB/s")
    print_table(title, HEADERS, table_rows(result["rows"]))
    for goal_name, goal in result["goals"].items():
        verdict = "met" if goal["met"] else "NOT met"
        scope = "" if result["goals_apply"] else " (the goals are for llama3-8b on an H100; indicative only here)"
        print(f"goal {goal_name}: want {goal['want']}, measured {goal['measured']} -> {verdict}{scope}")
    print(f"wrote {write_json(name, result)} and {save_figure(plot(result), name)}")
    device = m["cuda"] or f"{m['cpu_count']} CPUs ({m['processor']})"
    header = (f"{result['shape']} with random weights on {result['device']} ({device}), {m['dtype']}, "
              f"{m['torch_threads']} torch threads, load average {m['load_average'][0]:.1f} at the end, "
              f"{result['repeats']} timed repeats (median), {limit['kind']} measured at {limit['gbps']} GB/s, "
              f"commit {m['git_commit']}, {m['measured_at']}.\n\n")
    from bench.squad import markdown_table

    publish_doc_table(name, header + markdown_table(HEADERS, table_rows(result["rows"])))


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shape", choices=sorted(SHAPES), help="time a random-weight model of this size instead "
                        "of the SQuAD store (llama3-8b needs a GPU: 32 GB of fp32 weights on a CPU)")
    parser.add_argument("--device", default=os.environ.get("KVRAG_DEVICE", "auto"), choices=["auto", "cpu", "cuda"],
                        help="with --shape: where the model runs (default: KVRAG_DEVICE, else auto)")
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 32768],
                        help="with --shape: context lengths in tokens (default: 1024 4096 16384 32768)")
    parser.add_argument("--repeats", type=int, default=5, help="with --shape: timed runs per point (median)")
