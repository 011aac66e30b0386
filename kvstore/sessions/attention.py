"""The attention record of a session's segments: the signal of the ``attention`` prune.

Each brief scores every trajectory token by the attention its task pays it; per segment that becomes a
share relative to an even share (1 / live segments, the attention sinks left out), appended to the
segment's record (the last ``ATTENTION_HISTORY`` kept). A segment whose recent shares are low is pruned.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from sqlalchemy import select
from sqlalchemy.orm import Session

from kvstore.model.compaction import KEEP_FIRST
from kvstore.sessions.livekv import SessionKV
from kvstore.sessions.values import ATTENTION_HISTORY
from kvstore.storage.session_tables import SessionSegmentRow


def segment_attention(scores: torch.Tensor, spans: Sequence[tuple[int, int]],
                      sinks: torch.Tensor | None = None) -> list[float]:
    """Per segment: its share of the task's attention over an even share of it (1 / live segments), so 1.0
    is an even share and the attention prune's default threshold 0.25 a quarter of one.

    ``scores: [tokens]`` is the attention each trajectory token got; spans are (first row, tokens).
    ``sinks`` (row indices: the first tokens, segment boundaries) are left out of every share: they soak
    up attention whatever the task and are always kept by a brief anyway.
    """
    live = [t for _, t in spans if t]
    if sinks is not None and sinks.numel():
        scores = scores.clone()
        scores[sinks] = 0.0
    total = float(scores.sum())
    if total <= 0 or not live:
        return [1.0 for _ in spans]
    return [float(scores[a:a + t].sum()) / total * len(live) if t else 0.0 for a, t in spans]


def sink_rows(state: SessionKV, scores: torch.Tensor) -> torch.Tensor:
    """Rows a brief always keeps (the first tokens, each segment's first token): left out of the shares."""
    rows = {*range(min(KEEP_FIRST, state.tokens)), *(a for a, t in state.spans if t)}
    return torch.tensor(sorted(rows), dtype=torch.long, device=scores.device)


def record_attention(s: Session, state: SessionKV, scores: torch.Tensor) -> None:
    """Append each live segment's share of ``scores: [tokens]`` (the task's attention per trajectory token) to
    its record, and commit."""
    relative = segment_attention(scores, state.spans, sink_rows(state, scores))
    rows = {g.id: g for g in s.scalars(select(SessionSegmentRow).where(
        SessionSegmentRow.id.in_(state.segment_ids)))}
    for seg_id, value in zip(state.segment_ids, relative, strict=True):
        if seg_id in rows:
            rows[seg_id].attention = [*(rows[seg_id].attention or []), round(value, 6)][-ATTENTION_HISTORY:]
    s.commit()


def low_attention(history: Sequence[float], window: int, threshold: float) -> bool:
    """Whether a segment's mean attention share (over an even share) in its last ``window`` briefs is below
    ``threshold``; a segment no brief has seen yet is never low (no evidence)."""
    recent = list(history)[-window:]
    return bool(recent) and sum(recent) / len(recent) < threshold


def least_attended_first(segments: Sequence[SessionSegmentRow], window: int) -> list[int]:
    """The row ids of ``segments`` ordered by their mean share over the last ``window`` briefs, then age."""
    mean = {g.id: sum((g.attention or [])[-window:]) / max(1, len((g.attention or [])[-window:])) for g in segments}
    return [g.id for g in sorted(segments, key=lambda g: (mean[g.id], g.ordinal))]
