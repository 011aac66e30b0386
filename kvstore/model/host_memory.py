"""Host memory of model work: freed memory kept for the next query, and the first query's allocations made at start.

A kv query allocates tens of megabytes and frees them when it ends: its assembled K and V (each ``[layers, heads,
tokens, head_dim]``; 17 MB apiece for five SQuAD paragraphs on SmolLM2) and the forward's activations. glibc's
malloc serves a request above its mmap threshold (128 KiB at start, raised by what is freed, up to 32 MiB) with a
mapping of its own that ``free`` unmaps, and hands a freed heap top above its trim threshold back to the kernel, so
a young process page-faults that memory in again, zero-filled, query after query: ~130,000 faults over the first 30
queries of a process, and the assembly took 50 ms on the first five queries against 6 ms once warm (measured on
the 2-core box, issue 33; docs/research/ttft-history.md). Fixing both thresholds keeps freed memory in the heap for
the next query; one query of the default shape at start (:func:`prime`) grows the heap of the thread that runs
queries, so the first user's query finds it grown.

Kept here rather than by preloading jemalloc or tcmalloc (PyTorch's CPU tuning guide): two ``mallopt`` calls need
no system package, no ``LD_PRELOAD`` and no re-exec of the server, and they are a no-op where glibc is absent.
"""

from __future__ import annotations

import ctypes
import logging
import sys

import torch

from kvstore.model.runner import Runner
from kvstore.types import BlockKV

log = logging.getLogger(__name__)

# glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling on 64-bit: a larger request is always a mapping of its own
TRIM_THRESHOLD = 256 << 20  # free heap top kept per arena: above a query's peak, bounded on a shared host

PRIME_QUESTION = "What does the first query of this server ask?"


def keep_freed_memory(trim_bytes: int = TRIM_THRESHOLD) -> bool:
    """Fix malloc's mmap threshold at its ceiling and its trim threshold at ``trim_bytes`` for this process.

    True when glibc took both; False elsewhere (another libc or platform), where nothing changes."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the libc this process already runs on
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    kept = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1 and mallopt(M_TRIM_THRESHOLD, trim_bytes) == 1
    if not kept:
        log.warning("malloc thresholds not set: a young process page-faults each query's memory in again")
    return kept


@torch.inference_mode()
def prime(runner: Runner, blocks: int, block_tokens: int) -> None:
    """One kv query of ``blocks`` full blocks, its result dropped: the allocations the first user's query would make.

    Run it on the thread that will run queries (malloc keeps one arena per thread). The KV is zeros: a forward's
    allocations depend on shapes, not values. Never longer than the model's positions allow a query to be, so a
    large setting cannot allocate more at start than any query could."""
    pk, _ = runner.prefix_kv  # [layers, heads, prefix, dim]
    question = runner.question_ids(PRIME_QUESTION)
    positions = getattr(runner.model.config.get_text_config(decoder=True), "max_position_embeddings", None)
    if positions:
        blocks = min(blocks, max(0, positions - pk.shape[2] - len(question) - 1) // block_tokens)
    if blocks <= 0:
        return
    shape = (runner.num_layers, runner.kv_heads, block_tokens, runner.head_dim)
    kv = [BlockKV(k=torch.zeros(shape, dtype=pk.dtype), v=torch.zeros(shape, dtype=pk.dtype)) for _ in range(blocks)]
    ctx = runner.assemble(kv, room=len(question) + 1)
    runner.prefill(ctx, question)
