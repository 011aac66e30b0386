"""The PEEK context map: a small, token-budgeted map per bank of what it holds and what earlier work found.

Items live in three sections with stable ids that are never reused: ``cr-N`` (roadmap: what is where),
``cu-N`` (understanding: facts, conventions, pitfalls) and ``rr-N`` (reusable results). Each item has
helpful/harmful counts and a score (helpful - harmful, every refresh multiplies it by 0.85).

- **Versions.** Every change writes a new version holding the whole map (it is small), so any old
  version stays readable. Writers take the head row with ``UPDATE ... WHERE version = v``: of two
  concurrent writers exactly one moves the head, the other re-reads and re-applies (or, when it named
  a ``base_version``, gets ``VersionMismatch`` unless its edits touch only items unchanged since
  then). No acknowledged edit is ever lost silently.
- **Budget.** The *rendered* map (what a query puts before its blocks) is counted with the bank
  model's tokenizer and held within ``budget_tokens`` after every change by evicting the lowest
  score, then the oldest item.
- **Refresh.** Recent query records (question, answer, sources) and the items' feedback are
  distilled into edits by an LLM: the bank's local model, or an OpenAI-compatible endpoint
  (``KVRAG_MAP_LLM_URL``), asked for the edit JSON schema (the local model decodes constrained to it,
  kvstore/contextmap/refresh.py). Its output is parsed strictly; output that does not parse changes nothing. A
  refresh never touches a pinned item and removes a bounded share of the others (kvstore/contextmap/pins.py).
- **Bootstrap.** Each ingested document adds a roadmap entry (first sentence + doc id) while it fits.
- **KV.** The rendered map is prefilled once per map text after the shared prefix (keys pre-RoPE, like
  a block) and kept in memory, so a query that reuses it prefills nothing for it.

No web imports: the server and CLI reach this through ``BankStore.context_map``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

import httpx
from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session

from kvstore.contextmap.pins import bounded_apply, check_pinned_fit, removal_allowance, screen_refresh, set_pinned
from kvstore.contextmap.refresh import ask_for, complete_local, complete_remote, new_hint
from kvstore.contextmap.state import (  # noqa: F401  (re-exported: the map's state and edit shapes)
    DECAY,
    HEADER,
    ITEM_ID,
    MAX_BUDGET,
    MAX_CONTENT_CHARS,
    MAX_EDITS,
    MIN_BUDGET,
    RECENT_QUERIES,
    SECTION_OF_PREFIX,
    SECTIONS,
    Applied,
    Distilled,
    Edit,
    Feedback,
    Item,
    MapState,
    Section,
    apply_changes,
    evict,
    parse_distilled,
    parse_edits,
    render,
    roadmap_entry,
)
from kvstore.errors import Conflict, KVRagError, NotFound, ValidationFailed, VersionMismatch
from kvstore.storage.catalog import BankRow, ContextMapQueryRow, ContextMapRow, ContextMapVersionRow, utcnow

if TYPE_CHECKING:
    from kvstore.model.runner import BlockKV
    from kvstore.ports import Engine

log = logging.getLogger(__name__)

_WRITE_ATTEMPTS = 50
_RAW_REPORT_CHARS = 2000

# -- public value types ---------------------------------------------------------------------------


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


@dataclass
class MapPrefill:
    """The map's KV for a query: ``kv`` None for an empty map; ``prefilled`` 0 when it came from the cache."""

    version: int
    token_ids: list[int]
    kv: BlockKV | None
    prefilled: int


@dataclass
class _CachedKV:
    version: int
    text: str
    token_ids: list[int]
    kv: BlockKV

    @property
    def nbytes(self) -> int:
        return self.kv.nbytes


_KIND = "map"  # its share of the process's KV budget (kvstore.memory.budget): evicted, it is prefilled again


def _kv_key(bank: BankRow) -> str:
    """Within the bank's partition, its creation time: a deleted bank's id may come back (SQLite), its creation
    time does not."""
    return str(bank.created_at)


def _views(state: MapState) -> list[MapItem]:
    return [MapItem(id=i.id, section=i.section, content=i.content, helpful=i.helpful, harmful=i.harmful,
                    score=i.score, agent=i.agent, stale=i.stale, created_at=datetime.fromisoformat(i.created_at),
                    updated_at=datetime.fromisoformat(i.updated_at), pinned=i.pinned) for i in state.ordered()]


# -- distiller ------------------------------------------------------------------------------------

DISTILL_SYSTEM = (
    "You maintain a context map of a document memory: a short list of items in three sections. roadmap (cr-N): "
    "what is where in the memory. understanding (cu-N): facts, conventions and pitfalls learned. "
    "reusable_results (rr-N): answers worth keeping. Given the current map and recent questions with their "
    "answers and sources, reply with ONLY a JSON object {\"edits\": [...], \"feedback\": [...]}. An edit is "
    "{\"op\": \"add\", \"section\": ..., \"content\": ...}, {\"op\": \"replace\", \"id\": ..., \"content\": ...} "
    "or {\"op\": \"delete\", \"id\": ...}; feedback is {\"id\": ..., \"tag\": \"helpful\"|\"harmful\"|"
    "\"neutral\"|\"stale\"}. Keep items short; the map has a token budget."
)


def distill_prompt(state: MapState, records: Sequence[ContextMapQueryRow]) -> str:
    """The user message of a refresh: the map with its feedback counts, then the recent queries."""
    lines = [f"Token budget: {state.budget_tokens}", "Current map:"]
    lines += [f"- {i.id} [{i.section}] (helpful {i.helpful}, harmful {i.harmful}{', stale' if i.stale else ''}): "
              f"{i.content}" for i in state.ordered()] or ["(empty)"]
    lines.append("Recent queries:")
    for r in records:
        lines.append(f"- Q: {r.question[:300]}\n  A: {r.answer[:300]}\n  sources: {', '.join(r.sources or [])}")
    return "\n".join(lines)


# -- the store-side manager -----------------------------------------------------------------------


class ContextMaps:
    """Context maps of every bank of a BankStore: reads, edits, refresh, bootstrap, query records, KV."""

    def __init__(self, store: Engine) -> None:
        self.store = store
        self._kv = store.kv_memory
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    # -- helpers ----------------------------------------------------------------------------------

    def count_tokens(self, text: str) -> int:
        return len(self.store.runner.tokenize(text)) if text else 0

    def _lock(self, bank: str) -> threading.Lock:
        """One writer per bank in this process; the version check covers writers in other processes."""
        with self._locks_guard:
            return self._locks.setdefault(bank, threading.Lock())

    def _head(self, s: Session, bank: BankRow) -> ContextMapRow:
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
    def _snapshot(s: Session, bank_id: int, version: int) -> ContextMapVersionRow:
        row = s.get(ContextMapVersionRow, (bank_id, version))
        if row is None:
            raise NotFound(f"context-map version {version} not found")
        return row

    @staticmethod
    def check_budget(budget: int) -> None:
        """A map budget must leave room for some items and stay small enough to ride along every query."""
        if isinstance(budget, bool) or not isinstance(budget, int) or not MIN_BUDGET <= budget <= MAX_BUDGET:
            raise ValidationFailed(f"context_map_budget_tokens must be between {MIN_BUDGET} and {MAX_BUDGET}")

    def _write(self, bank: str, change: str, agent: str | None,
               mutate: Callable[[MapState, ContextMapRow], tuple[Applied, dict[str, Any]] | None]
               ) -> tuple[ContextMapRow, Applied | None]:
        """Apply ``mutate`` to the current map and store it as the next version, retrying when another
        writer moved the head first. ``mutate`` returns (result, head column changes) or None: no change."""
        with self._lock(bank):
            for _ in range(_WRITE_ATTEMPTS):
                with self.store.sessions() as s:
                    bank_row = self.store.bank_row(s, bank)
                    head = self._head(s, bank_row)
                    current = self._snapshot(s, bank_row.id, head.version)
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
                        self._kv.discard(bank_row.id, _KIND, _kv_key(bank_row))
                    fresh = s.get(ContextMapRow, bank_row.id, populate_existing=True)
                    assert fresh is not None
                    return fresh, result
        raise Conflict("the context map kept changing under this write; retry")

    # -- reads ------------------------------------------------------------------------------------

    def get(self, bank: str, version: int | None = None) -> MapView:
        """The current map, or an old ``version``."""
        with self.store.sessions() as s:
            bank_row = self.store.bank_row(s, bank)
            head = self._head(s, bank_row)
            if version is not None and (version < 0 or version > head.version):
                raise NotFound(f"context-map version {version} not found (current: {head.version})")
            row = self._snapshot(s, bank_row.id, head.version if version is None else version)
            state = MapState.from_json(row.state)
            budget = head.budget_tokens if version is None else state.budget_tokens
            return MapView(version=row.version, budget_tokens=budget, tokens=row.tokens, frozen=head.frozen,
                           items=_views(state))

    def versions(self, bank: str, *, before: int | None = None, limit: int = 50) -> list[MapVersionInfo]:
        """The map's versions, newest first, older than ``before`` (all when None): a page of at most ``limit``."""
        if limit < 1 or limit > 500:
            raise ValidationFailed("limit must be between 1 and 500")
        with self.store.sessions() as s:
            bank_row = self.store.bank_row(s, bank)
            self._head(s, bank_row)
            q = select(ContextMapVersionRow).where(ContextMapVersionRow.bank_id == bank_row.id)
            if before is not None:
                q = q.where(ContextMapVersionRow.version < before)
            rows = s.scalars(q.order_by(ContextMapVersionRow.version.desc()).limit(limit)).all()
            return [MapVersionInfo(version=r.version, change=r.change, tokens=r.tokens,
                                   items=len((r.state or {}).get("items", [])), evicted=list(r.evicted or []),
                                   agent=r.agent, created_at=r.created_at) for r in rows]

    def budget(self, s: Session, bank: BankRow) -> int:
        return self._head(s, bank).budget_tokens

    # -- writes -----------------------------------------------------------------------------------

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
                                 count_tokens=self.count_tokens), {}

        head, result = self._write(bank, "edit", agent, mutate)
        if result is None:
            return EditResult(version=head.version, tokens=self._tokens_of(bank, head.version), evicted=[], applied=[])
        return EditResult(version=head.version, tokens=result.tokens, evicted=result.evicted, applied=result.applied)

    def _tokens_of(self, bank: str, version: int) -> int:
        with self.store.sessions() as s:
            return self._snapshot(s, self.store.bank_row(s, bank).id, version).tokens

    def configure(self, bank: str, *, frozen: bool | None = None, budget_tokens: int | None = None,
                  agent: str | None = None) -> MapView:
        """Freeze/unfreeze (frozen maps are not refreshed or bootstrapped) and change the token budget;
        a smaller budget evicts at once, as a new version."""
        if budget_tokens is not None:
            self.check_budget(budget_tokens)

        def mutate(state: MapState, head: ContextMapRow) -> tuple[Applied, dict[str, Any]] | None:
            head_changes: dict[str, Any] = {}
            if frozen is not None:
                head_changes["frozen"] = frozen
            if budget_tokens is not None:
                check_pinned_fit(state, budget_tokens, self.count_tokens)
                head_changes["budget_tokens"] = budget_tokens
                state.budget_tokens = budget_tokens
            if not head_changes or all(getattr(head, k) == v for k, v in head_changes.items()):
                return None
            tokens, evicted = evict(state, self.count_tokens)
            return Applied(state, tokens, [], evicted), head_changes

        self._write(bank, "configure", agent, mutate)
        return self.get(bank)

    def pin(self, bank: str, item_id: str, pinned: bool = True, *, agent: str | None = None) -> MapView:
        """Pin (or unpin) an item: while pinned, no edit, refresh or eviction removes or replaces it. A new
        version when this changes anything."""

        def mutate(state: MapState, head: ContextMapRow) -> tuple[Applied, dict[str, Any]] | None:
            if not set_pinned(state, item_id, pinned):
                return None
            op = "pin" if pinned else "unpin"
            return Applied(state, self.count_tokens(render(state)), [{"op": op, "id": item_id}], []), {}

        self._write(bank, "pin" if pinned else "unpin", agent, mutate)
        return self.get(bank)

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
                                       base_version=None, agent=agent, now=utcnow(), count_tokens=self.count_tokens)
            except ValidationFailed:
                return None  # the entry alone is over the budget
            return (result, {}) if not result.evicted else None  # the budget says no: nothing is pushed out

        _, result = self._write(bank, "bootstrap", agent, mutate)
        return result.applied[0]["id"] if result is not None else None

    def on_ingest(self, bank: str, doc_id: str, text: str, agent: str | None) -> None:
        """The ingest hook: bootstrap the document's roadmap entry. The document is already stored and the
        map is advisory, so a failure here is logged, never raised into the write."""
        try:
            self.bootstrap(bank, doc_id, text, agent)
        except (KVRagError, SQLAlchemyError) as exc:
            log.warning("context map of bank %s: no roadmap entry for %s (%s)", bank, doc_id, exc)

    # -- refresh ----------------------------------------------------------------------------------

    @property
    def llm_name(self) -> str:
        return self.store.settings.map_llm_url or "local"

    def refresh(self, bank: str, *, agent: str | None = None) -> RefreshReport:
        """Distill the recent query records into edits with the LLM and apply them as one version (scores
        decay by 0.85). Unparseable output or a failed LLM call changes nothing and is reported."""
        with self.store.sessions() as s:
            bank_row = self.store.bank_row(s, bank)
            head = self._head(s, bank_row)
            if head.frozen:
                raise Conflict("the context map is frozen; unfreeze it to refresh")
            base = head.version
            snapshot = self._snapshot(s, bank_row.id, base)
            state = MapState.from_json(snapshot.state)
            state.budget_tokens = head.budget_tokens
            tokens = snapshot.tokens
            records = list(reversed(s.scalars(select(ContextMapQueryRow).where(
                ContextMapQueryRow.bank_id == bank_row.id, ContextMapQueryRow.id > head.refreshed_through)
                .order_by(ContextMapQueryRow.id.desc()).limit(RECENT_QUERIES)).all()))
        report = RefreshReport(status="nothing_to_distill", version=base, tokens=tokens, records=len(records),
                               llm=self.llm_name)
        if not records:
            return report
        ask = ask_for(state, records)
        try:
            raw = self._complete(DISTILL_SYSTEM, distill_prompt(state, records) + new_hint(ask), ask.schema)
        except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as exc:
            report.status, report.error = "llm_error", f"{type(exc).__name__}: {exc}"
            return report
        try:
            distilled = parse_distilled(raw)
        except ValueError as exc:
            report.status, report.error, report.raw = "unparseable", str(exc), raw[:_RAW_REPORT_CHARS]
            log.warning("context map of bank %s: refresh output did not parse (%s)", bank, exc)
            return report
        through = records[-1].id

        def mutate(current: MapState, head: ContextMapRow) -> tuple[Applied, dict[str, Any]] | None:
            if head.frozen:
                raise Conflict("the context map was frozen during the refresh")
            # Stored text steers the distiller: pinned items are off limits and removals are bounded (pins.py).
            allowance = removal_allowance(len(current.items), self.store.settings.context_map_refresh_max_removals)
            edits, refused = screen_refresh(current, distilled.edits, allowance)
            result = bounded_apply(edits, allowance, lambda chosen: apply_changes(
                current, chosen, distilled.feedback, version=head.version + 1, current_version=head.version,
                base_version=base, agent=agent or "refresh", now=utcnow(), count_tokens=self.count_tokens,
                strict=False, decay=True))
            result.rejected = refused + result.rejected
            return result, {"refreshes": head.refreshes + 1, "refreshed_through": through}

        new_head, result = self._write(bank, "refresh", agent, mutate)
        assert result is not None
        report.status = "applied" if result.applied else "unchanged"
        report.version, report.tokens = new_head.version, result.tokens
        report.applied, report.rejected, report.evicted = result.applied, result.rejected, result.evicted
        return report

    def _complete(self, system: str, user: str, schema: dict[str, Any]) -> str:
        """One chat completion asked for ``schema``: the OpenAI-compatible endpoint when configured, else the
        local model decoding constrained to it (kvstore/contextmap/refresh.py)."""
        settings = self.store.settings
        if settings.map_llm_url:
            return complete_remote(settings, system, user, schema)
        with self.store.model_lock:
            return complete_local(self.store.runner, settings, system, user, schema)

    # -- query side -------------------------------------------------------------------------------

    def record_query(self, s: Session, bank: BankRow, question: str, answer: str, sources: Sequence[str],
                     map_version: int | None) -> None:
        """Keep a query for later refreshes (the last ``context_map_keep_queries`` per bank)."""
        row = ContextMapQueryRow(bank_id=bank.id, question=question, answer=answer,
                                 sources=list(dict.fromkeys(sources)), map_version=map_version, created_at=utcnow())
        s.add(row)
        s.flush()
        cutoff = s.scalar(select(ContextMapQueryRow.id).where(ContextMapQueryRow.bank_id == bank.id)
                          .order_by(ContextMapQueryRow.id.desc()).offset(self.store.settings.context_map_keep_queries)
                          .limit(1))
        if cutoff is not None:
            s.execute(delete(ContextMapQueryRow).where(ContextMapQueryRow.bank_id == bank.id,
                                                       ContextMapQueryRow.id <= cutoff))
        s.commit()

    def prefill(self, s: Session, bank: BankRow) -> MapPrefill:
        """The current map's KV (pre-RoPE, for the positions right after the prefix), prefilled only when
        this map text has not been prefilled before."""
        head = self._head(s, bank)
        key = _kv_key(bank)
        cached = self._kv.get(bank.id, _KIND, key)
        if cached is not None and cached.version == head.version:
            return MapPrefill(head.version, cached.token_ids, cached.kv, 0)
        text = render(MapState.from_json(self._snapshot(s, bank.id, head.version).state))
        if not text:
            return MapPrefill(head.version, [], None, 0)
        if cached is not None and cached.text == text:  # e.g. only feedback changed: same text, same KV
            self._kv.put(bank.id, _KIND, key, replace(cached, version=head.version))
            return MapPrefill(head.version, cached.token_ids, cached.kv, 0)
        ids = self.store.runner.tokenize(text)
        with self.store.model_lock:
            kv = self.store.runner.encode([ids])[0]
        self._kv.put(bank.id, _KIND, key, _CachedKV(head.version, text, ids, kv))
        return MapPrefill(head.version, ids, kv, len(ids))
