"""Refreshing a context map: recent query records (question, answer, sources) and the items' feedback are
distilled into edits by an LLM and applied as one version.

The LLM is the bank's local model, or an OpenAI-compatible endpoint (``KVRAG_MAP_LLM_URL``), asked for the
edit JSON schema (the local model decodes constrained to it: :mod:`kvstore.contextmap.refresh`). Its output
is parsed strictly; output that does not parse changes nothing. A refresh never touches a pinned item and
removes a bounded share of the others (:mod:`kvstore.contextmap.pins`); scores decay by ``DECAY`` each time.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import httpx
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from kvstore.contextmap.pins import bounded_apply, removal_allowance, screen_refresh
from kvstore.contextmap.refresh import (
    DISTILL_SYSTEM,
    ask_for,
    complete_local,
    complete_remote,
    distill_prompt,
    new_hint,
)
from kvstore.contextmap.state import RECENT_QUERIES, Applied, MapState, apply_changes, parse_distilled
from kvstore.contextmap.versions import VersionedMaps
from kvstore.contextmap.views import RefreshReport
from kvstore.errors import Conflict
from kvstore.storage.catalog import BankRow, ContextMapQueryRow, ContextMapRow, utcnow

log = logging.getLogger(__name__)

RAW_REPORT_CHARS = 2000  # of an unparseable reply, quoted in the report


class Distiller:
    """Refreshes of the maps in ``maps``, and the query records they distill."""

    def __init__(self, maps: VersionedMaps) -> None:
        self.maps = maps
        self.store = maps.store

    @property
    def llm_name(self) -> str:
        return self.store.settings.map_llm_url or "local"

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

    def refresh(self, bank: str, *, agent: str | None = None) -> RefreshReport:
        """Distill the recent query records into edits with the LLM and apply them as one version (scores
        decay). Unparseable output or a failed LLM call changes nothing and is reported."""
        with self.store.sessions() as s:
            bank_row = self.store.bank_row(s, bank)
            head = self.maps.head(s, bank_row)
            if head.frozen:
                raise Conflict("the context map is frozen; unfreeze it to refresh")
            base = head.version
            snapshot = self.maps.snapshot(s, bank_row.id, base)
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
            raw = self.complete(DISTILL_SYSTEM, distill_prompt(state, records) + new_hint(ask), ask.schema)
        except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as exc:
            report.status, report.error = "llm_error", f"{type(exc).__name__}: {exc}"
            return report
        try:
            distilled = parse_distilled(raw)
        except ValueError as exc:
            report.status, report.error, report.raw = "unparseable", str(exc), raw[:RAW_REPORT_CHARS]
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
                base_version=base, agent=agent or "refresh", now=utcnow(), count_tokens=self.maps.count_tokens,
                strict=False, decay=True))
            result.rejected = refused + result.rejected
            return result, {"refreshes": head.refreshes + 1, "refreshed_through": through}

        new_head, result = self.maps.write(bank, "refresh", agent, mutate)
        assert result is not None
        report.status = "applied" if result.applied else "unchanged"
        report.version, report.tokens = new_head.version, result.tokens
        report.applied, report.rejected, report.evicted = result.applied, result.rejected, result.evicted
        return report

    def complete(self, system: str, user: str, schema: dict[str, Any]) -> str:
        """One chat completion asked for ``schema``: the OpenAI-compatible endpoint when configured, else the
        local model decoding constrained to it (:mod:`kvstore.contextmap.refresh`)."""
        settings = self.store.settings
        if settings.map_llm_url:
            return complete_remote(settings, system, user, schema)
        with self.store.model_lock:
            return complete_local(self.store.runner, settings, system, user, schema)
