"""The query's plan: what to answer from and how, decided inside one short read session.

Planning validates the request, retrieves the blocks, prefills the context map when it changed, leaves out
the lowest-ranked blocks that would not fit in the model's positions, and picks one strategy
(:func:`choose_strategy`). The session closes before any block is loaded or any token generated.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from sqlalchemy.orm import Session, sessionmaker

from kvstore.banks.service import check_model
from kvstore.config import Settings
from kvstore.errors import ValidationFailed
from kvstore.model.compaction import CompactionSpec
from kvstore.model.limits import PromptLimits
from kvstore.model.loader import LoadedModel
from kvstore.model.recompute import default_ratio
from kvstore.model.runner import Runner
from kvstore.ports import BankLookup
from kvstore.query.retrieval import Retrieved, Retriever
from kvstore.storage.catalog import BankRow
from kvstore.storage.token_ids import bytes_to_ids
from kvstore.types import BlockKV, SearchFilter

Mode = Literal["kv", "text"]
# batched: the plain kv path, answered in a batch with other waiting questions; recompute: the question rides
# along a partial recompute of several blocks; assembled: one context on its own (blocks assembled, then
# optionally recomputed and/or compacted, then the answer); text: the blocks' text prefilled (the baseline).
Strategy = Literal["batched", "recompute", "assembled", "text"]


def choose_strategy(mode: Mode, *, batching: bool, compaction: CompactionSpec | None, max_new_tokens: int,
                    ratio: float, contexts: int) -> Strategy:
    """The one strategy for a query; ``contexts``: how many KV contexts follow the prefix (map and blocks).

    Only the plain path batches: recompute and compaction change each context on its own first, and with no
    token generated the importance needs a question pass of its own. A lone context after the prefix holds
    exactly what a text prefill gives (it was encoded there), so it is never recomputed.
    """
    if mode == "text":
        return "text"
    if batching and compaction is None and max_new_tokens > 0 and (ratio == 0 or contexts <= 1):
        return "batched"
    if ratio > 0 and contexts > 1 and compaction is None and max_new_tokens > 0:
        return "recompute"
    return "assembled"


@dataclass(frozen=True)
class QueryOptions:
    """A query's validated knobs (see :meth:`kvstore.query.service.QueryService.query`)."""

    mode: Mode
    k: int
    max_new_tokens: int
    filter: SearchFilter | None
    retrieval: str | None
    ratio: float  # share of context tokens recomputed (kv mode)
    compaction: CompactionSpec | None
    context_map: bool
    on_token: Callable[[str], None] | None


def parse_options(settings: Settings, llm: LoadedModel, *, mode: Mode, k: int, max_new_tokens: int,
                  filter: SearchFilter | None, retrieval: str | None, recompute: float | None,
                  compaction: dict[str, Any] | None, context_map: bool,
                  on_token: Callable[[str], None] | None) -> QueryOptions:
    if mode not in ("kv", "text"):
        raise ValidationFailed("mode must be 'kv' or 'text'")
    ratio = default_ratio(llm.device) if recompute is None else recompute
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0.0 <= ratio <= 1.0:
        raise ValidationFailed("recompute must be a number between 0 and 1")
    try:
        spec = CompactionSpec.parse(compaction) if compaction is not None else None
    except ValueError as exc:
        raise ValidationFailed(str(exc)) from None
    if not 0 <= max_new_tokens <= settings.max_new_tokens:
        raise ValidationFailed(f"max_new_tokens must be between 0 and {settings.max_new_tokens}")
    return QueryOptions(mode, k, max_new_tokens, filter, retrieval, ratio, spec, context_map, on_token)


class MapLead(Protocol):
    """The context map's KV for a query (:class:`kvstore.contextmap.service.MapPrefill`)."""

    version: int
    token_ids: list[int]
    kv: BlockKV | None
    prefilled: int  # tokens prefilled now (0: cached)


class MapSource(Protocol):
    def prefill(self, s: Session, bank: BankRow) -> MapLead: ...


@dataclass
class QueryPlan:
    """Everything the strategy needs, with no catalog session: rows here are detached, read-only."""

    bank: BankRow
    question: str
    options: QueryOptions
    strategy: Strategy
    retrieved: list[Retrieved]  # best first, those that fit
    question_ids: list[int]
    lead: list[BlockKV]  # the context map's KV, before the blocks ([] without a map)
    lead_ids: list[int]
    map_version: int | None
    map_prefilled: int
    t_retrieved: float  # perf_counter when retrieval finished

    def block_token_ids(self) -> list[int]:
        """The retrieved blocks' tokens, in context order."""
        return [tok for b, _, _ in self.retrieved for tok in bytes_to_ids(b.token_ids)]

    def context_ids(self) -> list[int]:
        """Every context token after the prefix: the map's, then the blocks'."""
        return self.lead_ids + self.block_token_ids()


class QueryPlanner:
    """Plans queries over the bank's index, the context map and the model's positions."""

    def __init__(self, sessions: sessionmaker[Session], banks: BankLookup, llm: LoadedModel, runner: Runner,
                 retriever: Retriever, context_map: MapSource, limits: PromptLimits,
                 batching: bool) -> None:
        self.sessions = sessions
        self.banks = banks
        self.llm = llm
        self.runner = runner
        self.retriever = retriever
        self.context_map = context_map
        self.limits = limits
        self.batching = batching  # the batcher is on (kvstore.model.batching)

    def plan(self, bank: str, question: str, options: QueryOptions) -> QueryPlan:
        limits = self.limits
        limits.check_question(question)  # before any model work: a huge question is a 413, not a stall
        vec = self.retriever.embed(question)  # model work before the read session opens
        with self.sessions() as s:
            bank_row = self.banks.row(s, bank)
            check_model(bank_row, self.llm)
            retrieved = self.retriever.retrieve(s, bank_row, question, options.k, options.filter, options.retrieval,
                                               vec)
            t_retrieved = time.perf_counter()
            q_ids = self.runner.question_ids(question)
            shown = self.context_map.prefill(s, bank_row) if options.context_map else None
        lead = [shown.kv] if shown is not None and shown.kv is not None else []
        lead_ids = shown.token_ids if lead and shown is not None else []
        # Within the model's positions: the lowest-ranked blocks that would not fit are left out.
        fixed = len(self.runner.prefix_ids) + len(lead_ids) + len(q_ids) + options.max_new_tokens
        retrieved = retrieved[:limits.blocks_that_fit([b.token_count for b, _, _ in retrieved], fixed)]
        strategy = choose_strategy(options.mode, batching=self.batching, compaction=options.compaction,
                                   max_new_tokens=options.max_new_tokens, ratio=options.ratio,
                                   contexts=len(lead) + len(retrieved))
        return QueryPlan(bank_row, question, options, strategy, retrieved, q_ids, lead, lead_ids,
                         shown.version if shown is not None else None, shown.prefilled if shown is not None else 0,
                         t_retrieved)
