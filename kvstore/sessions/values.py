"""What the session part takes and returns: segment roles, session ids, and the result shapes of its calls.

Plain dataclasses, no catalog and no model, so the server and every module of the part read them without
importing the store.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from kvstore.types import Hit

ROLES = ("orchestrator", "tool", "worker", "note")
SESSION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
MAX_SEGMENTS_PER_APPEND = 256
ATTENTION_HISTORY = 64  # per-segment brief records kept; the attention prune looks at the last ``window``

Role = Literal["orchestrator", "tool", "worker", "note"]
PrunePolicy = Literal["model", "attention"]


def ms(seconds: float) -> float:
    """A duration in milliseconds, rounded to the microsecond, as every timing in a result is given."""
    return round(seconds * 1000.0, 3)


@dataclass
class SegmentInput:
    """What an agent appends: ``role`` is one of ROLES; ``agent`` defaults to the writer's."""

    role: str
    text: str
    agent: str | None = None


@dataclass
class SegmentInfo:
    id: int
    role: str
    agent: str | None
    tokens: int
    start: int
    pruned: bool
    created_at: datetime
    text: str | None = None
    prune_reason: str | None = None


@dataclass
class SessionInfo:
    session_id: str
    bank: str
    metadata: dict[str, Any]
    agent: str | None
    segments: list[SegmentInfo]
    tokens: int  # live KV tokens (pruned segments not counted)
    total_tokens: int  # every token ever appended
    stored_bytes: int
    created_at: datetime
    updated_at: datetime


@dataclass
class SessionSummary:
    """A session as listed: its segments counted (kept and pruned) without their text."""

    session_id: str
    agent: str | None
    segments: int
    pruned_segments: int
    tokens: int  # live KV tokens
    total_tokens: int
    created_at: datetime
    updated_at: datetime


@dataclass
class AppendResult:
    session_id: str
    segment_ids: list[int]
    token_counts: list[int]
    tokens: int  # live KV tokens after the append
    prefill_ms: float
    total_ms: float


@dataclass
class BriefTimings:
    load_ms: float = 0.0
    retrieve_ms: float = 0.0
    compaction_ms: float = 0.0
    prefill_ms: float = 0.0
    ttft_ms: float = 0.0
    total_ms: float = 0.0


@dataclass
class BriefResult:
    answer: str
    session_tokens: int  # live trajectory tokens before compaction
    kept_tokens: int  # trajectory tokens the worker got
    document_tokens: int
    task_tokens: int
    generated_tokens: int
    compaction_ms: float
    timings: BriefTimings
    sources: list[Hit] = field(default_factory=list)


@dataclass
class PruneResult:
    policy: str
    pruned: list[int]  # segment ids whose KV was dropped by this call
    needed: list[int]  # segment ids kept (model: named by the judge; attention: at or above the threshold)
    tokens_before: int
    tokens_after: int
    judge_ms: float = 0.0
    error: str | None = None  # the judge's answer was unusable: nothing was pruned
    held_back: list[int] = field(default_factory=list)  # left out by the judge/attention, kept by the prune bound
