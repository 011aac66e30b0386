"""Typed response models of the REST contract.

Every model allows extra fields, so a newer server that adds a field never breaks an older SDK.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "Model", "ApiKey", "Bank", "BankOptions", "Document", "DocumentInput", "PutResult", "Hit", "SearchFilter",
    "Retrieval", "Mode", "Eviction", "KeyRole", "QueryKnobs", "Timings",
    "Usage", "QueryResult", "TokenEvent", "DoneEvent", "StreamEvent", "Job", "Health", "ContextMap",
    "ContextMapItem", "ContextMapEdit", "ContextMapFeedback", "ContextMapEditResult", "ContextMapRefresh",
]


class Model(BaseModel):
    """Base of every response model: unknown fields are kept, not rejected."""

    model_config = ConfigDict(extra="allow", coerce_numbers_to_str=True)


Eviction = Literal["lru", "importance", "hybrid"]
KeyRole = Literal["read", "write", "owner", "admin"]
Mode = Literal["kv", "text"]


class BankOptions(BaseModel):
    """The settings ``banks.create`` and ``banks.update`` send; a field left None is not sent (the server's
    default applies, or the bank keeps its value). ``codec`` is a preset name (``auto``, ``fp16``, ``int8``,
    ``tklt5``, ... as the server's README lists them)."""

    model_config = ConfigDict(extra="forbid")

    codec: str | None = None
    # The server's bounds (its catalog's 64-bit and 32-bit columns), so a wrong value fails before it is sent.
    budget_bytes: int | None = Field(default=None, gt=0, le=2**63 - 1)
    max_blocks: int | None = Field(default=None, gt=0, le=2**31 - 1)
    eviction: Eviction | None = None
    context_map_budget_tokens: int | None = Field(default=None, ge=16, le=32768)

    def body(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class MaintenanceReport(Model):
    """What one ``banks.maintain`` run did."""

    bank: str
    expired_documents: list[str] = []
    repaired_merges: int = 0  # blocks an old near-duplicate merge had pointed at another block's KV, re-encoded
    rebound_model: bool = False
    reencoded: int = 0
    merged: int = 0  # blocks pointed at an older block's blob because their tokens are identical
    evicted: int = 0
    over_budget: bool = False  # pinned documents alone exceed the budget
    orphan_blobs_removed: int = 0
    session_orphan_blobs_removed: int = 0
    verify: dict[str, int] | None = None  # with ``rebuild=True``: the integrity check's counts


class ApiKey(Model):
    """An API key. ``key`` (the secret) is set only in the answer to ``keys.create``."""

    id: str
    prefix: str
    name: str | None = None
    agent: str | None = None
    role: str
    banks: list[str] = Field(default_factory=list)
    created_at: datetime | None = None
    key: str | None = None


class Bank(Model):
    """A bank's settings; ``banks.get``/``banks.update`` also fill the statistics fields."""

    name: str
    codec: str | None = None
    model: str | None = None
    model_fingerprint: str | None = None
    block_tokens: int | None = None
    budget_bytes: int | None = None
    max_blocks: int | None = None
    eviction: str | None = None
    created_at: datetime | None = None
    documents: int | None = None
    blocks: int | None = None
    tokens: int | None = None
    raw_bytes: int | None = None
    stored_bytes: int | None = None
    compression_ratio: float | None = None
    evictions: int | None = None
    merges: int | None = None
    reencodes: int | None = None
    tiers: dict[str, dict[str, int]] | None = None  # hot / warm / cold: {"blocks": n, "bytes": n}
    memory: dict[str, dict[str, int]] | None = None  # KV in server memory: blocks / map / sessions: entries, bytes
    quarantined_blocks: int | None = None
    index_entries: int | None = None
    context_map_budget_tokens: int | None = None


class Document(Model):
    """A stored document; ``text`` is only filled by ``documents.get``."""

    doc_id: str
    version: int
    metadata: dict[str, Any] = Field(default_factory=dict)
    tags: list[str] = Field(default_factory=list)
    agent: str | None = None
    pinned: bool = False
    blocks: int = 0
    tokens: int = 0
    content_hash: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    text: str | None = None


class DocumentInput(BaseModel):
    """One document of a batch ingest (``documents.put_many``)."""

    model_config = ConfigDict(extra="forbid")

    id: str
    text: str
    metadata: dict[str, Any] | None = None
    tags: list[str] | None = None
    pinned: bool | None = None


class PutResult(Model):
    """The outcome of writing one document: ``created`` (new id) and ``changed`` (new version)."""

    document: Document
    created: bool
    changed: bool


class Hit(Model):
    """One retrieved block."""

    doc_id: str
    block_id: int
    score: float
    text: str
    metadata: dict[str, Any] = Field(default_factory=dict)
    agent: str | None = None
    ordinal: int = 0


class SearchFilter(BaseModel):
    """Restricts search and query before top-k: agent, all of ``tags``, metadata equality per key."""

    model_config = ConfigDict(extra="forbid")

    agent: str | None = None
    tags: list[str] | None = None
    metadata: dict[str, Any] | None = None


Retrieval = Literal["embedding", "kv", "hybrid", "hybrid_kv"]


class QueryKnobs(BaseModel):
    """Optional query settings; a knob left unset is not sent, so the server's measured default applies.

    ``retrieval``: "embedding" | "kv" | "hybrid" | "hybrid_kv"; ``recompute``: share of context tokens whose KV
    is recomputed with full attention (0.0-1.0); ``compaction``: ``{"tau": float}`` or ``{"budget_tokens": int}``.
    """

    model_config = ConfigDict(extra="forbid")

    retrieval: Retrieval | None = None
    recompute: float | None = Field(default=None, ge=0.0, le=1.0)
    compaction: dict[str, int | float] | None = None

    def body(self) -> dict[str, Any]:
        """The request-body fields of the knobs that are set."""
        return self.model_dump(exclude_none=True)


class Timings(Model):
    """Milliseconds; ``ttft_ms`` runs from the server receiving the request to the first token."""

    retrieve_ms: float = 0.0
    load_ms: float = 0.0
    prefill_ms: float = 0.0
    ttft_ms: float = 0.0
    total_ms: float = 0.0


class Usage(Model):
    context_tokens: int = 0
    question_tokens: int = 0
    generated_tokens: int = 0
    map_prefill_tokens: int = 0  # context-map tokens prefilled for this query (0: its KV was cached)
    recomputed_tokens: int = 0  # context tokens whose KV was recomputed with full attention
    kept_tokens: int = 0  # context tokens the answer was generated from (after compaction)


class QueryResult(Model):
    """The answer to ``query``, with the blocks it was built from."""

    answer: str
    mode: str = "kv"
    sources: list[Hit] = Field(default_factory=list)
    timings: Timings = Field(default_factory=Timings)
    usage: Usage = Field(default_factory=Usage)


class TokenEvent(BaseModel):
    """A piece of generated text (streamed query)."""

    type: Literal["token"] = "token"
    text: str


class DoneEvent(BaseModel):
    """The last event of a streamed query: the full result."""

    type: Literal["done"] = "done"
    result: QueryResult


StreamEvent = TokenEvent | DoneEvent


class Job(Model):
    """A background job (a large batch ingest, a maintenance run): ``done`` of ``total`` (documents, or steps)
    with the current ``step``; ``result`` once succeeded, ``error`` once failed."""

    id: str
    kind: str | None = None
    bank: str | None = None
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"] | str
    total: int | None = None
    done: int | None = None
    step: str | None = None
    result: Any = None
    error: Any = None
    attempts: int | None = None  # runs started: above 1 the job was resumed after its server stopped
    cancel_requested: bool | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None

    @property
    def finished(self) -> bool:
        return self.status in ("succeeded", "failed", "cancelled")


class ContextMapItem(Model):
    """One item of a context map: ``id`` is cr-N (roadmap), cu-N (understanding) or rr-N (reusable_results)."""

    id: str
    section: str
    content: str
    helpful: int = 0
    harmful: int = 0
    score: float = 0.0
    agent: str | None = None
    stale: bool = False
    created_at: datetime | None = None
    updated_at: datetime | None = None
    pinned: bool = False  # an owner pinned it: no edit, refresh or eviction removes or replaces it


class ContextMap(Model):
    """A bank's context map at one version; ``tokens`` of the rendered map never exceed ``budget_tokens``."""

    version: int
    budget_tokens: int
    tokens: int
    frozen: bool = False
    items: list[ContextMapItem] = Field(default_factory=list)


class ContextMapEdit(BaseModel):
    """``add`` (section, content), ``replace`` (id, content) or ``delete`` (id)."""

    model_config = ConfigDict(extra="forbid")

    op: Literal["add", "replace", "delete"]
    id: str | None = None
    section: Literal["roadmap", "understanding", "reusable_results"] | None = None
    content: str | None = None


class ContextMapFeedback(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    tag: Literal["helpful", "harmful", "neutral", "stale"]


class ContextMapEditResult(Model):
    """The new version after edits, its tokens, the ids the budget evicted and what was applied."""

    version: int
    tokens: int
    evicted: list[str] = Field(default_factory=list)
    applied: list[dict[str, Any]] = Field(default_factory=list)


class ContextMapRefresh(Model):
    """What a refresh did: ``status`` applied | unchanged | unparseable | llm_error | nothing_to_distill."""

    status: str
    version: int
    tokens: int = 0
    records: int = 0
    llm: str | None = None
    applied: list[dict[str, Any]] = Field(default_factory=list)
    rejected: list[dict[str, Any]] = Field(default_factory=list)
    evicted: list[str] = Field(default_factory=list)
    error: str | None = None
    raw: str | None = None


class Health(Model):
    """The body of ``/healthz`` (whatever the server reports; ``status`` when it says one)."""

    status: str | None = None
