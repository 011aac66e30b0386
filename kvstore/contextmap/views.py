"""What the context-map part returns: the map as read, its versions as listed, and the outcome of its writes.

Plain dataclasses, no catalog and no model, so the server and the CLI read them without importing the store.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from kvstore.contextmap.state import MapState


@dataclass
class MapItem:
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
    pinned: bool = False


@dataclass
class MapView:
    version: int
    budget_tokens: int
    tokens: int
    frozen: bool
    items: list[MapItem]


@dataclass
class MapVersionInfo:
    """One version of a map as listed: what changed it, by whom, and its size."""

    version: int
    change: str
    tokens: int
    items: int
    evicted: list[str]
    agent: str | None
    created_at: datetime


@dataclass
class EditResult:
    version: int
    tokens: int
    evicted: list[str]
    applied: list[dict[str, Any]]


@dataclass
class RefreshReport:
    """What a refresh did. status: applied | unchanged | unparseable | llm_error | nothing_to_distill."""

    status: str
    version: int
    tokens: int
    records: int
    llm: str
    applied: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    evicted: list[str] = field(default_factory=list)
    error: str | None = None
    raw: str | None = None


def item_views(state: MapState) -> list[MapItem]:
    """The items of ``state`` in map order, as the API shows them."""
    return [MapItem(id=i.id, section=i.section, content=i.content, helpful=i.helpful, harmful=i.harmful,
                    score=i.score, agent=i.agent, stale=i.stale, created_at=datetime.fromisoformat(i.created_at),
                    updated_at=datetime.fromisoformat(i.updated_at), pinned=i.pinned) for i in state.ordered()]
