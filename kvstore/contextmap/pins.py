"""Limits on what automation may do to a context map: pins, and a bound on one refresh's removals.

A refresh turns recorded questions (any read key's) into edits, so stored text can steer it: hostile
questions could make it delete or rewrite the whole map. Two defences (docs/RELIABILITY.md, hole 6):

- **Pins.** An owner pins an item (``POST .../context-map/items/{id}/pin``); no edit, refresh or eviction
  removes or replaces a pinned item until it is unpinned. Edits naming one are refused (409), a
  refresh's are skipped and reported, and eviction passes over it (a budget the pinned items alone
  exceed is refused).
- **Bound.** One refresh deletes, replaces or pushes out (evicts, by its adds) at most
  ``context_map_refresh_max_removals`` of the map's items (at least one while that is above 0); its
  further deletes and replaces are refused and reported, and its last adds are dropped while they would
  evict beyond it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from kvstore.errors import NotFound, ValidationFailed

if TYPE_CHECKING:
    from kvstore.contextmap.state import Applied, Edit, MapState


def set_pinned(state: MapState, item_id: str, pinned: bool) -> bool:
    """Pin or unpin ``item_id`` in ``state``; whether anything changed."""
    from kvstore.contextmap.state import ITEM_ID

    if not isinstance(item_id, str) or not ITEM_ID.fullmatch(item_id):
        raise ValidationFailed(f"{item_id!r} is not a context-map item id (cr-N, cu-N or rr-N)")
    item = state.items.get(item_id)
    if item is None:
        raise NotFound(f"context-map item {item_id} not found (deleted or evicted)")
    if item.pinned == pinned:
        return False
    item.pinned = pinned
    return True


def check_pinned_fit(state: MapState, budget: int, count_tokens: Callable[[str], int]) -> None:
    """A budget must hold the pinned items: eviction never removes them."""
    from kvstore.contextmap.state import MapState as State
    from kvstore.contextmap.state import render

    pinned = State({k: v for k, v in state.items.items() if v.pinned}, budget_tokens=budget)
    need = count_tokens(render(pinned)) if pinned.items else 0
    if need > budget:
        raise ValidationFailed(f"the pinned items alone need {need} tokens, more than a budget of {budget}; "
                               "unpin some first")


def removal_allowance(items: int, share: float) -> int:
    """How many items one refresh may delete, replace or evict: ``share`` of them, at least one unless 0."""
    if share <= 0:
        return 0
    return max(1, math.floor(share * items))


def screen_refresh(state: MapState, edits: Sequence[Edit], allowance: int
                   ) -> tuple[list[Edit], list[dict[str, Any]]]:
    """The refresh's edits that may go ahead, and the refused ones with a reason: deletes and replaces of
    pinned items, and those beyond ``allowance`` (in the order the distiller gave them)."""
    kept: list[Edit] = []
    refused: list[dict[str, Any]] = []
    used = 0
    for edit in edits:
        if edit.op in ("delete", "replace"):
            item = state.items.get(edit.id or "")
            if item is not None and item.pinned:
                refused.append({**edit.model_dump(exclude_none=True), "reason": f"item {item.id} is pinned"})
                continue
            if used >= allowance:
                refused.append({**edit.model_dump(exclude_none=True),
                                "reason": f"over this refresh's bound of {allowance} deletions/replacements"})
                continue
            used += 1
        kept.append(edit)
    return kept, refused


def bounded_apply(edits: Sequence[Edit], allowance: int, apply: Callable[[list[Edit]], Applied]) -> Applied:
    """``apply(edits)``, dropping the last adds while the removals (deletes, replaces, evictions) exceed
    ``allowance``; the dropped adds are reported as rejected."""
    current = list(edits)
    dropped: list[dict[str, Any]] = []
    while True:
        result = apply(current)
        removals = sum(1 for a in result.applied if a.get("op") in ("delete", "replace")) + len(result.evicted)
        adds = [i for i, e in enumerate(current) if e.op == "add"]
        if removals <= allowance or not adds:
            result.rejected.extend(dropped)
            return result
        last = current.pop(adds[-1])
        dropped.append({**last.model_dump(exclude_none=True),
                        "reason": f"it would push out more than this refresh's bound of {allowance} items"})
