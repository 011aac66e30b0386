"""Every bank's context map as versions in the catalog: a head row and one snapshot per version.

Every change writes a new version holding the whole map (it is small), so any old version stays
readable. Writers take the head row with ``UPDATE ... WHERE version = v``: of two concurrent writers
exactly one moves the head, the other re-reads and re-applies (or, when it named a ``base_version``, gets
``VersionMismatch`` unless its edits touch only items unchanged since then). No acknowledged edit is ever
lost silently.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from kvstore.contextmap.kvcache import MapKVCache
from kvstore.contextmap.state import MAX_BUDGET, MIN_BUDGET, Applied, MapState, render
from kvstore.contextmap.views import MapVersionInfo, MapView, item_views
from kvstore.errors import Conflict, NotFound, ValidationFailed
from kvstore.storage.catalog import BankRow, ContextMapRow, ContextMapVersionRow, utcnow

if TYPE_CHECKING:
    from kvstore.ports import Engine

WRITE_ATTEMPTS = 50

# A change to the map: (the changed state, head column changes), or None when nothing changes.
Mutation = Callable[[MapState, ContextMapRow], tuple[Applied, dict[str, Any]] | None]


def check_budget(budget: int) -> None:
    """A map budget must leave room for some items and stay small enough to ride along every query."""
    if isinstance(budget, bool) or not isinstance(budget, int) or not MIN_BUDGET <= budget <= MAX_BUDGET:
        raise ValidationFailed(f"context_map_budget_tokens must be between {MIN_BUDGET} and {MAX_BUDGET}")


class VersionedMaps:
    """The maps of every bank of one store: reads of any version, and writes as new versions. A write whose
    rendered text changes discards the map's KV (``kv``)."""

    def __init__(self, store: Engine, kv: MapKVCache) -> None:
        self.store, self.kv = store, kv
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` with the bank model's tokenizer: what a map's budget counts."""
        return len(self.store.runner.tokenize(text)) if text else 0

    def _lock(self, bank: str) -> threading.Lock:
        """One writer per bank in this process; the version check covers writers in other processes."""
        with self._locks_guard:
            return self._locks.setdefault(bank, threading.Lock())

    def head(self, s: Session, bank: BankRow) -> ContextMapRow:
        """The bank's map head, created (empty, version 0) on first use."""
        head = s.get(ContextMapRow, bank.id)
        if head is not None:
            return head
        budget = self.store.settings.context_map_budget_tokens
        s.add(ContextMapRow(bank_id=bank.id, version=0, budget_tokens=budget, frozen=False, refreshes=0,
                            refreshed_through=0, updated_at=utcnow()))
        s.add(ContextMapVersionRow(bank_id=bank.id, version=0, state=MapState(budget_tokens=budget).to_json(),
                                   tokens=0, change="create", evicted=[], agent=None, created_at=utcnow()))
        try:
            s.commit()
        except IntegrityError:
            s.rollback()  # another writer created it first
        head = s.get(ContextMapRow, bank.id, populate_existing=True)
        assert head is not None
        return head

    @staticmethod
    def snapshot(s: Session, bank_id: int, version: int) -> ContextMapVersionRow:
        row = s.get(ContextMapVersionRow, (bank_id, version))
        if row is None:
            raise NotFound(f"context-map version {version} not found")
        return row

    def write(self, bank: str, change: str, agent: str | None, mutate: Mutation
              ) -> tuple[ContextMapRow, Applied | None]:
        """Apply ``mutate`` to the current map and store it as the next version, retrying when another
        writer moved the head first. ``mutate`` returns (result, head column changes) or None: no change."""
        with self._lock(bank):
            for _ in range(WRITE_ATTEMPTS):
                with self.store.sessions() as s:
                    bank_row = self.store.bank_row(s, bank)
                    head = self.head(s, bank_row)
                    current = self.snapshot(s, bank_row.id, head.version)
                    state = MapState.from_json(current.state)
                    state.budget_tokens = head.budget_tokens
                    before = render(state)
                    outcome = mutate(state, head)
                    if outcome is None:
                        return head, None
                    result, head_changes = outcome
                    version = head.version + 1
                    try:
                        moved = s.execute(update(ContextMapRow).where(
                            ContextMapRow.bank_id == bank_row.id, ContextMapRow.version == head.version).values(
                            version=version, updated_at=utcnow(), **head_changes)).rowcount  # type: ignore[attr-defined]
                        if moved != 1:
                            s.rollback()
                            continue
                        s.add(ContextMapVersionRow(bank_id=bank_row.id, version=version,
                                                   state=result.state.to_json(), tokens=result.tokens, change=change,
                                                   evicted=result.evicted, agent=agent, created_at=utcnow()))
                        s.commit()
                    except (IntegrityError, OperationalError):
                        s.rollback()  # a concurrent writer took this version (or held the SQLite lock)
                        continue
                    if render(result.state) != before:
                        self.kv.discard(bank_row)
                    fresh = s.get(ContextMapRow, bank_row.id, populate_existing=True)
                    assert fresh is not None
                    return fresh, result
        raise Conflict("the context map kept changing under this write; retry")

    def get(self, bank: str, version: int | None = None) -> MapView:
        """The current map, or an old ``version``."""
        with self.store.sessions() as s:
            bank_row = self.store.bank_row(s, bank)
            head = self.head(s, bank_row)
            if version is not None and (version < 0 or version > head.version):
                raise NotFound(f"context-map version {version} not found (current: {head.version})")
            row = self.snapshot(s, bank_row.id, head.version if version is None else version)
            state = MapState.from_json(row.state)
            budget = head.budget_tokens if version is None else state.budget_tokens
            return MapView(version=row.version, budget_tokens=budget, tokens=row.tokens, frozen=head.frozen,
                           items=item_views(state))

    def versions(self, bank: str, *, before: int | None = None, limit: int = 50) -> list[MapVersionInfo]:
        """The map's versions, newest first, older than ``before`` (all when None): a page of at most ``limit``."""
        if limit < 1 or limit > 500:
            raise ValidationFailed("limit must be between 1 and 500")
        with self.store.sessions() as s:
            bank_row = self.store.bank_row(s, bank)
            self.head(s, bank_row)
            q = select(ContextMapVersionRow).where(ContextMapVersionRow.bank_id == bank_row.id)
            if before is not None:
                q = q.where(ContextMapVersionRow.version < before)
            rows = s.scalars(q.order_by(ContextMapVersionRow.version.desc()).limit(limit)).all()
            return [MapVersionInfo(version=r.version, change=r.change, tokens=r.tokens,
                                   items=len((r.state or {}).get("items", [])), evicted=list(r.evicted or []),
                                   agent=r.agent, created_at=r.created_at) for r in rows]

    def tokens_of(self, bank: str, version: int) -> int:
        """The rendered tokens of one version of the bank's map."""
        with self.store.sessions() as s:
            return self.snapshot(s, self.store.bank_row(s, bank).id, version).tokens

    def rendered(self, s: Session, bank: BankRow, version: int) -> str:
        """The text of one version of the bank's map, as a query puts it before its blocks."""
        return render(MapState.from_json(self.snapshot(s, bank.id, version).state))
