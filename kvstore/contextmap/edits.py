"""Changes to a context map other than a refresh: agents' edits and feedback, an owner's configuration and
pins, and the roadmap entries ingest bootstraps. Each is one new version (:mod:`kvstore.contextmap.versions`)
or, when it changes nothing, none.

- **Budget.** The *rendered* map (what a query puts before its blocks) is counted with the bank model's
  tokenizer and held within ``budget_tokens`` after every change by evicting the lowest score, then the
  oldest item (pinned items never: :mod:`kvstore.contextmap.pins`).
- **Bootstrap.** Each ingested document adds a roadmap entry (first sentence + doc id) while it fits.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from kvstore.contextmap.pins import check_pinned_fit, set_pinned
from kvstore.contextmap.state import (
    Applied,
    Edit,
    Feedback,
    MapState,
    apply_changes,
    evict,
    parse_edits,
    render,
    roadmap_entry,
)
from kvstore.contextmap.versions import VersionedMaps, check_budget
from kvstore.contextmap.views import EditResult
from kvstore.errors import KVRagError, ValidationFailed, VersionMismatch
from kvstore.storage.catalog import ContextMapRow, utcnow

log = logging.getLogger(__name__)


class MapEditor:
    """Edits, configuration, pins and bootstrap of the maps in ``maps``."""

    def __init__(self, maps: VersionedMaps) -> None:
        self.maps = maps

    def edit(self, bank: str, edits: Sequence[Edit | dict[str, Any]] = (),
             feedback: Sequence[Feedback | dict[str, Any]] = (), *, base_version: int | None = None,
             agent: str | None = None) -> EditResult:
        """Apply edits and feedback atomically as one new version (all or nothing); the map fits its budget
        afterwards. ``base_version``: the version the editor read (see :func:`apply_changes`)."""
        edit_list, feedback_list = parse_edits(edits, feedback)
        if base_version is not None and (isinstance(base_version, bool) or base_version < 0):
            raise ValidationFailed("base_version must be a non-negative integer")

        def mutate(state: MapState, head: ContextMapRow) -> tuple[Applied, dict[str, Any]] | None:
            if not edit_list and not feedback_list:
                if base_version is not None and base_version > head.version:
                    raise VersionMismatch(f"base_version {base_version} is newer than the map")
                return None
            return apply_changes(state, edit_list, feedback_list, version=head.version + 1,
                                 current_version=head.version, base_version=base_version, agent=agent, now=utcnow(),
                                 count_tokens=self.maps.count_tokens), {}

        head, result = self.maps.write(bank, "edit", agent, mutate)
        if result is None:
            return EditResult(version=head.version, tokens=self.maps.tokens_of(bank, head.version), evicted=[],
                              applied=[])
        return EditResult(version=head.version, tokens=result.tokens, evicted=result.evicted, applied=result.applied)

    def configure(self, bank: str, *, frozen: bool | None = None, budget_tokens: int | None = None,
                  agent: str | None = None) -> None:
        """Freeze/unfreeze (frozen maps are not refreshed or bootstrapped) and change the token budget;
        a smaller budget evicts at once, as a new version."""
        if budget_tokens is not None:
            check_budget(budget_tokens)

        def mutate(state: MapState, head: ContextMapRow) -> tuple[Applied, dict[str, Any]] | None:
            head_changes: dict[str, Any] = {}
            if frozen is not None:
                head_changes["frozen"] = frozen
            if budget_tokens is not None:
                check_pinned_fit(state, budget_tokens, self.maps.count_tokens)
                head_changes["budget_tokens"] = budget_tokens
                state.budget_tokens = budget_tokens
            if not head_changes or all(getattr(head, k) == v for k, v in head_changes.items()):
                return None
            tokens, evicted = evict(state, self.maps.count_tokens)
            return Applied(state, tokens, [], evicted), head_changes

        self.maps.write(bank, "configure", agent, mutate)

    def pin(self, bank: str, item_id: str, pinned: bool = True, *, agent: str | None = None) -> None:
        """Pin (or unpin) an item: while pinned, no edit, refresh or eviction removes or replaces it. A new
        version when this changes anything."""

        def mutate(state: MapState, head: ContextMapRow) -> tuple[Applied, dict[str, Any]] | None:
            if not set_pinned(state, item_id, pinned):
                return None
            op = "pin" if pinned else "unpin"
            return Applied(state, self.maps.count_tokens(render(state)), [{"op": op, "id": item_id}], []), {}

        self.maps.write(bank, "pin" if pinned else "unpin", agent, mutate)

    def bootstrap(self, bank: str, doc_id: str, text: str, agent: str | None = None) -> str | None:
        """Add (or update) the roadmap entry of a document while it fits the budget; never evicts.
        Returns the item id, or None when the map is frozen or full."""
        entry = roadmap_entry(doc_id, text)
        marker = f"(doc {doc_id})"

        def mutate(state: MapState, head: ContextMapRow) -> tuple[Applied, dict[str, Any]] | None:
            if head.frozen:
                return None
            existing = next((i for i in state.items.values() if i.section == "roadmap"
                             and i.content.endswith(marker)), None)
            if existing is not None and existing.content == entry:
                return None
            edit = (Edit(op="add", section="roadmap", content=entry) if existing is None
                    else Edit(op="replace", id=existing.id, content=entry))
            try:
                result = apply_changes(state, [edit], [], version=head.version + 1, current_version=head.version,
                                       base_version=None, agent=agent, now=utcnow(),
                                       count_tokens=self.maps.count_tokens)
            except ValidationFailed:
                return None  # the entry alone is over the budget
            return (result, {}) if not result.evicted else None  # the budget says no: nothing is pushed out

        _, result = self.maps.write(bank, "bootstrap", agent, mutate)
        return result.applied[0]["id"] if result is not None else None

    def on_ingest(self, bank: str, doc_id: str, text: str, agent: str | None) -> None:
        """The ingest hook: bootstrap the document's roadmap entry. The document is already stored and the
        map is advisory, so a failure here is logged, never raised into the write."""
        try:
            self.bootstrap(bank, doc_id, text, agent)
        except (KVRagError, SQLAlchemyError) as exc:
            log.warning("context map of bank %s: no roadmap entry for %s (%s)", bank, doc_id, exc)
