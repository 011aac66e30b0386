"""Agent sessions in the SDK: ``client.sessions`` (sync) and ``AsyncKVRag.sessions`` (async).

A session is an agent's trajectory kept as KV on the server: the orchestrator appends segments (only the
new tokens are prefilled), workers get a task-compacted brief of it, and ``prune`` drops what the model
(or the recent briefs' attention) no longer needs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ._base import Call
from ._operations import _bank_path, _drop_none, _none, _seg
from .types import Hit, Model

if TYPE_CHECKING:
    from ._async_client import AsyncKVRag
    from ._client import KVRag

__all__ = ["Segment", "SegmentInput", "Session", "AppendResult", "BriefTimings", "BriefResult", "PruneResult",
           "Sessions", "AsyncSessions"]

Role = Literal["orchestrator", "tool", "worker", "note"]


class SegmentInput(BaseModel):
    """What to append: ``role`` orchestrator | tool | worker | note; ``agent`` defaults to the key's."""

    model_config = ConfigDict(extra="forbid")

    role: Role
    text: str
    agent: str | None = None


class Segment(Model):
    id: int
    role: str
    agent: str | None = None
    tokens: int = 0
    start: int = 0
    pruned: bool = False
    created_at: datetime | None = None
    text: str | None = None
    prune_reason: str | None = None


class Session(Model):
    """A session; ``tokens`` counts the live KV tokens (pruned segments not included)."""

    session_id: str
    bank: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    agent: str | None = None
    segments: list[Segment] = Field(default_factory=list)
    tokens: int = 0
    total_tokens: int = 0
    stored_bytes: int = 0
    created_at: datetime | None = None
    updated_at: datetime | None = None


class AppendResult(Model):
    session_id: str
    segment_ids: list[int]
    token_counts: list[int]
    tokens: int = 0
    prefill_ms: float = 0.0
    total_ms: float = 0.0


class BriefTimings(Model):
    load_ms: float = 0.0
    retrieve_ms: float = 0.0
    compaction_ms: float = 0.0
    prefill_ms: float = 0.0
    ttft_ms: float = 0.0
    total_ms: float = 0.0


class BriefResult(Model):
    """A worker's answer from the compacted trajectory: ``kept_tokens`` of ``session_tokens`` were used."""

    answer: str
    session_tokens: int = 0
    kept_tokens: int = 0
    document_tokens: int = 0
    task_tokens: int = 0
    generated_tokens: int = 0
    compaction_ms: float = 0.0
    timings: BriefTimings = Field(default_factory=BriefTimings)
    sources: list[Hit] = Field(default_factory=list)


class PruneResult(Model):
    policy: str
    pruned: list[int] = Field(default_factory=list)
    needed: list[int] = Field(default_factory=list)
    tokens_before: int = 0
    tokens_after: int = 0
    judge_ms: float = 0.0
    error: str | None = None


SegmentLike = SegmentInput | Mapping[str, Any]


def _path(bank: str, session_id: str | None = None) -> str:
    base = f"{_bank_path(bank)}/sessions"
    return base if session_id is None else f"{base}/{_seg(session_id)}"


def create_call(bank: str, session_id: str | None, metadata: Mapping[str, Any] | None) -> Call[Session]:
    body = _drop_none({"session_id": session_id, "metadata": None if metadata is None else dict(metadata)})
    return Call("POST", _path(bank), Session.model_validate, json=body)


def get_call(bank: str, session_id: str) -> Call[Session]:
    return Call("GET", _path(bank, session_id), Session.model_validate)


def delete_call(bank: str, session_id: str) -> Call[None]:
    return Call("DELETE", _path(bank, session_id), _none)


def append_call(bank: str, session_id: str, segments: Iterable[SegmentLike]) -> Call[AppendResult]:
    items = [(g if isinstance(g, SegmentInput) else SegmentInput.model_validate(dict(g))).model_dump(
        exclude_none=True) for g in segments]
    # Not idempotent: a resent append would add the segments twice.
    return Call("POST", f"{_path(bank, session_id)}/append", AppendResult.model_validate, json={"segments": items})


def brief_call(bank: str, session_id: str, task: str, budget_tokens: int | None, tau: float | None,
               include_documents: int | None, max_new_tokens: int | None,
               selection: str | None = None) -> Call[BriefResult]:
    body = _drop_none({"task": task, "budget_tokens": budget_tokens, "tau": tau, "selection": selection,
                       "include_documents": include_documents, "max_new_tokens": max_new_tokens})
    # A brief only reads the trajectory (it records attention statistics), so resending is harmless.
    return Call("POST", f"{_path(bank, session_id)}/brief", BriefResult.model_validate, json=body, idempotent=True)


def prune_call(bank: str, session_id: str, policy: str, goal: str | None, window: int | None,
               threshold: float | None) -> Call[PruneResult]:
    body = _drop_none({"policy": policy, "goal": goal, "window": window, "threshold": threshold})
    return Call("POST", f"{_path(bank, session_id)}/prune", PruneResult.model_validate, json=body)


class Sessions:
    """Agent sessions of a bank (sync)."""

    def __init__(self, client: KVRag) -> None:
        self._client = client

    def create(self, bank: str, session_id: str | None = None, *,
               metadata: Mapping[str, Any] | None = None) -> Session:
        """A new empty session (a random id when none is given)."""
        return self._client._call(create_call(bank, session_id, metadata))

    def append(self, bank: str, session_id: str, segments: Iterable[SegmentLike]) -> AppendResult:
        """Append segments ({role, text, agent?}); only their tokens are prefilled. Durable once it returns."""
        return self._client._call(append_call(bank, session_id, segments))

    def brief(self, bank: str, session_id: str, task: str, *, budget_tokens: int | None = None,
              tau: float | None = None, include_documents: int | None = None,
              max_new_tokens: int | None = None, selection: str | None = None) -> BriefResult:
        """Answer ``task`` from the trajectory compacted to what the task attends to (``selection``:
        ``"segments"``, the server's default, or ``"tokens"``)."""
        return self._client._call(brief_call(bank, session_id, task, budget_tokens, tau, include_documents,
                                             max_new_tokens, selection))

    def prune(self, bank: str, session_id: str, *, policy: str = "model", goal: str | None = None,
              window: int | None = None, threshold: float | None = None) -> PruneResult:
        """Drop the KV of segments no longer needed (``model`` or ``attention`` policy); text stays."""
        return self._client._call(prune_call(bank, session_id, policy, goal, window, threshold))

    def get(self, bank: str, session_id: str) -> Session:
        return self._client._call(get_call(bank, session_id))

    def delete(self, bank: str, session_id: str) -> None:
        self._client._call(delete_call(bank, session_id))


class AsyncSessions:
    """Agent sessions of a bank (async)."""

    def __init__(self, client: AsyncKVRag) -> None:
        self._client = client

    async def create(self, bank: str, session_id: str | None = None, *,
                     metadata: Mapping[str, Any] | None = None) -> Session:
        """A new empty session (a random id when none is given)."""
        return await self._client._call(create_call(bank, session_id, metadata))

    async def append(self, bank: str, session_id: str, segments: Iterable[SegmentLike]) -> AppendResult:
        """Append segments ({role, text, agent?}); only their tokens are prefilled. Durable once it returns."""
        return await self._client._call(append_call(bank, session_id, segments))

    async def brief(self, bank: str, session_id: str, task: str, *, budget_tokens: int | None = None,
                    tau: float | None = None, include_documents: int | None = None,
                    max_new_tokens: int | None = None, selection: str | None = None) -> BriefResult:
        """Answer ``task`` from the trajectory compacted to what the task attends to (``selection``:
        ``"segments"``, the server's default, or ``"tokens"``)."""
        return await self._client._call(brief_call(bank, session_id, task, budget_tokens, tau, include_documents,
                                                   max_new_tokens, selection))

    async def prune(self, bank: str, session_id: str, *, policy: str = "model", goal: str | None = None,
                    window: int | None = None, threshold: float | None = None) -> PruneResult:
        """Drop the KV of segments no longer needed (``model`` or ``attention`` policy); text stays."""
        return await self._client._call(prune_call(bank, session_id, policy, goal, window, threshold))

    async def get(self, bank: str, session_id: str) -> Session:
        return await self._client._call(get_call(bank, session_id))

    async def delete(self, bank: str, session_id: str) -> None:
        await self._client._call(delete_call(bank, session_id))
