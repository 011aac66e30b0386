"""Host memory of model work (issue 33): freed memory stays in the heap for the next query, and the store runs
one query of the default shape at start without changing anything a user sees."""

from __future__ import annotations

import platform
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import kvstore.bank
from kvstore.bank import BankStore
from kvstore.model.host_memory import prime
from kvstore.model.runner import Runner
from tests.conftest import TINY_FAMILIES, build_tiny

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
BLOCKS = ["The Normans gave their name to Normandy.", "Paris is the capital of France."]


# Forty queries of unequal contexts, each allocating its assembled K and V ([30, 3, tokens, 64] fp32, SmolLM2's
# shape) and an activation, all freed when it ends; the minor page faults of the forty, in a fresh process.
QUERIES = """
import random, resource, sys, torch
from kvstore.model.host_memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def query(tokens):
    k, v, x = torch.ones(30, 3, tokens, 64), torch.ones(30, 3, tokens, 64), torch.ones(tokens, 2048)
rng = random.Random(0)
query(1300)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(40):
    query(rng.randrange(500, 1300))
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
ONE_QUERY_PAGES = (2 * 30 * 3 * 1300 * 64 + 1300 * 2048) * 4 // 4096  # the largest query's memory, in pages


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", QUERIES, mode], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[3])
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_memory_queries_free_is_not_faulted_in_again() -> None:
    # glibc's defaults unmap or trim much of it and fault it in again (34,000-150,000 faults measured); kept, the
    # forty fault in less than the largest query's pages.
    kept = _faults("keep")
    assert kept < ONE_QUERY_PAGES < _faults("default")


@pytest.mark.parametrize("kind", sorted(TINY_FAMILIES))
def test_prime_leaves_the_runner_answering_as_before(kind: str) -> None:
    runner = Runner(build_tiny(kind, **TINY_FAMILIES[kind]), "You are a helpful assistant.", block_bias=-0.5)
    blocks = runner.encode([runner.tokenize(t) for t in BLOCKS])
    q = runner.question_ids("Who gave their name to Normandy?")
    before = runner.prefill(runner.assemble(blocks), q)
    prime(runner, blocks=3, block_tokens=32)
    torch.testing.assert_close(runner.prefill(runner.assemble(blocks), q), before, rtol=0, atol=0)


def test_prime_is_never_longer_than_a_query_can_be(monkeypatch: pytest.MonkeyPatch) -> None:
    runner = Runner(build_tiny("llama"), "You are a helpful assistant.")
    positions = runner.model.config.max_position_embeddings
    assembled: list[int] = []
    assemble = runner.assemble
    monkeypatch.setattr(runner, "assemble", lambda kv, room: assembled.append(sum(b.tokens for b in kv) + room)
                        or assemble(kv, room=room))
    prime(runner, blocks=100, block_tokens=256)  # 100 blocks: 25,600 tokens, over the model's 4,096 positions
    prime(runner, blocks=2, block_tokens=positions)  # not even one block fits
    # the first ran as many blocks as fit with the question, the second nothing
    assert len(assembled) == 1 and positions - 256 < assembled[0] + runner.prefix_kv[0].shape[2] <= positions


@pytest.mark.parametrize("blocks", [0, 5])
def test_the_store_primes_at_start_with_its_settings(make_store: Callable[..., BankStore],
                                                     monkeypatch: pytest.MonkeyPatch, blocks: int) -> None:
    primed: list[tuple[Any, ...]] = []
    monkeypatch.setattr(kvstore.bank, "prime", lambda *args: primed.append(args))
    store = make_store(prime_blocks=blocks, block_tokens=64)
    assert primed == ([(store.runner, 5, 64)] if blocks else [])
