"""The engine's shared value types: what the facade returns and takes (banks, documents, hits, answers), and
the KV the parts hand each other (a block's KV, an assembled context).

One module so that the facade, the parts (model, codec, memory, sessions, context map) and the server share
one definition, and no part imports another (the model runner) only for a data class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: the value types stay importable without loading torch
    import torch
    from transformers import DynamicCache


@dataclass
class BankInfo:
    name: str
    codec: str
    model: str
    model_fingerprint: str
    block_tokens: int
    budget_bytes: int | None
    max_blocks: int | None
    eviction: str
    created_at: datetime


@dataclass
class BankStats:
    name: str
    documents: int
    blocks: int
    tokens: int
    raw_bytes: int
    stored_bytes: int
    compression_ratio: float
    budget_bytes: int | None
    max_blocks: int | None
    eviction: str
    evictions: int
    merges: int
    quarantined_blocks: int
    index_entries: int
    reencodes: int = 0
    tiers: dict[str, dict[str, int]] = field(default_factory=dict)  # hot / warm / cold: blocks and bytes
    # KV this bank holds in memory, per kind (blocks / map / sessions): entries and bytes (kvstore.memory.budget).
    memory: dict[str, dict[str, int]] = field(default_factory=dict)


@dataclass
class DocumentInfo:
    doc_id: str
    version: int
    metadata: dict[str, Any]
    tags: list[str]
    agent: str | None
    pinned: bool
    blocks: int
    tokens: int
    content_hash: str
    created_at: datetime
    updated_at: datetime
    text: str | None = None


@dataclass
class PutResult:
    document: DocumentInfo
    created: bool
    changed: bool


@dataclass
class SearchFilter:
    """Applied before top-k: agent equality, all tags present, metadata equality per key."""

    agent: str | None = None
    tags: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    def is_empty(self) -> bool:
        return self.agent is None and not self.tags and not self.metadata


@dataclass
class Hit:
    doc_id: str
    block_id: int
    score: float
    text: str
    metadata: dict[str, Any]
    agent: str | None
    ordinal: int


@dataclass
class Timings:
    retrieve_ms: float = 0.0
    load_ms: float = 0.0
    prefill_ms: float = 0.0
    ttft_ms: float = 0.0
    total_ms: float = 0.0


@dataclass
class Usage:
    context_tokens: int = 0
    question_tokens: int = 0
    generated_tokens: int = 0
    recomputed_tokens: int = 0  # context tokens whose KV was recomputed through every layer
    kept_tokens: int = 0  # context tokens the answer was generated from, after compaction
    map_prefill_tokens: int = 0  # context-map tokens prefilled for this query (0: its KV was cached)


@dataclass
class QueryResult:
    answer: str
    mode: str
    sources: list[Hit]
    timings: Timings
    usage: Usage


# -- KV the parts hand each other -------------------------------------------------------------------


@dataclass
class BlockKV:
    """KV of one block. k is pre-RoPE (position-free); v needs no positions."""

    k: torch.Tensor  # [layers, kv_heads, tokens, head_dim]
    v: torch.Tensor  # [layers, kv_heads, tokens, head_dim]
    key: str | None = None  # content address (blob id) when stored: what a GPU-resident copy is found by

    @property
    def tokens(self) -> int:
        return int(self.k.shape[2])

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()


@dataclass
class Context:
    """A KV cache ready for the question: prefix + context tokens, and the next free position."""

    cache: DynamicCache
    next_position: int
    context_tokens: int
    bias: torch.Tensor | None = None  # [rows] logit bias of the first cache rows for later queries (attention_bias)
    # [layers, rows] bool, True where a recompute made a row's KV at a layer what a text prefill gives: the bias
    # corrects KV that never saw the blocks before it, so such a row gets none at that layer (kvstore.model.recompute).
    exact: torch.Tensor | None = None
