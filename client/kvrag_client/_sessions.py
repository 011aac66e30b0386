"""Agent sessions in the SDK: the models and REST calls behind ``client.sessions``.

A session is an agent's trajectory kept as KV on the server: the orchestrator appends segments (only the
new tokens are prefilled), workers get a task-compacted brief of it, and ``prune`` drops what the model
(or the recent briefs' attention) no longer needs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from . import _ids as ids
from ._base import Call
from ._operations import _bank_path, _drop_none, _none
from .types import Hit, Model

__all__ = ["Segment", "SegmentInput", "Session", "AppendResult", "BriefTimings", "BriefResult", "PruneResult",
           "RestoreResult", "Role", "PrunePolicy", "Selection"]

Role = Literal["orchestrator", "tool", "worker", "note"]
PrunePolicy = Literal["model", "attention"]
Selection = Literal["segments", "tokens"]


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
    held_back: list[int] = Field(default_factory=list)  # left out by the judge but kept: one prune drops a share


class RestoreResult(Model):
    restored: list[int] = Field(default_factory=list)
    tokens: int = 0
    expired: list[int] = Field(default_factory=list)  # pruned longer ago than the server's retention: KV gone


SegmentLike = SegmentInput | Mapping[str, Any]


def _path(bank: str, session_id: str | None = None) -> str:
    base = f"{_bank_path(bank)}/sessions"
    return base if session_id is None else f"{base}/{ids.segment(ids.session_id(session_id))}"


def create_call(bank: str, session_id: str | None, metadata: Mapping[str, Any] | None) -> Call[Session]:
    sid = None if session_id is None else ids.session_id(session_id)
    body = _drop_none({"session_id": sid, "metadata": None if metadata is None else dict(metadata)})
    return Call("POST", _path(bank), Session.model_validate, json=body, keyed=True)


def get_call(bank: str, session_id: str) -> Call[Session]:
    return Call("GET", _path(bank, session_id), Session.model_validate)


def delete_call(bank: str, session_id: str) -> Call[None]:
    return Call("DELETE", _path(bank, session_id), _none, keyed=True)


def append_call(bank: str, session_id: str, segments: Iterable[SegmentLike]) -> Call[AppendResult]:
    items = [(g if isinstance(g, SegmentInput) else SegmentInput.model_validate(dict(g))).model_dump(
        exclude_none=True) for g in segments]
    # Not idempotent by itself (a resent append would add the segments twice): the Idempotency-Key makes the
    # server answer a resent one from its record.
    return Call("POST", f"{_path(bank, session_id)}/append", AppendResult.model_validate, json={"segments": items},
                keyed=True)


def brief_call(bank: str, session_id: str, task: str, budget_tokens: int | None, tau: float | None,
               include_documents: int | None, max_new_tokens: int | None,
               selection: Selection | None = None) -> Call[BriefResult]:
    body = _drop_none({"task": task, "budget_tokens": budget_tokens, "tau": tau, "selection": selection,
                       "include_documents": include_documents, "max_new_tokens": max_new_tokens})
    # A brief only reads the trajectory (it records attention statistics), so resending is harmless.
    return Call("POST", f"{_path(bank, session_id)}/brief", BriefResult.model_validate, json=body, idempotent=True)


def restore_call(bank: str, session_id: str, segments: Iterable[int] | None) -> Call[RestoreResult]:
    body = {} if segments is None else {"segments": [int(i) for i in segments]}
    return Call("POST", f"{_path(bank, session_id)}/restore", RestoreResult.model_validate, json=body, keyed=True)


def prune_call(bank: str, session_id: str, policy: PrunePolicy, goal: str | None, window: int | None,
               threshold: float | None) -> Call[PruneResult]:
    body = _drop_none({"policy": policy, "goal": goal, "window": window, "threshold": threshold})
    return Call("POST", f"{_path(bank, session_id)}/prune", PruneResult.model_validate, json=body, keyed=True)
