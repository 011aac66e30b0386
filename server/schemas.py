"""Request and response models of the REST contract (the SDK in ``client/`` mirrors these shapes).

Requests are strict and reject unknown fields, so a typo is a 422 rather than a silently ignored
option. Responses mirror the engine's dataclasses.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kvstore.storage.bank_settings import MAX_BLOCKS, MAX_BUDGET_BYTES


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


# -- keys -----------------------------------------------------------------------------------------


class KeyCreate(Request):
    name: str = Field(min_length=1, max_length=128, examples=["ingest-bot"])
    agent: str = Field(min_length=1, max_length=128, examples=["agent-7"])
    role: Literal["read", "write", "owner", "admin"] = Field(
        examples=["write"], description="read < write < owner < admin (docs/RELIABILITY.md, role table).")
    banks: list[str] = Field(min_length=1, max_length=1000, examples=[["notes"], ["*"]])


class KeyOut(BaseModel):
    id: str
    prefix: str
    name: str
    agent: str
    role: str
    banks: list[str]
    created_at: datetime


class KeyCreated(KeyOut):
    key: str = Field(description="The secret. Shown only in this answer; only a prefix and a hash are stored.")


class KeyList(BaseModel):
    keys: list[KeyOut]


# -- banks ----------------------------------------------------------------------------------------


# kvstore.codec.format.CHOOSABLE: the only codecs a bank may newly choose (others stay decodable).
CodecChoice = Literal["auto", "fp16", "int8", "tklt5"]


class BankCreate(Request):
    model_config = ConfigDict(json_schema_extra={"examples": [{"name": "notes", "codec": "fp16",
                                                                "eviction": "lru"}]})

    name: str = Field(max_length=63, description="[a-z0-9][a-z0-9_-]{0,62}")
    codec: CodecChoice | None = Field(default=None, description="Codec of the bank's new blocks; auto or "
                                                                "omitted: the server's default for its model "
                                                                "(tklt5 where calibrated, else int8).")
    budget_bytes: int | None = Field(default=None, gt=0, le=MAX_BUDGET_BYTES)
    max_blocks: int | None = Field(default=None, gt=0, le=MAX_BLOCKS)
    eviction: Literal["lru", "importance", "hybrid"] | None = None
    context_map_budget_tokens: int | None = Field(default=None, ge=16, le=32768,
                                                  description="Token budget of the bank's context map.")


class BankUpdate(Request):
    model_config = ConfigDict(json_schema_extra={"examples": [{"budget_bytes": 1 << 30}]})

    codec: CodecChoice | None = None
    budget_bytes: int | None = Field(default=None, gt=0, le=MAX_BUDGET_BYTES)
    max_blocks: int | None = Field(default=None, gt=0, le=MAX_BLOCKS)
    eviction: Literal["lru", "importance", "hybrid"] | None = None
    context_map_budget_tokens: int | None = Field(default=None, ge=16, le=32768)


class BankOut(BaseModel):
    name: str
    codec: str
    model: str
    model_fingerprint: str
    block_tokens: int
    budget_bytes: int | None
    max_blocks: int | None
    eviction: str
    created_at: datetime
    context_map_budget_tokens: int | None = None


class BankDetail(BankOut):
    documents: int
    blocks: int
    tokens: int
    raw_bytes: int
    stored_bytes: int
    compression_ratio: float
    evictions: int
    merges: int
    quarantined_blocks: int
    index_entries: int
    reencodes: int = 0
    tiers: dict[str, dict[str, int]] = Field(
        default_factory=dict, description="hot / warm / cold tiers, each with its blocks and bytes")
    memory: dict[str, dict[str, int]] = Field(
        default_factory=dict, description="KV this bank holds in memory, per kind (blocks: the hot tier, map: the "
                                          "context map's KV, sessions: agent sessions' live KV), each with its "
                                          "entries and bytes; within KVRAG_KV_MEMORY_BYTES")


class BankList(BaseModel):
    banks: list[BankOut]


# -- documents ------------------------------------------------------------------------------------


class DocumentPut(Request):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"text": "The Normans gave their name to Normandy.", "metadata": {"source": "wiki"}, "tags": ["history"]}]})

    text: str
    metadata: dict[str, Any] | None = None
    tags: list[str] | None = None
    pinned: bool = False


class DocumentItem(DocumentPut):
    id: str


class DocumentBatch(Request):
    documents: list[DocumentItem] = Field(min_length=1, max_length=10_000)


class DocumentOut(BaseModel):
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


class DocumentFull(DocumentOut):
    text: str


class PutOut(BaseModel):
    document: DocumentOut
    created: bool
    changed: bool


class BatchOut(BaseModel):
    results: list[PutOut]


class JobAccepted(BaseModel):
    job_id: str
    status: str


class DocumentPage(BaseModel):
    documents: list[DocumentOut]
    next_cursor: str | None


class JobOut(BaseModel):
    """A durable job: ``done`` of ``total`` (documents of an ingest, steps of a maintenance run) with the current
    ``step``; the ``result`` once it succeeded, the ``error`` (and any partial result) once it failed."""

    id: str
    kind: str
    bank: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    total: int
    done: int
    step: str | None = None
    result: dict[str, Any]
    error: str | None
    attempts: int = Field(default=0, description="Runs started; above 1 the job was resumed after a stop.")
    cancel_requested: bool = False
    created_at: datetime | None = None
    updated_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None


class JobPage(BaseModel):
    jobs: list[JobOut]
    next_cursor: str | None


# -- retrieval ------------------------------------------------------------------------------------


class Filter(Request):
    agent: str | None = None
    tags: list[str] | None = None
    metadata: dict[str, Any] | None = None


class SearchIn(Request):
    model_config = ConfigDict(json_schema_extra={"examples": [{"query": "Who were the Normans?", "k": 5}]})

    query: str = Field(min_length=1)
    k: int = Field(default=5, ge=1, le=100)
    filter: Filter | None = None
    retrieval: Literal["embedding", "kv", "hybrid", "hybrid_kv"] | None = Field(
        default=None, description="embedding; or a rerank of the embedding's candidates: kv (by the attention the "
                                  "question's queries pay each block's stored keys), hybrid (by BM25), hybrid_kv "
                                  "(both); default: the server's KVRAG_DEFAULT_RETRIEVAL.")


class HitOut(BaseModel):
    doc_id: str
    block_id: int
    score: float
    text: str
    metadata: dict[str, Any]
    agent: str | None
    ordinal: int


class SearchOut(BaseModel):
    hits: list[HitOut]


class Compaction(Request):
    tau: float | None = Field(default=None, description="Keep tokens scoring above median + tau * MAD.")
    budget_tokens: int | None = Field(default=None, ge=1, description="Keep at most this many context tokens.")


class QueryIn(Request):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"question": "Who were the Normans?", "k": 5, "mode": "kv", "max_new_tokens": 64}]})

    question: str = Field(min_length=1)
    k: int = Field(default=5, ge=1, le=100)
    mode: Literal["kv", "text"] = "kv"
    max_new_tokens: int = Field(default=64, ge=0, le=1024)
    stream: bool = False
    filter: Filter | None = None
    context_map: bool = Field(default=False, description="Put the bank's context map before the blocks.")
    retrieval: Literal["embedding", "kv", "hybrid", "hybrid_kv"] | None = Field(
        default=None, description="How blocks are picked (see search); default: KVRAG_DEFAULT_RETRIEVAL.")
    recompute: float | None = Field(
        default=None, ge=0.0, le=1.0,
        description="kv mode: share of context tokens whose KV is recomputed with full attention (CacheBlend); "
                    "default per device (0.0 on CPU).")
    compaction: Compaction | None = Field(
        default=None, description="kv mode: keep only the context tokens the question attends to (Latent Briefing).")


class TimingsOut(BaseModel):
    retrieve_ms: float
    load_ms: float
    prefill_ms: float
    ttft_ms: float
    total_ms: float


class UsageOut(BaseModel):
    context_tokens: int
    question_tokens: int
    generated_tokens: int
    map_prefill_tokens: int = Field(default=0, description="Context-map tokens prefilled (0: its KV was cached).")
    recomputed_tokens: int = Field(default=0, description="Context tokens whose KV was recomputed.")
    kept_tokens: int = Field(default=0, description="Context tokens the answer was generated from (after compaction).")


class QueryOut(BaseModel):
    answer: str
    mode: str
    sources: list[HitOut]
    timings: TimingsOut
    usage: UsageOut


# -- context map ----------------------------------------------------------------------------------


class MapEditIn(Request):
    op: Literal["add", "replace", "delete"]
    id: str | None = Field(default=None, max_length=16, description="cr-N, cu-N or rr-N (replace, delete)")
    section: Literal["roadmap", "understanding", "reusable_results"] | None = None
    content: str | None = Field(default=None, min_length=1, max_length=1000)


class MapFeedbackIn(Request):
    id: str = Field(max_length=16)
    tag: Literal["helpful", "harmful", "neutral", "stale"]


class MapEditsIn(Request):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "base_version": 3, "edits": [{"op": "add", "section": "understanding", "content": "Dates are AD."},
                                     {"op": "replace", "id": "cr-2", "content": "p002: Norman conquest"}],
        "feedback": [{"id": "cu-1", "tag": "helpful"}]}]})

    base_version: int | None = Field(default=None, ge=0, description="The version the edits are based on.")
    edits: list[MapEditIn] = Field(default_factory=list, max_length=100)
    feedback: list[MapFeedbackIn] = Field(default_factory=list, max_length=100)


class MapUpdate(Request):
    model_config = ConfigDict(json_schema_extra={"examples": [{"frozen": True}, {"budget_tokens": 512}]})

    frozen: bool | None = None
    budget_tokens: int | None = Field(default=None, ge=16, le=32768)


class MapItemOut(BaseModel):
    id: str
    section: str
    content: str
    helpful: int
    harmful: int
    score: float
    agent: str | None
    stale: bool
    created_at: datetime
    updated_at: datetime
    pinned: bool = Field(default=False, description="Pinned by an owner: no edit, refresh or eviction removes it.")


class ContextMapOut(BaseModel):
    version: int
    budget_tokens: int
    tokens: int = Field(description="Tokens of the rendered map (the bank model's tokenizer).")
    frozen: bool
    items: list[MapItemOut]


class MapEditsOut(BaseModel):
    version: int
    tokens: int
    evicted: list[str]
    applied: list[dict[str, Any]]


class MapRefreshOut(BaseModel):
    status: Literal["applied", "unchanged", "unparseable", "llm_error", "nothing_to_distill"]
    version: int
    tokens: int
    records: int = Field(description="Query records distilled.")
    llm: str
    applied: list[dict[str, Any]]
    rejected: list[dict[str, Any]]
    evicted: list[str]
    error: str | None
    raw: str | None = Field(description="The start of the LLM's answer when it did not parse.")


class ErrorOut(BaseModel):
    detail: str
    code: str
    request_id: str | None


class Status(BaseModel):
    status: str


# -- sessions -------------------------------------------------------------------------------------


class SessionCreate(Request):
    model_config = ConfigDict(json_schema_extra={"examples": [{"session_id": "run-42", "metadata": {"goal": "x"}}]})

    session_id: str | None = Field(default=None, max_length=128, description="[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
    metadata: dict[str, Any] | None = None


class SegmentIn(Request):
    role: Literal["orchestrator", "tool", "worker", "note"]
    text: str = Field(min_length=1)
    agent: str | None = Field(default=None, max_length=128,
                              description="The writing key's agent (the default); another one is refused.")


class AppendIn(Request):
    model_config = ConfigDict(json_schema_extra={"examples": [{"segments": [
        {"role": "tool", "text": "The Normans gave their name to Normandy."},
        {"role": "note", "text": "Normandy matters for the next step."}]}]})

    segments: list[SegmentIn] = Field(min_length=1, max_length=256)


class SegmentOut(BaseModel):
    id: int
    role: str
    agent: str | None
    tokens: int
    start: int
    pruned: bool
    created_at: datetime
    text: str | None = None
    prune_reason: str | None = None


class SessionOut(BaseModel):
    session_id: str
    bank: str
    metadata: dict[str, Any]
    agent: str | None
    segments: list[SegmentOut]
    tokens: int = Field(description="Live KV tokens (pruned segments not counted).")
    total_tokens: int
    stored_bytes: int
    created_at: datetime
    updated_at: datetime


class AppendOut(BaseModel):
    session_id: str
    segment_ids: list[int]
    token_counts: list[int]
    tokens: int
    prefill_ms: float
    total_ms: float


class BriefIn(Request):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"task": "When did the Normans reach Italy?", "budget_tokens": 256, "max_new_tokens": 32}]})

    task: str = Field(min_length=1)
    budget_tokens: int | None = Field(default=None, ge=0, description="Keep at most this many trajectory tokens.")
    tau: float | None = Field(default=None, description="Keep tokens scoring above median + tau * MAD.")
    selection: Literal["segments", "tokens"] = Field(
        default="segments", description="Spend the budget on whole segments by attention density, then the best "
                                        "chunks (segments), or on the best tokens one by one (tokens).")
    include_documents: int = Field(default=0, ge=0, le=100, description="Add the top-k bank blocks' KV.")
    max_new_tokens: int = Field(default=64, ge=0, le=1024)
    stream: bool = False


class BriefTimingsOut(BaseModel):
    load_ms: float
    retrieve_ms: float
    compaction_ms: float
    prefill_ms: float
    ttft_ms: float
    total_ms: float


class BriefOut(BaseModel):
    answer: str
    session_tokens: int
    kept_tokens: int
    document_tokens: int
    task_tokens: int
    generated_tokens: int
    compaction_ms: float
    timings: BriefTimingsOut
    sources: list[HitOut]


class PruneIn(Request):
    model_config = ConfigDict(json_schema_extra={"examples": [{"goal": "answer the user's Normans question",
                                                                "policy": "model"}]})

    goal: str | None = None
    policy: Literal["model", "attention"] = "model"
    window: int = Field(default=16, ge=1, le=64, description="attention: how many recent briefs count.")
    threshold: float = Field(default=0.25, ge=0, description="attention: below this share of an even share.")


class PruneOut(BaseModel):
    policy: str
    pruned: list[int]
    needed: list[int]
    tokens_before: int
    tokens_after: int
    judge_ms: float
    error: str | None
    held_back: list[int] = Field(default_factory=list, description=(
        "Segments the judge or the attention left out but this prune kept: one prune drops at most "
        "KVRAG_SESSION_PRUNE_MAX_FRACTION of the live segments."))


class RestoreIn(Request):
    model_config = ConfigDict(json_schema_extra={"examples": [{"segments": [2, 3]}, {}]})

    segments: list[Annotated[int, Field(ge=0, le=2**31 - 1)]] | None = Field(default=None, max_length=10_000,
                                       description="Segment ids to restore; default: every restorable one.")


class RestoreOut(BaseModel):
    restored: list[int] = Field(description="Segments made live again by this call.")
    tokens: int = Field(description="Live KV tokens after it.")
    expired: list[int] = Field(description="Pruned longer ago than KVRAG_SESSION_PRUNE_RETENTION_S: KV gone.")
