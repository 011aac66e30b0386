"""The HTTP server's settings: the engine's ``Settings`` plus the knobs only the server reads.

One object per app: ``server.app.create_app`` takes a ``ServerSettings`` and hands it, as the engine's
``Settings``, to the ``BankStore`` it opens, so the engine never sees a server-only field. Same ``KVRAG_``
environment variables as before the split, so a deployment's configuration is unchanged.
"""

from __future__ import annotations

from typing import Annotated
from urllib.parse import urlsplit

from pydantic import Field, field_validator
from pydantic_settings import NoDecode

from kvstore.config import Settings


class ServerSettings(Settings):
    """Configuration of one kvrag server process (the engine's knobs included)."""

    admin_key: str | None = Field(default=None, description="Root API key; without it only loopback binds.")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Web origins (scheme://host[:port], comma-separated) whose pages may call the API: they pass "
                    "the Origin check and get CORS answers. Default none: no CORS, and a request from another "
                    "origin's page is refused (server/browser.py). `*` only with an admin key.")
    max_body_bytes: int = 8 << 20
    oversize_drain_bytes: int = Field(
        default=64 << 20, ge=0, description="After answering 413 to an oversize body, read and drop up to this "
                                            "much of it before closing, so the client is not reset before it "
                                            "reads the answer.")
    oversize_drain_s: float = Field(default=30.0, ge=0, description="How long that draining may take at most.")
    max_json_depth: int = 32
    queue_size: int = Field(default=32, ge=1, description="Model work waiting beyond this answers 503.")
    batch_job_threshold: int = Field(default=16, ge=1, description="Batches larger than this become jobs.")
    job_lease_s: float = Field(
        default=30.0, gt=0, description="A running job's lease: renewed every third of it while the job runs; "
                                        "one not renewed this long (its server died) is resumed by any server.")
    job_poll_s: float = Field(default=0.5, gt=0, description="How often an idle server looks for queued jobs.")
    job_max_attempts: int = Field(
        default=3, ge=1, description="Runs a job may start; one whose server died this often fails with that "
                                     "reason instead of being resumed again.")
    jobs_per_key: int = Field(
        default=16, ge=1, description="Queued plus running jobs one key may have; beyond, a new one is a 429.")
    job_retention_s: float = Field(
        default=7 * 86400.0, gt=0, description="Finished jobs (and their results) are purged after this long.")
    job_stop_grace_s: float = Field(
        default=20.0, ge=0, description="At shutdown, how long the running job's current step may take to end "
                                        "before the job is handed back to the queue anyway (it resumes at "
                                        "the next start, or on another server).")
    idempotency_ttl_s: float = Field(
        default=86400.0, gt=0, description="How long an Idempotency-Key's answer is kept for retries (24 h); older "
                                           "records are ignored and purged.")
    retry_after_s: int = Field(default=1, ge=1, description="Retry-After (seconds) sent with 429 and 503 answers.")
    mcp_sessions_per_key: int = Field(
        default=100, ge=1, description="MCP sessions one key may hold open on /mcp/{bank}; beyond, opening one is a "
                                       "429 (the MCP SDK's table of 10,000 sessions is shared by every key).")
    mcp_session_idle_s: float = Field(
        default=1800.0, gt=0, description="An MCP session with no request in flight this long is closed.")
    openai_default_bank: str | None = Field(
        default=None, description="Bank of /v1/chat/completions when `model` is not `kvrag:<bank>`.")
    console_session_idle_s: int = Field(
        default=8 * 3600, ge=60, description="A console login ends after this long without a request.")

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        return [part.strip() for part in value.split(",") if part.strip()] if isinstance(value, str) else value

    @field_validator("cors_origins")
    @classmethod
    def _check_origins(cls, origins: list[str]) -> list[str]:
        for origin in origins:
            parts = urlsplit(origin)
            if origin != "*" and (parts.scheme not in ("http", "https") or not parts.netloc
                                  or parts.path.strip("/") or parts.query or parts.fragment):
                raise ValueError(f"{origin!r} is not an origin (scheme://host[:port]) or *")
        return [origin.rstrip("/") for origin in origins]
