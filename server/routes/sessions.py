"""Agent sessions: create, append (prefill only the new tokens), brief a worker, prune, restore, get, delete.

Appends, briefs and prunes run on the model worker; the orchestrator writes with a write key and
workers brief with read keys, so one session is shared under the bank's scopes. A session belongs to the
agent of the key that created it: a write key deletes and prunes only its own agent's sessions (an owner or
admin key any), and a segment's agent is the writing key's (a body naming another agent is refused; only the
admin key, which has no agent, may attribute segments, e.g. to import a trajectory).
"""

from __future__ import annotations

from functools import partial
from typing import Any

from fastapi import APIRouter, Request, Response, status
from starlette.concurrency import run_in_threadpool

from kvstore.bank import BankStore
from kvstore.errors import Forbidden
from kvstore.sessions.values import BriefResult, SegmentInput

from ..auth import Principal, Reader, Writer
from ..deps import Store, Worker, plain
from ..errors import redact
from ..schemas import (
    AppendIn,
    AppendOut,
    BriefIn,
    BriefOut,
    PruneIn,
    PruneOut,
    RestoreIn,
    RestoreOut,
    SessionCreate,
    SessionOut,
)
from .common import ERRORS, IdempotencyKey, replayable
from .retrieval import stream_events

router = APIRouter(prefix="/v1/banks/{bank}/sessions", tags=["sessions"], responses=ERRORS)


def _brief_out(result: BriefResult) -> dict[str, Any]:
    return BriefOut(**plain(result)).model_dump(mode="json")


async def _check_manages(store: BankStore, bank: str, session_id: str, principal: Principal) -> None:
    """403 unless ``principal`` may delete or prune the session: an owner, or its own agent's (404 first)."""
    if principal.has_role("owner"):
        return
    info = await run_in_threadpool(store.agent_sessions.get, bank, session_id, with_text=False)
    if info.agent is None or info.agent != principal.agent:
        raise Forbidden("a write key deletes and prunes only its own agent's sessions; this needs an owner key")


def _check_attribution(body: AppendIn, principal: Principal) -> None:
    """A key writes as its own agent; only a principal without one (the admin key) may name another."""
    if principal.agent is None:
        return
    for segment in body.segments:
        if segment.agent is not None and segment.agent != principal.agent:
            raise Forbidden(f"this key appends as agent {principal.agent!r}, not {segment.agent!r}")


@router.post("", operation_id="create_session", status_code=status.HTTP_201_CREATED, response_model=SessionOut)
async def create_session(bank: str, body: SessionCreate, request: Request, store: Store, writer: Writer,
                         idempotency_key: IdempotencyKey = None) -> Response:
    """A new empty session (``session_id`` defaults to a random one; a taken id is 409)."""

    async def work() -> SessionOut:
        info = await run_in_threadpool(partial(store.agent_sessions.create, bank, body.session_id,
                                               metadata=body.metadata, agent=writer.agent))
        return SessionOut(**plain(info))

    return await replayable(request, store, bank, idempotency_key, body.model_dump(mode="json"), work,
                            status.HTTP_201_CREATED)


@router.get("/{session_id}", operation_id="get_session", response_model=SessionOut)
async def get_session(bank: str, session_id: str, store: Store, _reader: Reader) -> SessionOut:
    """Segments (pruned ones keep their text), live KV ``tokens`` and stored bytes."""
    return SessionOut(**plain(await run_in_threadpool(store.agent_sessions.get, bank, session_id)))


@router.delete("/{session_id}", operation_id="delete_session", status_code=status.HTTP_204_NO_CONTENT,
               response_class=Response)
async def delete_session(bank: str, session_id: str, request: Request, store: Store, writer: Writer,
                         idempotency_key: IdempotencyKey = None) -> Response:
    """Delete a session with its segments and KV (a write key: only its own agent's)."""

    async def work() -> None:
        await _check_manages(store, bank, session_id, writer)
        await run_in_threadpool(store.agent_sessions.delete, bank, session_id)

    return await replayable(request, store, bank, idempotency_key, {}, work, status.HTTP_204_NO_CONTENT)


@router.post("/{session_id}/append", operation_id="append_session", response_model=AppendOut)
async def append(bank: str, session_id: str, body: AppendIn, request: Request, store: Store, worker: Worker,
                 writer: Writer, idempotency_key: IdempotencyKey = None) -> Response:
    """Prefill only the new segments after the session's state and persist their KV; durable once answered.
    Segments are attributed to the key's agent (naming another one is a 403). A resend with the same
    Idempotency-Key gets the first answer instead of appending the segments again."""
    _check_attribution(body, writer)
    segments = [SegmentInput(role=g.role, text=g.text, agent=g.agent) for g in body.segments]

    async def work() -> AppendOut:
        # Over a token cap: 413 before the append queues behind model work.
        await run_in_threadpool(store.limits.check_segments, [g.text for g in segments])
        call = partial(store.agent_sessions.append, bank, session_id, segments, agent=writer.agent)
        return AppendOut(**plain(await worker.run(call)))

    return await replayable(request, store, bank, idempotency_key, body.model_dump(mode="json"), work)


@router.post("/{session_id}/brief", operation_id="brief_session", response_model=BriefOut,
             responses={200: {"content": {"text/event-stream": {}},
                              "description": "JSON, or with stream=true events `token` ... then `done`"}})
async def brief(bank: str, session_id: str, body: BriefIn, request: Request, store: Store, worker: Worker,
                _reader: Reader) -> Any:
    """Answer ``task`` from the trajectory compacted to what the task attends to (Latent Briefing):
    ``budget_tokens`` and/or ``tau`` bound what is kept; neither keeps all of it."""
    await run_in_threadpool(store.limits.check_task, body.task)  # 413 before queueing
    call = partial(store.agent_sessions.brief, bank, session_id, body.task, budget_tokens=body.budget_tokens,
                   tau=body.tau, selection=body.selection, include_documents=body.include_documents,
                   max_new_tokens=body.max_new_tokens,
                   started_at=request.state.started_at)
    if not body.stream:
        return _brief_out(await worker.run(call))
    await run_in_threadpool(store.agent_sessions.get, bank, session_id, with_text=False)  # 404 before the stream
    return stream_events(request, worker, call, _brief_out)


@router.post("/{session_id}/prune", operation_id="prune_session", response_model=PruneOut)
async def prune(bank: str, session_id: str, body: PruneIn, request: Request, store: Store, worker: Worker,
                writer: Writer, idempotency_key: IdempotencyKey = None) -> Response:
    """Drop the KV of segments no longer needed (``model``: the model's judgement in a separate call;
    ``attention``: ignored by the recent briefs). Their text stays; tokens before/after are reported.
    A write key prunes only its own agent's sessions."""
    call = partial(store.agent_sessions.prune, bank, session_id, policy=body.policy, goal=body.goal,
                   window=body.window, threshold=body.threshold)

    async def work() -> PruneOut:
        await _check_manages(store, bank, session_id, writer)
        # A remote judge (KVRAG_MAP_LLM_URL) or the attention policy needs no model: off the worker, so the
        # judge's network call never holds up the queries and appends queued behind it.
        needs_model = store.agent_sessions.prune_needs_model(body.policy)
        result = await (worker.run(call) if needs_model else run_in_threadpool(call))
        if result.error:
            result.error = redact(result.error)
        return PruneOut(**plain(result))

    return await replayable(request, store, bank, idempotency_key, body.model_dump(mode="json"), work)


@router.post("/{session_id}/restore", operation_id="restore_session", response_model=RestoreOut)
async def restore(bank: str, session_id: str, body: RestoreIn, request: Request, store: Store, writer: Writer,
                  idempotency_key: IdempotencyKey = None) -> Response:
    """Make pruned segments live again, with the KV and positions they had (``segments``; default every
    restorable one). A prune keeps their KV for KVRAG_SESSION_PRUNE_RETENTION_S; naming one pruned longer ago
    is a 409. Like prune, a write key restores only its own agent's sessions."""
    call = partial(store.agent_sessions.restore, bank, session_id, body.segments)

    async def work() -> RestoreOut:
        await _check_manages(store, bank, session_id, writer)
        return RestoreOut(**plain(await run_in_threadpool(call)))

    return await replayable(request, store, bank, idempotency_key, body.model_dump(mode="json"), work)
