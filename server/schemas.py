"""Request and response models of the REST contract (the SDK in ``client/`` mirrors these shapes).

Requests are strict and reject unknown fields, so a typo is a 422 rather than a silently ignored
option. Responses mirror the engine's dataclasses.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


# -- keys -----------------------------------------------------------------------------------------


class KeyCreate(Request):
    name: str = Field(min_length=1, max_length=128, examples=["ingest-bot"])
    agent: str = Field(min_length=1, max_length=128, examples=["agent-7"])
    role: Literal["read", "write", "admin"] = Field(examples=["write"])
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


class BankCreate(Request):
    model_config = ConfigDict(json_schema_extra={"examples": [{"name": "notes", "codec": "fp16",
                                                                "eviction": "lru"}]})

    name: str = Field(max_length=63, description="[a-z0-9][a-z0-9_-]{0,62}")
    codec: str | None = None
    budget_bytes: int | None = Field(default=None, gt=0)
    max_blocks: int | None = Field(default=None, gt=0)
    eviction: Literal["lru", "importance", "hybrid"] | None = None


class BankUpdate(Request):
    model_config = ConfigDict(json_schema_extra={"examples": [{"budget_bytes": 1 << 30}]})

    codec: str | None = None
    budget_bytes: int | None = Field(default=None, gt=0)
    max_blocks: int | None = Field(default=None, gt=0)
    eviction: Literal["lru", "importance", "hybrid"] | None = None


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
    id: str
    kind: str
    bank: str
    status: Literal["queued", "running", "succeeded", "failed"]
    total: int
    done: int
    result: dict[str, Any]
    error: str | None


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


class QueryIn(Request):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"question": "Who were the Normans?", "k": 5, "mode": "kv", "max_new_tokens": 64}]})

    question: str = Field(min_length=1)
    k: int = Field(default=5, ge=1, le=100)
    mode: Literal["kv", "text"] = "kv"
    max_new_tokens: int = Field(default=64, ge=0, le=1024)
    stream: bool = False
    filter: Filter | None = None


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


class QueryOut(BaseModel):
    answer: str
    mode: str
    sources: list[HitOut]
    timings: TimingsOut
    usage: UsageOut


class ErrorOut(BaseModel):
    detail: str
    code: str
    request_id: str | None


class Status(BaseModel):
    status: str
