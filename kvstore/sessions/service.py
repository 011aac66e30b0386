"""Agent sessions: an agent's trajectory kept as a KV state that grows by appending.

A session lives in a bank and is a list of segments (orchestrator turns, tool outputs, worker replies,
notes). ``append`` prefills only the new tokens, with the session's live KV as the cache and positions
continuing after the last appended token, and persists their KV like document blocks: keys un-rotated
to pre-RoPE, paged to the bank's block size, through the codec, into a blob store of its own (the
documents' orphan collection never sees these blobs). Blobs are written before the one catalog
transaction that acknowledges the append, so an acknowledged append survives a crash.

``brief`` hands a worker a task-compacted slice of the trajectory (Latent Briefing): the task's tokens
are run over the session's KV, every trajectory position is scored by the attention the task pays it
(one shared mask over layers and heads, :mod:`kvstore.model.compaction`), and ``budget_tokens`` (or as many as
score above ``median + tau * MAD``) are kept, always with the first tokens and each segment's first
token: by default whole segments in order of density of the peak attention any head pays them (layers
2+, from the same task pass), then the best chunks in what is left (``selection="tokens"``: the best
positions by the mean attention, one by one). Kept tokens stay at their original positions.
Each brief also records every segment's share of the attention relative to an even share (1 / live
segments, the attention sinks left out), the signal of the ``attention`` prune.

``prune`` drops the KV of segments that are no longer useful (SideQuest); their text stays for audit.
Positions never move back, so the remaining tokens keep the RoPE distances they were computed with.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal, Protocol
from weakref import WeakKeyDictionary

import httpx
import numpy as np
import torch
from sqlalchemy import (
    case,
    delete,
    func,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from kvstore.codec.format import decode_block, encode_block
from kvstore.errors import Conflict, CorruptBlock, IncompatibleModel, NotFound, PayloadTooLarge, ValidationFailed
from kvstore.model.compaction import (
    COMPACTION_SKIP_LAYERS,
    KEEP_FIRST,
    SELECTIONS,
    CompactionSpec,
    Selection,
    keep_mask,
    question_votes,
    segment_keep_mask,
)
from kvstore.model.constrained import greedy_id_list, list_tokens
from kvstore.model.limits import limits_of
from kvstore.model.runner import BlockKV, Context, Runner
from kvstore.sessions.restore import RestorableSessions, bound_doomed, prune_cap
from kvstore.sessions.rows import AgentSessionRow, SessionPageRow, SessionSegmentRow  # noqa: F401  (re-exported)
from kvstore.storage.blobstore import BlobStore, open_blob_store
from kvstore.storage.catalog import BankRow, BlockRow, utcnow
from kvstore.storage.replication import blob_gc_lock

if TYPE_CHECKING:
    from kvstore.ports import Engine
    from kvstore.types import Hit

ROLES = ("orchestrator", "tool", "worker", "note")
SESSION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
MAX_SEGMENTS_PER_APPEND = 256
ATTENTION_HISTORY = 64  # per-segment brief records kept; the attention prune looks at the last ``window``
_STATE_KIND = "sessions"  # live KV states are kept within the process's KV budget (kvstore.memory.budget)
_JUDGE_SNIPPET_CHARS = 400  # how much of each segment the prune judge reads

Role = Literal["orchestrator", "tool", "worker", "note"]
PrunePolicy = Literal["model", "attention"]


# -- public value types -------------------------------------------------------------------------


@dataclass
class SegmentInput:
    """What an agent appends: ``role`` is one of ROLES; ``agent`` defaults to the writer's."""

    role: str
    text: str
    agent: str | None = None


@dataclass
class SegmentInfo:
    id: int
    role: str
    agent: str | None
    tokens: int
    start: int
    pruned: bool
    created_at: datetime
    text: str | None = None
    prune_reason: str | None = None


@dataclass
class SessionInfo:
    session_id: str
    bank: str
    metadata: dict[str, Any]
    agent: str | None
    segments: list[SegmentInfo]
    tokens: int  # live KV tokens (pruned segments not counted)
    total_tokens: int  # every token ever appended
    stored_bytes: int
    created_at: datetime
    updated_at: datetime


@dataclass
class SessionSummary:
    """A session as listed: its segments counted (kept and pruned) without their text."""

    session_id: str
    agent: str | None
    segments: int
    pruned_segments: int
    tokens: int  # live KV tokens
    total_tokens: int
    created_at: datetime
    updated_at: datetime


@dataclass
class AppendResult:
    session_id: str
    segment_ids: list[int]
    token_counts: list[int]
    tokens: int  # live KV tokens after the append
    prefill_ms: float
    total_ms: float


@dataclass
class BriefTimings:
    load_ms: float = 0.0
    retrieve_ms: float = 0.0
    compaction_ms: float = 0.0
    prefill_ms: float = 0.0
    ttft_ms: float = 0.0
    total_ms: float = 0.0


@dataclass
class BriefResult:
    answer: str
    session_tokens: int  # live trajectory tokens before compaction
    kept_tokens: int  # trajectory tokens the worker got
    document_tokens: int
    task_tokens: int
    generated_tokens: int
    compaction_ms: float
    timings: BriefTimings
    sources: list[Hit] = field(default_factory=list)


@dataclass
class PruneResult:
    policy: str
    pruned: list[int]  # segment ids whose KV was dropped by this call
    needed: list[int]  # segment ids kept (model: named by the judge; attention: at or above the threshold)
    tokens_before: int
    tokens_after: int
    judge_ms: float = 0.0
    error: str | None = None  # the judge's answer was unusable: nothing was pruned
    held_back: list[int] = field(default_factory=list)  # left out by the judge/attention, kept by the prune bound


# -- the session's live KV ----------------------------------------------------------------------


@dataclass
class SessionKV:
    """The live KV of a session: pre-RoPE keys and values of the unpruned tokens, in order."""

    segment_ids: tuple[int, ...]  # live segment row ids (validates a cached state against the catalog)
    kv: BlockKV  # [layers, kv_heads, tokens, head_dim]
    positions: torch.Tensor  # [tokens] positions after the shared prefix
    spans: list[tuple[int, int]]  # per live segment: (first row in kv, tokens)

    @property
    def tokens(self) -> int:
        return self.kv.tokens

    @property
    def nbytes(self) -> int:
        return self.kv.nbytes + self.positions.numel() * self.positions.element_size()


def _concat(runner: Runner, parts: Sequence[BlockKV]) -> BlockKV:
    """The parts one after another, fp32 on the model's device."""
    device = runner.llm.device
    if not parts:
        empty = torch.zeros(runner.num_layers, runner.kv_heads, 0, runner.head_dim, device=device)
        return BlockKV(k=empty, v=empty.clone())
    return BlockKV(k=torch.cat([p.k.to(device, torch.float32) for p in parts], dim=2),
                   v=torch.cat([p.v.to(device, torch.float32) for p in parts], dim=2))


def _pages(kv: BlockKV, page_tokens: int) -> list[BlockKV]:
    """Split ``kv`` into consecutive pages of at most ``page_tokens`` tokens."""
    return [BlockKV(k=kv.k[:, :, i:i + page_tokens].contiguous(), v=kv.v[:, :, i:i + page_tokens].contiguous())
            for i in range(0, kv.tokens, page_tokens)]


def _ids_bytes(ids: Sequence[int]) -> bytes:
    return np.asarray(list(ids), dtype="<i4").tobytes()


def _bytes_ids(data: bytes) -> list[int]:
    return np.frombuffer(data, dtype="<i4").astype(int).tolist()


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


def render_segment(role: str, text: str, agent: str | None) -> str:
    """A segment as the model reads it: a role tag, the text, a line break."""
    who = f"{role}:{agent}" if agent else role
    return f"[{who}] {text.strip()}\n"


# -- attention bookkeeping ----------------------------------------------------------------------


def segment_attention(scores: torch.Tensor, spans: Sequence[tuple[int, int]],
                      sinks: torch.Tensor | None = None) -> list[float]:
    """Per segment: its share of the task's attention over an even share of it (1 / live segments), so 1.0
    is an even share and the attention prune's default threshold 0.25 a quarter of one.

    ``scores: [tokens]`` is the attention each trajectory token got; spans are (first row, tokens).
    ``sinks`` (row indices: the first tokens, segment boundaries) are left out of every share: they soak
    up attention whatever the task and are always kept by a brief anyway.
    """
    live = [t for _, t in spans if t]
    if sinks is not None and sinks.numel():
        scores = scores.clone()
        scores[sinks] = 0.0
    total = float(scores.sum())
    if total <= 0 or not live:
        return [1.0 for _ in spans]
    return [float(scores[a:a + t].sum()) / total * len(live) if t else 0.0 for a, t in spans]


def _sinks(state: SessionKV, scores: torch.Tensor) -> torch.Tensor:
    """Rows a brief always keeps (the first tokens, each segment's first token): left out of the shares."""
    rows = {*range(min(KEEP_FIRST, state.tokens)), *(a for a, t in state.spans if t)}
    return torch.tensor(sorted(rows), dtype=torch.long, device=scores.device)


def low_attention(history: Sequence[float], window: int, threshold: float) -> bool:
    """Whether a segment's mean attention share (over an even share) in its last ``window`` briefs is below
    ``threshold``; a segment no brief has seen yet is never low (no evidence)."""
    recent = list(history)[-window:]
    return bool(recent) and sum(recent) / len(recent) < threshold


# -- the prune judge (model policy) -------------------------------------------------------------


class Judge(Protocol):
    """An auxiliary model call: a prompt and the live segment ids in, the model's reply text out. Its tokens
    never enter a session."""

    def __call__(self, prompt: str, live_ids: Sequence[int]) -> str: ...


class JudgeError(ValueError):
    """The judge's reply was unusable (or the endpoint failed): the prune then drops nothing."""


def judge_prompt(goal: str | None, segments: Sequence[tuple[int, str, str]]) -> str:
    """The question the judge answers, listing ``(id, role, text)`` of the live segments."""
    lines = [f"[{sid}] {role}: {text[:_JUDGE_SNIPPET_CHARS].strip()}" for sid, role, text in segments]
    return (
        "You manage the working memory of an AI agent. Its goal: "
        f"{goal.strip() if goal and goal.strip() else 'continue its current task'}\n\n"
        "Memory segments:\n" + "\n".join(lines) + "\n\n"
        "Which segments does the agent still need for its goal? Reply with JSON only, exactly "
        '{"needed": [<segment ids>]}.'
    )


def parse_needed(reply: str, live_ids: Sequence[int]) -> list[int]:
    """The judge's ``{"needed": [ids]}``, strictly: one JSON object (a code fence around it is allowed),
    only that key, integer ids of live segments. Anything else raises ``JudgeError``."""
    text = reply.strip()
    fence = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", text, flags=re.DOTALL)
    if fence:
        text = fence.group(1)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise JudgeError(f"the judge's reply is not JSON: {exc.msg}") from None
    if not isinstance(data, dict) or set(data) != {"needed"} or not isinstance(data["needed"], list):
        raise JudgeError('the judge\'s reply must be exactly {"needed": [<segment ids>]}')
    needed = data["needed"]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in needed):
        raise JudgeError("the judge's segment ids must be integers")
    unknown = sorted(set(needed) - set(live_ids))
    if unknown:
        raise JudgeError(f"the judge named segments that are not live: {unknown}")
    return sorted(set(needed))


class LocalJudge:
    """The loaded model, over a fresh cache (nothing of any session), greedy and constrained to the reply's
    JSON (:mod:`kvstore.model.constrained`): a small local model's prose would never parse."""

    def __init__(self, runner: Runner, lock: threading.Lock) -> None:
        self.runner, self.lock = runner, lock
        self._pieces: dict[int, str] | None = None

    def __call__(self, prompt: str, live_ids: Sequence[int]) -> str:
        tok = self.runner.tokenizer
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True)
            ids = self.runner.tokenize(text)
        else:
            ids = self.runner.tokenize(prompt + "\nAnswer: ", add_special=True)
        with self.lock:
            if self._pieces is None:
                self._pieces = list_tokens(tok)
            return greedy_id_list(self.runner, ids, '{"needed": [', live_ids, self._pieces)


class HttpJudge:
    """An OpenAI-compatible chat completions endpoint (``base_url`` like ``http://host:port/v1``)."""

    def __init__(self, base_url: str, model: str = "default", api_key: str | None = None,
                 timeout_s: float = 60.0) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key, self.timeout_s = model, api_key, timeout_s

    def __call__(self, prompt: str, live_ids: Sequence[int]) -> str:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        body = {"model": self.model, "temperature": 0, "response_format": {"type": "json_object"},
                "messages": [{"role": "user", "content": prompt}]}
        try:
            response = httpx.post(self.url, json=body, headers=headers, timeout=self.timeout_s)
            response.raise_for_status()
            return str(response.json()["choices"][0]["message"]["content"])
        except (httpx.HTTPError, KeyError, IndexError, TypeError, ValueError) as exc:
            raise JudgeError(f"the judge endpoint failed: {type(exc).__name__}") from None


# -- the store ----------------------------------------------------------------------------------


_STORES: WeakKeyDictionary[Engine, SessionStore] = WeakKeyDictionary()
_STORES_LOCK = threading.Lock()


def sessions_of(store: Engine) -> SessionStore:
    """The one ``SessionStore`` of a ``BankStore`` (made on first use)."""
    with _STORES_LOCK:
        found = _STORES.get(store)
        if found is None:
            found = _STORES[store] = SessionStore(store)
        return found


class SessionStore(RestorableSessions):
    """Sessions of every bank of one ``BankStore``: same catalog, model and model lock. Restore and purge of
    pruned segments: :mod:`kvstore.sessions.restore`."""

    def __init__(self, store: Engine) -> None:
        self.store = store
        self.settings = store.settings
        self.runner: Runner = store.runner
        settings = store.settings
        self.blobs: BlobStore = open_blob_store(settings.blob_url, settings.data_dir / "session-blobs",
                                                cache_bytes=settings.blob_cache_bytes,
                                                allow_http=settings.blob_allow_http)
        self._write_lock = threading.Lock()  # appends and prunes of this process, one at a time
        self._states = store.kv_memory

    # -- rows -------------------------------------------------------------------------------------

    def bank_row(self, s: Session, name: str) -> BankRow:
        row = s.scalar(select(BankRow).where(BankRow.name == name)) if isinstance(name, str) else None
        if row is None:
            raise NotFound(f"bank {name!r} not found")
        if row.model_fingerprint != self.store.llm.fingerprint:
            raise IncompatibleModel(f"bank {name!r} is bound to model {row.model_name!r}, not the loaded one")
        return row

    def _session(self, s: Session, bank: BankRow, session_id: str) -> AgentSessionRow:
        row = s.scalar(select(AgentSessionRow).where(AgentSessionRow.bank_id == bank.id,
                                                     AgentSessionRow.session_id == session_id))
        if row is None:
            raise NotFound(f"session {session_id!r} not found in bank {bank.name!r}")
        return row

    @staticmethod
    def _segments(s: Session, session: AgentSessionRow, live_only: bool = False) -> list[SessionSegmentRow]:
        q = select(SessionSegmentRow).where(SessionSegmentRow.session_pk == session.id)
        if live_only:
            q = q.where(SessionSegmentRow.pruned_at.is_(None))
        return list(s.scalars(q.order_by(SessionSegmentRow.ordinal)))

    # -- sessions ---------------------------------------------------------------------------------

    def create(self, bank: str, session_id: str | None = None, *, metadata: dict[str, Any] | None = None,
               agent: str | None = None) -> SessionInfo:
        """A new empty session; ``session_id`` defaults to a random one. 409 if the id is taken."""
        session_id = session_id or f"s-{uuid.uuid4().hex[:16]}"
        if not isinstance(session_id, str) or not SESSION_ID.match(session_id):
            raise ValidationFailed("session id must match [A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
        if metadata is not None and not isinstance(metadata, dict):
            raise ValidationFailed("metadata must be an object")
        if metadata and len(json.dumps(metadata)) > self.settings.max_metadata_bytes:
            raise ValidationFailed(f"metadata exceeds {self.settings.max_metadata_bytes} bytes")
        with self.store.sessions() as s:
            bank_row = self.bank_row(s, bank)
            row = AgentSessionRow(bank_id=bank_row.id, session_id=session_id, meta=metadata or {}, agent=agent,
                                  positions=0)
            s.add(row)
            try:
                s.commit()
            except IntegrityError:
                raise Conflict(f"session {session_id!r} already exists in bank {bank!r}") from None
            return self._info(s, bank_row, row)

    def get(self, bank: str, session_id: str, *, with_text: bool = True) -> SessionInfo:
        with self.store.sessions() as s:
            bank_row = self.bank_row(s, bank)
            return self._info(s, bank_row, self._session(s, bank_row, session_id), with_text)

    def list_sessions(self, bank: str, *, cursor: str | None = None, limit: int = 50
                      ) -> tuple[list[SessionSummary], str | None]:
        """A bank's sessions ordered by id, a page after ``cursor`` (the previous page's last id), with the
        next cursor; segment counts come from one grouped query for the whole page."""
        if limit < 1 or limit > 1000:
            raise ValidationFailed("limit must be between 1 and 1000")
        with self.store.sessions() as s:
            bank_row = self.bank_row(s, bank)
            q = select(AgentSessionRow).where(AgentSessionRow.bank_id == bank_row.id)
            if cursor:
                q = q.where(AgentSessionRow.session_id > cursor)
            rows = s.scalars(q.order_by(AgentSessionRow.session_id).limit(limit + 1)).all()
            page = rows[:limit]
            live = SessionSegmentRow.pruned_at.is_(None)
            counts = {r.session_pk: r for r in s.execute(
                select(SessionSegmentRow.session_pk, func.count().label("segments"),
                       func.sum(case((live, 0), else_=1)).label("pruned"),
                       func.sum(case((live, SessionSegmentRow.token_count), else_=0)).label("tokens"),
                       func.sum(SessionSegmentRow.token_count).label("total"))
                .where(SessionSegmentRow.session_pk.in_([r.id for r in page]))
                .group_by(SessionSegmentRow.session_pk))}
            out = []
            for r in page:
                c = counts.get(r.id)
                segments, pruned, tokens, total = (int(c.segments), int(c.pruned or 0), int(c.tokens or 0),
                                                   int(c.total or 0)) if c else (0, 0, 0, 0)
                out.append(SessionSummary(session_id=r.session_id, agent=r.agent, segments=segments,
                                          pruned_segments=pruned, tokens=tokens, total_tokens=total,
                                          created_at=r.created_at, updated_at=r.updated_at))
            return out, (page[-1].session_id if len(rows) > limit else None)

    def delete(self, bank: str, session_id: str) -> None:
        """Delete a session with its segments and the blobs no other session shares."""
        with self.store.sessions() as s, self._write_lock:
            bank_row = self.bank_row(s, bank)
            row = self._session(s, bank_row, session_id)
            blob_ids = set(s.scalars(select(SessionPageRow.blob_id).join(
                SessionSegmentRow, SessionSegmentRow.id == SessionPageRow.segment_pk).where(
                SessionSegmentRow.session_pk == row.id)))
            seg_ids = select(SessionSegmentRow.id).where(SessionSegmentRow.session_pk == row.id)
            s.execute(delete(SessionPageRow).where(SessionPageRow.segment_pk.in_(seg_ids)))
            s.execute(delete(SessionSegmentRow).where(SessionSegmentRow.session_pk == row.id))
            s.delete(row)
            s.commit()
            self._forget_state(bank_row.id, row.id)
            self.drop_unreferenced(s, blob_ids)

    @contextmanager
    def deleting_bank(self, s: Session, bank_id: int) -> Iterator[None]:
        """Around the transaction that deletes a bank: the catalog cascades to the bank's sessions, segments
        and pages; once the body has committed, their blobs that no other session (of any bank) shares are
        deleted and their live KV forgotten. Holding the write lock keeps an append from writing a shared
        blob between the reference count and the delete."""
        with self._write_lock:
            session_pks = list(s.scalars(select(AgentSessionRow.id).where(AgentSessionRow.bank_id == bank_id)))
            blob_ids = set(s.scalars(select(SessionPageRow.blob_id).join(
                SessionSegmentRow, SessionSegmentRow.id == SessionPageRow.segment_pk).where(
                SessionSegmentRow.session_pk.in_(session_pks)))) if session_pks else set()
            yield
            for pk in session_pks:
                self._forget_state(bank_id, pk)
            self.drop_unreferenced(s, blob_ids)

    def collect_orphans(self, grace_s: float) -> int:
        """Delete session blobs no page references, older than ``grace_s`` seconds: an append writes its
        blobs before the transaction that acknowledges it, so one that died in between leaves them behind
        (the grace period spares another process's append still in flight). Returns how many went."""
        cutoff = time.time() - grace_s
        removed = 0
        with self.store.sessions() as s, self._write_lock:
            blob_gc_lock(s, exclusive=True)  # appends on other replicas hold it shared from their puts to commit
            old = list(self.blobs.ids_older_than(cutoff))
            referenced = set(s.scalars(select(SessionPageRow.blob_id).distinct()))
            for blob_id in old:
                if blob_id not in referenced:
                    self.blobs.delete(blob_id)
                    removed += 1
            s.commit()
        return removed

    def _info(self, s: Session, bank: BankRow, row: AgentSessionRow, with_text: bool = True) -> SessionInfo:
        segments = self._segments(s, row)
        stored = s.scalar(select(func.coalesce(func.sum(SessionPageRow.stored_bytes), 0)).join(
            SessionSegmentRow, SessionSegmentRow.id == SessionPageRow.segment_pk).where(
            SessionSegmentRow.session_pk == row.id)) or 0
        infos = [SegmentInfo(id=g.ordinal, role=g.role, agent=g.agent, tokens=g.token_count, start=g.start,
                             pruned=g.pruned_at is not None, created_at=g.created_at,
                             text=g.text if with_text else None, prune_reason=g.prune_reason) for g in segments]
        return SessionInfo(session_id=row.session_id, bank=bank.name, metadata=dict(row.meta or {}), agent=row.agent,
                           segments=infos, tokens=sum(g.tokens for g in infos if not g.pruned),
                           total_tokens=sum(g.tokens for g in infos), stored_bytes=int(stored),
                           created_at=row.created_at, updated_at=row.updated_at)

    # -- live KV ----------------------------------------------------------------------------------

    def _forget_state(self, bank_id: int, session_pk: int) -> None:
        self._states.discard(bank_id, _STATE_KIND, session_pk)

    def _remember_state(self, bank_id: int, session_pk: int, state: SessionKV) -> None:
        """Keep the state within the KV budget; evicted, it is decoded from the blobs again when next used."""
        self._states.put(bank_id, _STATE_KIND, session_pk, state)

    def _state(self, s: Session, bank: BankRow, session: AgentSessionRow) -> SessionKV:
        """The live KV: the in-memory copy when it matches the catalog's live segments, else from the blobs."""
        live = self._segments(s, session, live_only=True)
        ids = tuple(g.id for g in live)
        cached = self._states.get(bank.id, _STATE_KIND, session.id)
        if isinstance(cached, SessionKV) and cached.segment_ids == ids:
            return cached
        pages = s.scalars(select(SessionPageRow).where(SessionPageRow.segment_pk.in_(ids)).order_by(
            SessionPageRow.segment_pk, SessionPageRow.ordinal)).all() if ids else []
        by_segment: dict[int, list[SessionPageRow]] = {}
        for page in pages:
            by_segment.setdefault(page.segment_pk, []).append(page)
        parts: list[BlockKV] = []
        positions: list[torch.Tensor] = []
        spans: list[tuple[int, int]] = []
        row = 0
        for g in live:
            segment_pages = by_segment.get(g.id, [])
            if sum(p.token_count for p in segment_pages) != g.token_count:
                raise CorruptBlock(f"session {session.session_id!r} segment {g.ordinal} has missing KV pages")
            parts.extend(decode_block(self.blobs.get(p.blob_id), bank.model_fingerprint) for p in segment_pages)
            positions.append(torch.arange(g.start, g.start + g.token_count, device=self.runner.llm.device))
            spans.append((row, g.token_count))
            row += g.token_count
        state = SessionKV(segment_ids=ids, kv=_concat(self.runner, parts),
                          positions=torch.cat(positions) if positions else torch.zeros(
                              0, dtype=torch.long, device=self.runner.llm.device),
                          spans=spans)
        self._remember_state(bank.id, session.id, state)
        return state

    def _context(self, state: SessionKV, next_offset: int, extra: BlockKV | None = None,
                 extra_positions: torch.Tensor | None = None) -> Context:
        """The prefix, the state's KV at its positions (and ``extra`` after it), next token at ``next_offset``."""
        p = len(self.runner.prefix_ids)
        kv, positions = state.kv, state.positions
        if extra is not None and extra_positions is not None:
            kv, positions = _concat(self.runner, [kv, extra]), torch.cat((positions, extra_positions))
        return self.runner.context_at(kv, positions + p, p + next_offset)

    # -- append -----------------------------------------------------------------------------------

    def _validate_segments(self, segments: Sequence[SegmentInput | dict[str, Any]]) -> list[SegmentInput]:
        if not isinstance(segments, list | tuple) or not 1 <= len(segments) <= MAX_SEGMENTS_PER_APPEND:
            raise ValidationFailed(f"segments must be a list of 1 to {MAX_SEGMENTS_PER_APPEND} segments")
        out = []
        for seg in segments:
            seg = seg if isinstance(seg, SegmentInput) else SegmentInput(**seg)
            if seg.role not in ROLES:
                raise ValidationFailed(f"segment role must be one of {ROLES}")
            if not isinstance(seg.text, str) or not seg.text.strip():
                raise ValidationFailed("segment text must be a non-empty string")
            if len(seg.text) > self.settings.max_document_chars:
                raise PayloadTooLarge(f"segment text exceeds {self.settings.max_document_chars} characters")
            out.append(seg)
        return out

    def append(self, bank: str, session_id: str, segments: Sequence[SegmentInput | dict[str, Any]], *,
               agent: str | None = None) -> AppendResult:
        """Prefill only the new segments after the session's live KV, persist their KV, acknowledge.

        ``agent`` (the writer) is recorded on segments that name none.
        """
        t0 = time.perf_counter()
        segs = self._validate_segments(segments)
        limits_of(self.store).check_segments([g.text for g in segs])
        runner = self.runner
        token_ids = [runner.tokenize(render_segment(g.role, g.text, g.agent or agent)) for g in segs]
        with self.store.sessions() as s, self._write_lock:
            bank_row = self.bank_row(s, bank)
            session = self._session(s, bank_row, session_id)
            state = self._state(s, bank_row, session)
            base = session.positions
            with self.store.model_lock:
                ctx = self._context(state, base)
                new = runner.extend(ctx, [t for ids in token_ids for t in ids])
            t_prefill = time.perf_counter()
            # Blobs first (atomic, fsynced), then one transaction: a crash in between leaves only orphan blobs.
            blob_gc_lock(s, exclusive=False)
            written: list[list[tuple[str, int, int]]] = []  # per segment: (blob id, tokens, bytes) per page
            decoded: list[BlockKV] = []
            row = 0
            for ids in token_ids:
                seg_kv = BlockKV(k=new.k[:, :, row:row + len(ids)], v=new.v[:, :, row:row + len(ids)])
                row += len(ids)
                pages = []
                for page in _pages(seg_kv, bank_row.block_tokens):
                    data = encode_block(page, bank_row.model_fingerprint, bank_row.codec)
                    pages.append((self.blobs.put(data), page.tokens, len(data)))
                    # The state keeps exactly what a reload from the blobs would give (lossy codecs too).
                    decoded.append(decode_block(data, bank_row.model_fingerprint))
                written.append(pages)
            last = s.scalar(select(func.max(SessionSegmentRow.ordinal)).where(
                SessionSegmentRow.session_pk == session.id))
            first_ordinal = 0 if last is None else last + 1
            now = utcnow()
            rows: list[SessionSegmentRow] = []
            start = base
            for i, (seg, ids) in enumerate(zip(segs, token_ids, strict=True)):
                rows.append(SessionSegmentRow(session_pk=session.id, ordinal=first_ordinal + i, role=seg.role,
                                              agent=seg.agent or agent, text=seg.text, token_ids=_ids_bytes(ids),
                                              start=start, token_count=len(ids), attention=[], created_at=now))
                start += len(ids)
            s.add_all(rows)
            s.flush()
            s.add_all([SessionPageRow(segment_pk=r.id, ordinal=j, token_count=n, blob_id=blob_id, stored_bytes=size)
                       for r, pages in zip(rows, written, strict=True)
                       for j, (blob_id, n, size) in enumerate(pages)])
            # Optimistic guard: another process appending to the same session moved ``positions`` first.
            moved = s.execute(update(AgentSessionRow).where(
                AgentSessionRow.id == session.id, AgentSessionRow.positions == base).values(
                positions=start, updated_at=now)).rowcount  # type: ignore[attr-defined]
            if moved != 1:
                s.rollback()
                raise Conflict(f"session {session_id!r} was appended to concurrently; retry")
            try:
                s.commit()
            except IntegrityError:
                s.rollback()
                raise Conflict(f"session {session_id!r} was appended to concurrently; retry") from None
            spans = list(state.spans)
            for ids in token_ids:
                spans.append((spans[-1][0] + spans[-1][1] if spans else 0, len(ids)))
            self._remember_state(bank_row.id, session.id, SessionKV(
                segment_ids=state.segment_ids + tuple(r.id for r in rows), kv=_concat(runner, [state.kv, *decoded]),
                positions=torch.cat((state.positions, torch.arange(base, start, device=state.positions.device))),
                spans=spans))
            return AppendResult(session_id=session_id, segment_ids=[r.ordinal for r in rows],
                                token_counts=[len(ids) for ids in token_ids], tokens=state.tokens + start - base,
                                prefill_ms=_ms(t_prefill - t0), total_ms=_ms(time.perf_counter() - t0))

    # -- brief ------------------------------------------------------------------------------------

    def brief(self, bank: str, session_id: str, task: str, *, budget_tokens: int | None = None,
              tau: float | None = None, selection: Selection = "segments", include_documents: int = 0,
              max_new_tokens: int = 64, on_token: Callable[[str], None] | None = None,
              started_at: float | None = None) -> BriefResult:
        """Answer ``task`` from a task-compacted slice of the session (all of it with neither budget nor tau),
        plus the top ``include_documents`` bank blocks placed after the trajectory. ``selection`` is how the
        kept tokens are chosen (:data:`kvstore.model.compaction.Selection`)."""
        t0 = started_at if started_at is not None else time.perf_counter()
        if not isinstance(task, str) or not task.strip():
            raise ValidationFailed("task must be a non-empty string")
        limits_of(self.store).check_task(task)
        compaction: dict[str, Any] = {k: v for k, v in (("tau", tau), ("budget_tokens", budget_tokens))
                                      if v is not None}
        try:
            spec = CompactionSpec.parse(compaction) if compaction else None
        except ValueError as exc:
            raise ValidationFailed(str(exc)) from None
        if selection not in SELECTIONS:
            raise ValidationFailed(f"selection must be one of {SELECTIONS}")
        if not 0 <= max_new_tokens <= self.settings.max_new_tokens:
            raise ValidationFailed(f"max_new_tokens must be between 0 and {self.settings.max_new_tokens}")
        if isinstance(include_documents, bool) or not 0 <= include_documents <= self.settings.max_k:
            raise ValidationFailed(f"include_documents must be between 0 and {self.settings.max_k}")
        runner = self.runner
        task_ids = runner.question_ids(task)
        with self.store.sessions() as s:
            bank_row = self.bank_row(s, bank)
            session = self._session(s, bank_row, session_id)
            state = self._state(s, bank_row, session)
            # The documents go after the trajectory: only those that fit the model's positions are read.
            fixed = len(runner.prefix_ids) + session.positions + len(task_ids) + max_new_tokens
            hits, docs = self._documents(s, bank, bank_row, task, include_documents, fixed)
            t_loaded = time.perf_counter()
            with self.store.model_lock:
                ctx, kept, scores = self._compact(state, session.positions, task_ids, spec, docs, selection)
                t_compacted = time.perf_counter()
                gen = runner.generate(ctx, task_ids, max_new_tokens, on_token)
            if scores is not None:
                self._record_attention(s, state, segment_attention(scores, state.spans, _sinks(state, scores)))
        t_end = time.perf_counter()
        timings = BriefTimings(load_ms=_ms(t_loaded - t0), compaction_ms=_ms(t_compacted - t_loaded),
                               prefill_ms=_ms(gen.ttft_s - t_compacted), ttft_ms=_ms(gen.ttft_s - t0),
                               total_ms=_ms(t_end - t0))
        return BriefResult(answer=gen.text, session_tokens=state.tokens, kept_tokens=kept,
                           document_tokens=docs.tokens if docs is not None else 0, task_tokens=len(task_ids),
                           generated_tokens=len(gen.token_ids), compaction_ms=timings.compaction_ms,
                           timings=timings, sources=hits)

    def briefing_context(self, bank: str, session_id: str, task: str, *, budget_tokens: int | None = None,
                         tau: float | None = None, selection: Selection = "segments") -> tuple[Context, int, int]:
        """The context a brief would answer ``task`` after, with the session's and the kept token counts
        (fidelity measurements: nothing is recorded)."""
        spec = CompactionSpec(tau=tau, budget_tokens=budget_tokens) if tau is not None or budget_tokens is not None \
            else None
        with self.store.sessions() as s:
            bank_row = self.bank_row(s, bank)
            session = self._session(s, bank_row, session_id)
            state = self._state(s, bank_row, session)
            with self.store.model_lock:
                ctx, kept, _ = self._compact(state, session.positions, self.runner.question_ids(task), spec, None,
                                             selection)
        return ctx, state.tokens, kept

    def _compact(self, state: SessionKV, next_offset: int, task_ids: Sequence[int], spec: CompactionSpec | None,
                 docs: BlockKV | None, selection: Selection = "segments") -> tuple[Context, int, torch.Tensor | None]:
        """(context, kept trajectory tokens, the task's attention per trajectory token or None when empty).

        The task is scored over the whole trajectory; the kept tokens stay at their positions and the
        documents' KV goes after the trajectory, the task after both. Callers hold the model lock.
        """
        ctx = self._context(state, next_offset)
        # The task's attention over the trajectory: the compaction signal and the attention prune's record.
        votes = question_votes(self.runner, ctx, task_ids) if state.tokens else None
        scores = votes("mean", 0) if votes is not None else None
        if (spec is None or scores is None) and docs is None:
            return ctx, state.tokens, scores
        kept = state
        if spec is not None and votes is not None and scores is not None:
            boundaries = torch.tensor([a for a, t in state.spans if t], dtype=torch.long, device=scores.device)
            keep = keep_mask(scores, spec, KEEP_FIRST, always=boundaries)
            if selection == "segments":
                # The token rule (tau and/or budget) says how many tokens to keep; segments spend them, ranked
                # by peak attention: on SQuAD trajectories the mean (kept for the prune's record) picked the
                # wrong passages and lost 0.8 nats of gold-answer NLL, the peak none (docs/BENCHMARKS.md).
                peak = votes("peak", COMPACTION_SKIP_LAYERS)
                keep = segment_keep_mask(peak, state.spans, int(keep.sum()))
            kept = SessionKV(segment_ids=state.segment_ids, positions=state.positions[keep], spans=[],
                             kv=BlockKV(k=state.kv.k[:, :, keep], v=state.kv.v[:, :, keep]))
        if docs is None:
            return self._context(kept, next_offset), kept.tokens, scores
        doc_positions = torch.arange(next_offset, next_offset + docs.tokens, device=state.positions.device)
        return self._context(kept, next_offset + docs.tokens, docs, doc_positions), kept.tokens, scores

    def _documents(self, s: Session, bank: str, bank_row: BankRow, task: str, k: int, fixed_tokens: int = 0
                   ) -> tuple[list[Hit], BlockKV | None]:
        """The top-k bank blocks for the task that fit the model's positions after ``fixed_tokens``, and their KV
        concatenated (None when k is 0 or nothing matched)."""
        if k == 0:
            return [], None
        hits = self.store.search(bank, task, k=k)
        rows = {r.id: r for r in s.scalars(select(BlockRow).where(
            BlockRow.bank_id == bank_row.id, BlockRow.id.in_([h.block_id for h in hits])))}
        hits = [h for h in hits if h.block_id in rows]
        hits = hits[:limits_of(self.store).blocks_that_fit([rows[h.block_id].token_count for h in hits], fixed_tokens)]
        blocks = [self.store.load_block(s, bank_row, rows[h.block_id]) for h in hits]
        return hits, (_concat(self.runner, blocks) if blocks else None)

    def _record_attention(self, s: Session, state: SessionKV, relative: Sequence[float]) -> None:
        rows = {g.id: g for g in s.scalars(select(SessionSegmentRow).where(
            SessionSegmentRow.id.in_(state.segment_ids)))}
        for seg_id, value in zip(state.segment_ids, relative, strict=True):
            if seg_id in rows:
                rows[seg_id].attention = [*(rows[seg_id].attention or []), round(value, 6)][-ATTENTION_HISTORY:]
        s.commit()

    # -- prune ------------------------------------------------------------------------------------

    def default_judge(self) -> Judge:
        """The ``KVRAG_MAP_LLM_URL`` endpoint when that setting is there and set, else the loaded model."""
        url = getattr(self.settings, "map_llm_url", None)
        if url:
            return HttpJudge(str(url), model=str(getattr(self.settings, "map_llm_model", None) or "default"),
                             api_key=getattr(self.settings, "map_llm_api_key", None),
                             timeout_s=float(getattr(self.settings, "map_llm_timeout_s", 60.0)))
        return LocalJudge(self.runner, self.store.model_lock)

    def prune_needs_model(self, policy: str) -> bool:
        """Whether a prune with ``policy`` and the default judge runs the loaded model. Only then does it belong
        on the model worker: a remote judge's network call (up to ``map_llm_timeout_s``) must not hold it."""
        return policy == "model" and not getattr(self.settings, "map_llm_url", None)

    def prune(self, bank: str, session_id: str, *, policy: PrunePolicy = "model", goal: str | None = None,
              window: int = 16, threshold: float = 0.25, judge: Judge | None = None) -> PruneResult:
        """Drop the KV of segments no longer useful; their text stays. ``model``: the judge (an auxiliary
        call; its tokens never enter the session) names the segments still needed for ``goal`` and every
        other live segment is pruned; a reply that does not parse prunes nothing and says why.
        ``attention``: segments whose mean share of the attention over their last ``window`` briefs is below
        ``threshold`` times an even share (1 / live segments; sinks left out) are pruned; a segment no brief
        has seen yet is kept."""
        if policy not in ("model", "attention"):
            raise ValidationFailed("policy must be 'model' or 'attention'")
        if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= ATTENTION_HISTORY:
            raise ValidationFailed(f"window must be between 1 and {ATTENTION_HISTORY}")
        if isinstance(threshold, bool) or not isinstance(threshold, int | float) or threshold < 0:
            raise ValidationFailed("threshold must be a non-negative number")
        if goal is not None and not isinstance(goal, str):
            raise ValidationFailed("goal must be a string")
        if goal is not None:
            limits_of(self.store).check_task(goal)  # the judge reads it: capped like a brief's task
        with self.store.sessions() as s:
            bank_row = self.bank_row(s, bank)
            session = self._session(s, bank_row, session_id)
            live = self._segments(s, session, live_only=True)
        self.purge_pruned(session.id)  # pages past their retention go before new ones are kept
        before = sum(g.token_count for g in live)
        judge_ms, error = 0.0, None
        if policy == "model":
            t0 = time.perf_counter()
            try:
                live_ids = [g.ordinal for g in live]
                reply = (judge or self.default_judge())(judge_prompt(goal, [(g.ordinal, g.role, g.text) for g in live]),
                                                        live_ids)
                needed = parse_needed(reply, live_ids)
                if live and not needed:  # stored text can steer the judge: "nothing is needed" is never obeyed
                    raise JudgeError("the judge named no segment as needed; refusing to prune the whole session")
            except JudgeError as exc:
                needed, error = [g.ordinal for g in live], str(exc)
            judge_ms = _ms(time.perf_counter() - t0)
            doomed = [g.id for g in live if g.ordinal not in set(needed)]  # oldest first
        else:
            low = [g for g in live if low_attention(g.attention or [], window, threshold)]
            window_mean = {g.id: sum((g.attention or [])[-window:]) / max(1, len((g.attention or [])[-window:]))
                           for g in low}
            doomed = [g.id for g in sorted(low, key=lambda g: (window_mean[g.id], g.ordinal))]  # least attended first
        cap = prune_cap(len(live), float(getattr(self.settings, "session_prune_max_fraction", 1.0)))
        doomed, spared = bound_doomed(doomed, cap)
        if policy == "attention":
            needed = [g.ordinal for g in live if g.id not in set(doomed)]
        ordinal_of = {g.id: g.ordinal for g in live}
        pruned = self._drop(bank, session_id, doomed, reason=policy)
        after = before - sum(g.token_count for g in live if g.ordinal in set(pruned))
        return PruneResult(policy=policy, pruned=pruned, needed=needed, tokens_before=before, tokens_after=after,
                           judge_ms=judge_ms, error=error, held_back=sorted(ordinal_of[i] for i in spared))

    def _drop(self, bank: str, session_id: str, segment_pks: Sequence[int], reason: str) -> list[int]:
        """Mark segments pruned; their pages are kept for restore during the retention period (deleted at once,
        with blobs no one else uses, when it is 0). Returns their ordinals."""
        if not segment_pks:
            return []
        with self.store.sessions() as s, self._write_lock:
            bank_row = self.bank_row(s, bank)
            session = self._session(s, bank_row, session_id)
            rows = s.scalars(select(SessionSegmentRow).where(
                SessionSegmentRow.id.in_(list(segment_pks)), SessionSegmentRow.session_pk == session.id,
                SessionSegmentRow.pruned_at.is_(None))).all()
            ids = [r.id for r in rows]
            blob_ids: set[str] = set()
            if not self.keeps_pages():  # else kept for restore until the retention ends (session_restore.py)
                blob_ids = set(s.scalars(select(SessionPageRow.blob_id).where(SessionPageRow.segment_pk.in_(ids))))
                s.execute(delete(SessionPageRow).where(SessionPageRow.segment_pk.in_(ids)))
            now = utcnow()
            for r in rows:
                r.pruned_at, r.prune_reason = now, reason
            session.updated_at = now
            s.commit()
            self.drop_unreferenced(s, blob_ids)
            return sorted(r.ordinal for r in rows)

    def drop_unreferenced(self, s: Session, blob_ids: set[str]) -> None:
        if not blob_ids:
            return
        blob_gc_lock(s, exclusive=True)
        for blob_id in blob_ids:
            if not s.scalar(select(func.count()).select_from(SessionPageRow).where(SessionPageRow.blob_id == blob_id)):
                self.blobs.delete(blob_id)
        s.commit()
