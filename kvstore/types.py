"""The engine's public value types: what the facade returns and takes (banks, documents, hits, answers).

One module so that the facade, the parts (sessions, context map) and the server share one definition.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


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
