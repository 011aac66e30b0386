"""The engine's settings, read from the environment with the prefix ``KVRAG_``.

Only knobs the engine (``kvstore``) reads live here; the HTTP server's own (admin key, CORS, body limits, jobs,
MCP, ...) are ``server.settings.ServerSettings``, a subclass, so one object still configures a server process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

PACKAGED_LLM = "packaged:smollm2"
PACKAGED_EMBEDDER = "packaged:all-minilm-l6-v2"

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful assistant. Answer the question briefly, using only the passages the user gives."
)


class Settings(BaseSettings):
    """Configuration of one kvrag engine (a ``BankStore``, the CLI's offline commands)."""

    model_config = SettingsConfigDict(env_prefix="KVRAG_", extra="ignore")

    data_dir: Path = Field(default=Path("kvrag-data"), description="Where the catalog, blobs and indexes live.")
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL of the catalog; default: SQLite in the data dir."
    )
    migration_lock_timeout_s: float = Field(
        default=5.0, gt=0, description="PostgreSQL: longest one startup migration attempt waits for a lock another "
                                       "connection holds (e.g. a killed server's backend) before it is retried.")
    migration_timeout_s: float = Field(
        default=60.0, gt=0, description="PostgreSQL: how long startup migrations keep retrying lock timeouts "
                                        "before the start fails with `unavailable`.")
    blob_url: str | None = Field(
        default=None, description="Where blocks are stored: unset = files under the data dir; s3://BUCKET/PREFIX = "
                                  "an S3-compatible object store, configured by the AWS SDKs' variables "
                                  "(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION).")
    blob_cache_bytes: int = Field(
        default=4 << 30, ge=0, description="Object store only: byte budget of the on-disk cache of fetched blocks "
                                           "under the data dir (per blob store; 0 = no cache).")
    blob_allow_http: bool = Field(
        default=False, description="Object store only: allow a plain-HTTP AWS_ENDPOINT_URL that is not on loopback "
                                   "(loopback is always allowed; anything else needs HTTPS unless this is set).")
    replica_staleness_s: float = Field(
        default=1.0, gt=0, le=60, description="PostgreSQL catalog: longest a write acknowledged by another replica "
                                              "takes to become searchable here (LISTEN/NOTIFY on the op log, and a "
                                              "poll every half of this when a notification is lost).")
    replica_heartbeat_s: float = Field(
        default=5.0, gt=0, description="PostgreSQL catalog: how often a replica marks itself alive in the replica "
                                       "registry; one silent for 3 beats no longer counts at another's start.")
    replica_gap_s: float = Field(
        default=30.0, gt=0, description="PostgreSQL catalog: how long a missing op-log seq (a write committed out of "
                                        "order, or rolled back) is waited for before it is taken as rolled back.")
    model: str = Field(default=PACKAGED_LLM, description="LLM: the packaged SmolLM2 or a local HF model dir.")
    embedder: str = Field(default=PACKAGED_EMBEDDER, description="sentence-transformers model dir.")
    embedder_backend: Literal["onnx", "torch"] = Field(
        default="onnx", description="Runs the embedder's transformer: onnx (ONNX Runtime, exported once into the model "
                                    "cache and checked against torch at every start, which it falls back to) | torch.")
    model_cache_dir: Path | None = Field(
        default=None, description="Where converted model weights are cached; default: ~/.cache/kvrag/models."
    )
    device: str = Field(default="auto", description="auto | cpu | cuda")
    torch_threads: int = Field(default=0, description="torch intra-op threads; 0 = number of cores.")

    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    default_codec: Literal["auto", "fp16", "int8", "tklt5"] = Field(
        default="auto", description="Codec of a new bank's blocks (kvstore.codec.format.CHOOSABLE). auto: tklt5 "
                                    "for a model kvstore/codec/weights calibrates (the smallest blocks), else int8 (no "
                                    "calibration needed).")
    block_tokens: int = Field(default=256, ge=16, le=4096, description="Token budget of one KV block.")
    block_bias: float | None = Field(
        default=None, ge=-5.0, le=5.0,
        description="kv mode: logit bias of the question and answer on the keys of every assembled block but the "
                    "first (blocks are encoded apart, so each saw none of the others). Default: the per-layer "
                    "profile kvstore/model/attention_bias.py holds for the model, none for a model it has none for "
                    "(docs/research/parallel-encoding-bias.md). A value given here applies on every layer; 0 turns "
                    "it off.")
    encode_batch_size: int = Field(default=8, ge=1)
    max_document_chars: int = Field(default=200_000, ge=1)
    hot_tier_bytes: int = Field(default=1 << 30, ge=0, description="Byte budget of decoded blocks in RAM (within "
                                                                   "kv_memory_bytes).")
    kv_memory_bytes: int = Field(
        default=2 << 30, ge=0, description="One byte budget over every KV kept in memory: hot-tier blocks, context-map "
                                           "KV and agent sessions' live KV, least recently used of the bank holding "
                                           "the most out first; an evicted entry is recomputed when next needed.")
    kv_memory_bank_bytes: int | None = Field(
        default=None, ge=0, description="Optional cap of one bank's share of kv_memory_bytes. With banks x this <= "
                                        "kv_memory_bytes and hot_tier_bytes no bank's activity ever evicts another "
                                        "bank's KV or changes whether its new blocks are warmed at ingest.")
    hot_tier_on_ingest: bool = Field(
        default=True, description="Decode a new document's blocks into the hot tier's free room at ingest, so its "
                                  "first query loads none (the first touch's block decode leaves the time to first "
                                  "token).")
    prime_blocks: int = Field(
        default=5, ge=0, le=100, description="Full blocks of the kv query the store runs once at start, its answer "
                                             "dropped (the API's default k), so the first user's query finds the "
                                             "model thread's memory allocated (kvstore.model.host_memory); 0: none.")
    device_cache_bytes: int = Field(
        default=4 << 30, ge=0, description="CUDA only: byte budget of blocks kept on the GPU, so a block used "
                                           "again is not copied from host memory again.")

    max_metadata_bytes: int = 16 << 10
    max_k: int = 100
    max_new_tokens: int = 1024
    # Token caps of caller texts (kvstore/model/limits.py): over one, 413 payload_too_large before any model work.
    # SmolLM2 has 8,192 positions: a 512-token question leaves a kv query room for 20+ blocks of 256 and the
    # answer; a brief's 1,024-token task states a goal, not a document; an append of 2,048 tokens (8 pages) is a
    # long tool result, and a bigger one is stored as a document (up to max_document_chars) or appended in parts.
    max_question_tokens: int = Field(default=512, ge=1, le=32768, description="Longest question (query, chat).")
    max_task_tokens: int = Field(default=1024, ge=1, le=32768, description="Longest session brief task or goal.")
    max_segment_tokens: int = Field(default=2048, ge=1, le=32768, description="Longest session segment.")
    max_append_tokens: int = Field(default=2048, ge=1, le=65536,
                                   description="Most tokens of all segments of one session append.")
    batch_max_size: int = Field(
        default=8, ge=1, description="kv queries waiting for the model whose questions are prefilled and decoded "
                                     "together, at most; 1 turns batching off (every query runs alone).")

    context_map_budget_tokens: int = Field(
        default=1024, ge=16, le=32768, description="Token budget of a new bank's context map (rendered).")
    context_map_keep_queries: int = Field(
        default=200, ge=1, description="Recent queries kept per bank for context-map refreshes.")
    query_log_keep: int = Field(
        default=1000, ge=1, le=100_000, description="Answered queries kept per bank with their timings (the "
                                                     "console's recent-queries chart).")
    map_llm_url: str | None = Field(
        default=None, description="OpenAI-compatible chat endpoint (base URL or .../chat/completions) that "
                                  "refreshes context maps; default: the bank's local model.")
    map_llm_model: str = Field(default="default", description="`model` sent to KVRAG_MAP_LLM_URL.")
    map_llm_api_key: str | None = Field(default=None, description="Bearer token for KVRAG_MAP_LLM_URL.")
    map_llm_timeout_s: float = Field(default=120.0, gt=0, description="Timeout of one KVRAG_MAP_LLM_URL call.")
    map_llm_max_tokens: int = Field(default=512, ge=16, description="Longest answer a map refresh asks the LLM for.")
    context_map_refresh_max_removals: float = Field(
        default=0.25, ge=0.0, le=1.0,
        description="Share of the map's items one refresh may delete, replace or push out (evict) together, at "
                    "least one while it is above 0; the refresh's further ones are refused and reported (stored "
                    "text steers the distiller). Pinned items are never touched by a refresh.")
    session_prune_max_fraction: float = Field(
        default=0.5, gt=0.0, le=1.0,
        description="Share of a session's live segments one prune may drop (at least one); the rest the judge "
                    "or the attention named are kept and reported as held back.")
    session_prune_retention_s: float = Field(
        default=7 * 86400.0, ge=0.0,
        description="How long a pruned segment's KV is kept so that it can be restored "
                    "(POST .../sessions/{id}/restore); purged after (maintenance, or the session's next prune). "
                    "0 drops it at once.")

    default_retrieval: str = Field(
        default="hybrid", pattern="^(embedding|kv|hybrid|hybrid_kv)$",
        description="Retrieval of search and query: embedding | kv (embedding + KV-utility rerank) | hybrid "
                    "(embedding + BM25 rerank; the default, for its recall at little cost) | hybrid_kv (embedding + "
                    "BM25 + KV); docs/research/retrieval.md.")
    rerank_candidates: int = Field(default=20, ge=1, le=1000, description="FAISS candidates a rerank reorders.")
    kv_rerank_heads: str = Field(
        default="17.3,17.4,17.5,18.6",
        description="Query heads (layer.head) whose attention ranks blocks in kv retrieval, picked on SmolLM2-135M. "
                    "Heads the model lacks are dropped; with none left, every head of the "
                    "layer at 60% of the depth.")

    def resolved_database_url(self) -> str:
        """The catalog URL, defaulting to a SQLite file under the data dir."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'catalog.sqlite3').resolve()}"

    def resolved_model_cache_dir(self) -> Path:
        return self.model_cache_dir or (Path.home() / ".cache" / "kvrag" / "models")
