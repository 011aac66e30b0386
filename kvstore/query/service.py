"""A query, end to end: plan (one short read session), load the blocks, answer with the plan's strategy,
then one write step once the answer is there (access records and heat, the context map's query record,
re-warming cold blocks). No catalog session is open while the model works."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from sqlalchemy.orm import Session, sessionmaker

from kvstore.config import Settings
from kvstore.memory.policy import record_access
from kvstore.model.loader import LoadedModel
from kvstore.ports import BlockSource
from kvstore.query.plan import Mode, QueryPlan, QueryPlanner, parse_options
from kvstore.query.retrieval import to_hit
from kvstore.query.strategies import STRATEGIES, Answered, Model
from kvstore.storage.catalog import BankRow, BlockRow, utcnow
from kvstore.types import BlockKV, QueryResult, SearchFilter, Timings, Usage


class QueryRecords(Protocol):
    """The context map's record of answered queries (:class:`kvstore.contextmap.service.ContextMaps`)."""

    def record_query(self, s: Session, bank: BankRow, question: str, answer: str, sources: Sequence[str],
                     map_version: int | None) -> None: ...


class Rewarm(Protocol):
    """:meth:`kvstore.memory.tiers.MemoryManager.rewarm_and_enforce`."""

    def rewarm_and_enforce(self, s: Session, bank: BankRow, rows: Sequence[BlockRow],
                           kvs: Sequence[BlockKV]) -> int: ...


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


class QueryService:
    """Answers questions over a bank's blocks (see the module docstring for the steps)."""

    def __init__(self, settings: Settings, llm: LoadedModel, sessions: sessionmaker[Session], planner: QueryPlanner,
                 blocks: BlockSource, model: Model, memory: Rewarm, records: QueryRecords) -> None:
        self.settings = settings
        self.llm = llm
        self.sessions = sessions
        self.planner = planner
        self.blocks = blocks
        self.model = model
        self.memory = memory
        self.records = records

    def query(self, bank: str, question: str, *, k: int = 5, mode: Mode = "kv", max_new_tokens: int = 64,
              filter: SearchFilter | None = None, on_token: Callable[[str], None] | None = None,
              started_at: float | None = None, recompute: float | None = None,
              compaction: dict[str, Any] | None = None, context_map: bool = False,
              retrieval: str | None = None) -> QueryResult:
        """Retrieve top-k blocks and answer. kv: stored KV + question prefill; text: prefill their text.
        ``context_map`` puts the bank's rendered context map before the blocks (its KV cached per version).

        kv mode only: ``recompute`` is the share of context tokens whose KV is recomputed with attention over
        the whole context (None: the device's measured default); ``compaction`` (``{"tau": float}`` and/or
        ``{"budget_tokens": int}``) keeps only the context tokens the question attends to.
        """
        t0 = started_at if started_at is not None else time.perf_counter()
        options = parse_options(self.settings, self.llm, mode=mode, k=k, max_new_tokens=max_new_tokens,
                                filter=filter, retrieval=retrieval, recompute=recompute, compaction=compaction,
                                context_map=context_map, on_token=on_token)
        plan = self.planner.plan(bank, question, options)
        kv = mode == "kv"
        blocks = [self.blocks.load(None, plan.bank, b) for b, _, _ in plan.retrieved] if kv else []
        t_loaded = time.perf_counter()
        answered = STRATEGIES[plan.strategy](self.model, plan, blocks, t_loaded)
        self.after_answer(plan, answered, blocks)
        t_end = time.perf_counter()
        gen = answered.generation
        timings = Timings(retrieve_ms=_ms(plan.t_retrieved - t0), load_ms=_ms(t_loaded - plan.t_retrieved),
                          prefill_ms=_ms(gen.ttft_s - t_loaded), ttft_ms=_ms(gen.ttft_s - t0),
                          total_ms=_ms(t_end - t0))
        usage = Usage(context_tokens=answered.context_tokens, question_tokens=len(plan.question_ids),
                      generated_tokens=len(gen.token_ids), recomputed_tokens=answered.recomputed_tokens,
                      kept_tokens=answered.kept_tokens, map_prefill_tokens=plan.map_prefilled)
        return QueryResult(answer=gen.text, mode=mode, sources=[to_hit(b, d, sc) for b, d, sc in plan.retrieved],
                           timings=timings, usage=usage)

    def after_answer(self, plan: QueryPlan, answered: Answered, blocks: list[BlockKV]) -> None:
        """The writes an answer leads to, in one session: the blocks' access count, time, heat and attention
        importance; the query for the context map's refresh; cold blocks just used written back to warm."""
        rows = [b for b, _, _ in plan.retrieved]
        shares = answered.shares
        with self.sessions() as s:
            bank = s.merge(plan.bank, load=False)  # the plan's row, in this session (eviction refreshes it)
            if rows:
                block_shares = shares[len(plan.lead):] if shares else shares
                record_access(s, [b.id for b in rows], block_shares, utcnow(), self.model.shares.config)
                s.commit()
            self.records.record_query(s, bank, plan.question, answered.generation.text,
                                      [d.doc_id for _, d, _ in plan.retrieved], plan.map_version)
            if plan.options.mode == "kv":
                self.memory.rewarm_and_enforce(s, bank, rows, blocks)
