"""The PEEK context map: a small, token-budgeted map per bank of what it holds and what earlier work found.

Items live in three sections with stable ids that are never reused: ``cr-N`` (roadmap: what is where),
``cu-N`` (understanding: facts, conventions, pitfalls) and ``rr-N`` (reusable results). Each item has
helpful/harmful counts and a score (helpful - harmful, every refresh multiplies it by ``DECAY``).

``ContextMaps`` is the part's facade; each concern lives in its own module:

- the map's state and the edits applied to it, pure (:mod:`kvstore.contextmap.state`);
- versions in the catalog, every change a new one (:mod:`kvstore.contextmap.versions`);
- agents' edits, configuration, pins and the roadmap entries ingest bootstraps (:mod:`kvstore.contextmap.edits`,
  the pin rules :mod:`kvstore.contextmap.pins`);
- refreshes, which distill recorded queries into edits with an LLM (:mod:`kvstore.contextmap.distill`, what
  it asks for :mod:`kvstore.contextmap.refresh`);
- the rendered map's KV, prefilled once per map text for the queries that use it
  (:mod:`kvstore.contextmap.kvcache`).

No web imports: the server and CLI reach this through ``BankStore.context_map``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from kvstore.contextmap.distill import Distiller
from kvstore.contextmap.edits import MapEditor
from kvstore.contextmap.kvcache import MapKVCache, MapPrefill
from kvstore.contextmap.state import Edit, Feedback
from kvstore.contextmap.versions import VersionedMaps, check_budget
from kvstore.contextmap.views import EditResult, MapVersionInfo, MapView, RefreshReport
from kvstore.storage.catalog import BankRow

if TYPE_CHECKING:
    from kvstore.ports import Engine


class ContextMaps:
    """Context maps of every bank of a BankStore: reads, edits, refresh, bootstrap, query records, KV."""

    def __init__(self, store: Engine) -> None:
        self.store = store
        self.kv = MapKVCache(store)
        self.maps = VersionedMaps(store, self.kv)
        self.editor = MapEditor(self.maps)
        self.distiller = Distiller(self.maps)

    def count_tokens(self, text: str) -> int:
        """:meth:`kvstore.contextmap.versions.VersionedMaps.count_tokens`."""
        return self.maps.count_tokens(text)

    @staticmethod
    def check_budget(budget: int) -> None:
        """:func:`kvstore.contextmap.versions.check_budget`."""
        check_budget(budget)

    # -- reads ------------------------------------------------------------------------------------

    def get(self, bank: str, version: int | None = None) -> MapView:
        """The current map, or an old ``version``."""
        return self.maps.get(bank, version)

    def versions(self, bank: str, *, before: int | None = None, limit: int = 50) -> list[MapVersionInfo]:
        """:meth:`kvstore.contextmap.versions.VersionedMaps.versions`."""
        return self.maps.versions(bank, before=before, limit=limit)

    def budget(self, s: Session, bank: BankRow) -> int:
        return self.maps.head(s, bank).budget_tokens

    # -- writes -----------------------------------------------------------------------------------

    def edit(self, bank: str, edits: Sequence[Edit | dict[str, Any]] = (),
             feedback: Sequence[Feedback | dict[str, Any]] = (), *, base_version: int | None = None,
             agent: str | None = None) -> EditResult:
        """:meth:`kvstore.contextmap.edits.MapEditor.edit`."""
        return self.editor.edit(bank, edits, feedback, base_version=base_version, agent=agent)

    def configure(self, bank: str, *, frozen: bool | None = None, budget_tokens: int | None = None,
                  agent: str | None = None) -> MapView:
        """:meth:`kvstore.contextmap.edits.MapEditor.configure`, then the map as it is now."""
        self.editor.configure(bank, frozen=frozen, budget_tokens=budget_tokens, agent=agent)
        return self.get(bank)

    def pin(self, bank: str, item_id: str, pinned: bool = True, *, agent: str | None = None) -> MapView:
        """:meth:`kvstore.contextmap.edits.MapEditor.pin`, then the map as it is now."""
        self.editor.pin(bank, item_id, pinned, agent=agent)
        return self.get(bank)

    def bootstrap(self, bank: str, doc_id: str, text: str, agent: str | None = None) -> str | None:
        """:meth:`kvstore.contextmap.edits.MapEditor.bootstrap`."""
        return self.editor.bootstrap(bank, doc_id, text, agent)

    def on_ingest(self, bank: str, doc_id: str, text: str, agent: str | None) -> None:
        """:meth:`kvstore.contextmap.edits.MapEditor.on_ingest`."""
        self.editor.on_ingest(bank, doc_id, text, agent)

    # -- refresh ----------------------------------------------------------------------------------

    @property
    def llm_name(self) -> str:
        return self.distiller.llm_name

    def refresh(self, bank: str, *, agent: str | None = None) -> RefreshReport:
        """:meth:`kvstore.contextmap.distill.Distiller.refresh`."""
        return self.distiller.refresh(bank, agent=agent)

    # -- query side -------------------------------------------------------------------------------

    def record_query(self, s: Session, bank: BankRow, question: str, answer: str, sources: Sequence[str],
                     map_version: int | None) -> None:
        """:meth:`kvstore.contextmap.distill.Distiller.record_query`."""
        self.distiller.record_query(s, bank, question, answer, sources, map_version)

    def prefill(self, s: Session, bank: BankRow) -> MapPrefill:
        """The current map's KV (pre-RoPE, for the positions right after the prefix), prefilled only when
        this map text has not been prefilled before."""
        head = self.maps.head(s, bank)
        return self.kv.prefill(bank, head.version, lambda: self.maps.rendered(s, bank, head.version))
