"""The context map's state and edits, pure (no catalog, no model): sections, items, the edit and feedback
shapes, applying changes, rendering and budgeted eviction. kvstore/contextmap/versions.py stores it; the refresh
(kvstore/contextmap/refresh.py) and the pin rules (kvstore/contextmap/pins.py) read it without importing the store.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from functools import partial
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kvstore.errors import Conflict, KVRagError, NotFound, ValidationFailed, VersionMismatch

Section = Literal["roadmap", "understanding", "reusable_results"]
SECTIONS: dict[str, str] = {"roadmap": "cr", "understanding": "cu", "reusable_results": "rr"}
SECTION_OF_PREFIX = {prefix: section for section, prefix in SECTIONS.items()}
ITEM_ID = re.compile(r"^(cr|cu|rr)-([1-9][0-9]{0,8})$")
DECAY = 0.85
MAX_CONTENT_CHARS = 1000
MAX_EDITS = 100
MIN_BUDGET, MAX_BUDGET = 16, 32768
HEADER = "Context map of this memory (what it holds and what earlier work found):\n"
RECENT_QUERIES = 20  # query records one refresh distills at most


# -- edits (the API's and the distiller's shape) --------------------------------------------------


class Edit(BaseModel):
    """add (section, content) | replace (id, content; section optional) | delete (id)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    op: Literal["add", "replace", "delete"]
    id: str | None = None
    section: Section | None = None
    content: str | None = Field(default=None, min_length=1, max_length=MAX_CONTENT_CHARS)

    @model_validator(mode="after")
    def _complete(self) -> Edit:
        if self.op == "add" and (self.section is None or self.content is None or self.id is not None):
            raise ValueError("add takes a section and content, and no id (ids are assigned)")
        if self.op == "replace" and (self.id is None or self.content is None):
            raise ValueError("replace takes an id and content")
        if self.op == "delete" and (self.id is None or self.content is not None):
            raise ValueError("delete takes an id and no content")
        if self.content is not None and not self.content.strip():
            raise ValueError("content must not be blank")
        return self


class Feedback(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    id: str
    tag: Literal["helpful", "harmful", "neutral", "stale"]


class Distilled(BaseModel):
    """What the distiller must answer: ``{"edits": [...], "feedback": [...]}`` (a bare list means edits)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    edits: list[Edit] = Field(default_factory=list, max_length=MAX_EDITS)
    feedback: list[Feedback] = Field(default_factory=list, max_length=MAX_EDITS)


def parse_edits(edits: Sequence[Edit | dict[str, Any]], feedback: Sequence[Feedback | dict[str, Any]]
                ) -> tuple[list[Edit], list[Feedback]]:
    """Validated edits and feedback; anything malformed is a ``ValidationFailed`` naming the entry."""
    if len(edits) > MAX_EDITS or len(feedback) > MAX_EDITS:
        raise ValidationFailed(f"at most {MAX_EDITS} edits and {MAX_EDITS} feedback entries per request")
    try:
        return ([e if isinstance(e, Edit) else Edit.model_validate(e) for e in edits],
                [f if isinstance(f, Feedback) else Feedback.model_validate(f) for f in feedback])
    except ValidationError as exc:
        raise ValidationFailed(f"invalid edit: {exc.errors()[0]['msg']}") from None


_FENCE = re.compile(r"^```(?:json)?\s*\n(.*)\n```$", re.DOTALL)


def parse_distilled(raw: str) -> Distilled:
    """The distiller's answer: one JSON value (optionally in a single code fence), nothing else; else ValueError."""
    text = raw.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1).strip()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if isinstance(data, list):
        data = {"edits": data}
    try:
        return Distilled.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ValueError(f"invalid edits at {'.'.join(str(p) for p in err['loc'])}: {err['msg']}") from None


# -- the map state (pure) -------------------------------------------------------------------------


@dataclass
class Item:
    id: str
    section: str
    content: str
    agent: str | None
    created_at: str  # ISO 8601 UTC: the items are stored as JSON
    updated_at: str
    rev: int  # the version that last set the content (base_version checks look at it)
    helpful: int = 0
    harmful: int = 0
    score: float = 0.0
    stale: bool = False
    pinned: bool = False  # set by an owner: no edit, refresh or eviction removes or replaces it (contextmap/pins.py)

    @property
    def number(self) -> int:
        return int(self.id.split("-", 1)[1])


@dataclass
class MapState:
    """The items of one map version (ordered by section, then id) and the id counters (never go back)."""

    items: dict[str, Item] = field(default_factory=dict)
    seq: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SECTIONS.values(), 0))
    budget_tokens: int = 1024

    def to_json(self) -> dict[str, Any]:
        return {"items": [asdict(i) for i in self.ordered()], "seq": dict(self.seq), "budget": self.budget_tokens}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MapState:
        items = {d["id"]: Item(**d) for d in data.get("items", [])}
        seq = {**dict.fromkeys(SECTIONS.values(), 0), **data.get("seq", {})}
        return cls(items=items, seq=seq, budget_tokens=int(data.get("budget", 1024)))

    def copy(self) -> MapState:
        return MapState({k: replace(v) for k, v in self.items.items()}, dict(self.seq), self.budget_tokens)

    def ordered(self) -> list[Item]:
        order = list(SECTIONS)
        return sorted(self.items.values(), key=lambda i: (order.index(i.section), i.number))


def render(state: MapState) -> str:
    """The text a query puts before its blocks (empty for an empty map)."""
    if not state.items:
        return ""
    lines = [HEADER]
    for section in SECTIONS:
        items = [i for i in state.ordered() if i.section == section]
        if items:
            lines.append(f"[{section}]\n")
            lines.extend(f"{i.id}: {' '.join(i.content.split())}\n" for i in items)
    return "".join(lines)


def evict(state: MapState, count_tokens: Callable[[str], int]) -> tuple[int, list[str]]:
    """Drop the lowest score, then the oldest item, until the rendered map fits; (tokens, evicted ids).
    Pinned items are never evicted (a budget must hold them: :func:`kvstore.contextmap.pins.check_pinned_fit`)."""
    evicted: list[str] = []
    tokens = count_tokens(render(state))
    while tokens > state.budget_tokens:
        candidates = [i for i in state.items.values() if not i.pinned]
        if not candidates:
            break
        victim = min(candidates, key=lambda i: (i.score, i.created_at, list(SECTIONS).index(i.section), i.number))
        del state.items[victim.id]
        evicted.append(victim.id)
        tokens = count_tokens(render(state))
    return tokens, evicted


@dataclass
class Applied:
    """The outcome of applying edits: the new state, what was applied, rejected (lenient mode) and evicted."""

    state: MapState
    tokens: int
    applied: list[dict[str, Any]]
    evicted: list[str]
    rejected: list[dict[str, Any]] = field(default_factory=list)


def _check_target(state: MapState, item_id: str, base_version: int | None) -> Item:
    """The item an edit or feedback names; stale bases are refused only for items changed since then."""
    if not ITEM_ID.fullmatch(item_id):
        raise ValidationFailed(f"{item_id!r} is not a context-map item id (cr-N, cu-N or rr-N)")
    item = state.items.get(item_id)
    if base_version is not None and (item is None or item.rev > base_version):
        raise VersionMismatch(f"item {item_id} changed after version {base_version}; re-read the map")
    if item is None:
        raise NotFound(f"context-map item {item_id} not found (deleted or evicted)")
    return item


def check_unpinned(item: Item) -> None:
    """An edit may not delete or replace a pinned item."""
    if item.pinned:
        raise Conflict(f"context-map item {item.id} is pinned; an owner must unpin it before it is changed")


def apply_changes(state: MapState, edits: Sequence[Edit], feedback: Sequence[Feedback], *, version: int,
                  current_version: int, base_version: int | None, agent: str | None, now: datetime,
                  count_tokens: Callable[[str], int], strict: bool = True, decay: bool = False) -> Applied:
    """Apply edits then feedback to a copy of ``state`` as version ``version``, then evict to the budget.

    strict (agent edits): any bad entry refuses the whole request. Lenient (refresh): bad entries are
    skipped and reported. A ``base_version`` older than ``current_version`` is accepted only for entries
    whose items are unchanged since it (adds always apply).
    """
    if base_version is not None and base_version > current_version:
        raise VersionMismatch(f"base_version {base_version} is newer than the map (version {current_version})")
    base = base_version if base_version is not None and base_version < current_version else None
    new = state.copy()
    stamp = now.isoformat()
    applied: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    if decay:
        for item in new.items.values():
            item.score = round(item.score * DECAY, 6)

    def attempt(entry: dict[str, Any], action: Callable[[], dict[str, Any]]) -> None:
        try:
            applied.append(action())
        except KVRagError as exc:
            if strict:
                raise
            rejected.append({**entry, "reason": exc.detail})

    for edit in edits:
        attempt(edit.model_dump(exclude_none=True),
                partial(_apply_edit, new, edit, version, base, agent, stamp, count_tokens))
    for fb in feedback:
        attempt(fb.model_dump(), partial(_apply_feedback, new, fb, base))
    tokens, evicted = evict(new, count_tokens)
    return Applied(new, tokens, applied, evicted, rejected)


def _apply_edit(state: MapState, edit: Edit, version: int, base: int | None, agent: str | None, stamp: str,
                count_tokens: Callable[[str], int]) -> dict[str, Any]:
    if edit.op == "add":
        assert edit.section is not None and edit.content is not None
        prefix = SECTIONS[edit.section]
        _check_fits(state, edit.section, edit.content, count_tokens)
        state.seq[prefix] += 1
        item = Item(id=f"{prefix}-{state.seq[prefix]}", section=edit.section, content=edit.content, agent=agent,
                    created_at=stamp, updated_at=stamp, rev=version)
        state.items[item.id] = item
        return {"op": "add", "id": item.id}
    assert edit.id is not None
    item = _check_target(state, edit.id, base)
    check_unpinned(item)
    if edit.op == "delete":
        del state.items[item.id]
        return {"op": "delete", "id": item.id}
    assert edit.content is not None
    if edit.section is not None and edit.section != item.section:
        raise ValidationFailed(f"item {item.id} is in section {item.section}, not {edit.section}")
    _check_fits(state, item.section, edit.content, count_tokens)
    item.content, item.agent, item.updated_at, item.rev, item.stale = edit.content, agent, stamp, version, False
    return {"op": "replace", "id": item.id}


def _apply_feedback(state: MapState, fb: Feedback, base: int | None) -> dict[str, Any]:
    item = _check_target(state, fb.id, base)
    if fb.tag == "helpful":
        item.helpful += 1
        item.score = round(item.score + 1, 6)
    elif fb.tag in ("harmful", "stale"):
        item.harmful += 1
        item.score = round(item.score - 1, 6)
        item.stale = item.stale or fb.tag == "stale"
    return {"op": "feedback", "id": item.id, "tag": fb.tag}


def _check_fits(state: MapState, section: str, content: str, count_tokens: Callable[[str], int]) -> None:
    """An item that could not fit even alone would only evict everything and then itself."""
    alone = MapState({"x": Item("cr-1", section, content, None, "", "", 0)}, budget_tokens=state.budget_tokens)
    if count_tokens(render(alone)) > state.budget_tokens:
        raise ValidationFailed(f"an item of {len(content)} characters does not fit the map's budget of "
                               f"{state.budget_tokens} tokens even alone")


def roadmap_entry(doc_id: str, text: str, max_chars: int = 160) -> str:
    """``<first sentence> (doc <id>)``: the bootstrap entry of a document."""
    flat = " ".join(text.split())
    match = re.match(r"(.+?[.!?])(\s|$)", flat)
    sentence = match.group(1) if match else flat
    if len(sentence) > max_chars:
        sentence = sentence[:max_chars - 3].rstrip() + "..."
    return f"{sentence} (doc {doc_id})"
