"""bench/ttft_shape.py on the tiny shape: the random-weight model, the block layout and one timed point."""

from __future__ import annotations

import torch

from bench.ttft_shape import BLOCK_TOKENS, SHAPES, build_runner, measure_context, random_blocks
from tests.conftest import build_tokenizer


def test_shapes_are_the_published_sizes() -> None:
    llama = SHAPES["llama3-8b"]
    assert (llama["num_hidden_layers"], llama["num_key_value_heads"], llama["head_dim"]) == (32, 8, 128)


def test_tiny_shape_runs_on_cpu() -> None:
    runner = build_runner("tiny", torch.device("cpu"), tokenizer=build_tokenizer())
    assert (runner.num_layers, runner.kv_heads, runner.head_dim) == (2, 2, 16)
    blocks = random_blocks(runner, 600)
    assert [b.tokens for b in blocks] == [BLOCK_TOKENS, BLOCK_TOKENS, 600 - 2 * BLOCK_TOKENS]
    row = measure_context(runner, 600, repeats=1)
    assert row["kv_bytes"] == 2 * 2 * 600 * 16 * 2 * 4  # layers, heads, tokens, dim, K and V, fp32
    assert row["blocks"] == 3 and "kv_resident_ms" not in row  # the resident variant is CUDA only
    assert row["kv_ms"] > 0 and row["text_ms"] > 0 and row["load_gbps"] > 0
    assert row["speedup"] == round(row["text_ms"] / row["kv_ms"], 2)
