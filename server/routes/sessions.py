"""Agent sessions: create, append (prefill only the new tokens), brief a worker, prune, get, delete.

Appends, briefs and prunes run on the model worker; the orchestrator writes with a write key and
workers brief with read keys, so one session is shared under the bank's scopes.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from fastapi import APIRouter, Request, Response, status
from starlette.concurrency import run_in_threadpool

from kvstore.sessions import BriefResult, SegmentInput, sessions_of

from ..auth import Reader, Writer
from ..deps import Store, Worker, plain
from ..schemas import AppendIn, AppendOut, BriefIn, BriefOut, PruneIn, PruneOut, SessionCreate, SessionOut
from .common import ERRORS
from .retrieval import stream_events

router = APIRouter(prefix="/v1/banks/{bank}/sessions", tags=["sessions"], responses=ERRORS)


def _brief_out(result: BriefResult) -> dict[str, Any]:
    return BriefOut(**plain(result)).model_dump(mode="json")


@router.post("", operation_id="create_session", status_code=status.HTTP_201_CREATED, response_model=SessionOut)
async def create_session(bank: str, body: SessionCreate, store: Store, writer: Writer) -> SessionOut:
    """A new empty session (``session_id`` defaults to a random one; a taken id is 409)."""
    info = await run_in_threadpool(sessions_of(store).create, bank, body.session_id, metadata=body.metadata,
                                   agent=writer.agent)
    return SessionOut(**plain(info))


@router.get("/{session_id}", operation_id="get_session", response_model=SessionOut)
async def get_session(bank: str, session_id: str, store: Store, _reader: Reader) -> SessionOut:
    """Segments (pruned ones keep their text), live KV ``tokens`` and stored bytes."""
    return SessionOut(**plain(await run_in_threadpool(sessions_of(store).get, bank, session_id)))


@router.delete("/{session_id}", operation_id="delete_session", status_code=status.HTTP_204_NO_CONTENT,
               response_class=Response)
async def delete_session(bank: str, session_id: str, store: Store, _writer: Writer) -> Response:
    """Delete a session with its segments and KV."""
    await run_in_threadpool(sessions_of(store).delete, bank, session_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/{session_id}/append", operation_id="append_session", response_model=AppendOut)
async def append(bank: str, session_id: str, body: AppendIn, store: Store, worker: Worker,
                 writer: Writer) -> AppendOut:
    """Prefill only the new segments after the session's state and persist their KV; durable once answered."""
    segments = [SegmentInput(role=g.role, text=g.text, agent=g.agent) for g in body.segments]
    result = await worker.run(partial(sessions_of(store).append, bank, session_id, segments, agent=writer.agent))
    return AppendOut(**plain(result))


@router.post("/{session_id}/brief", operation_id="brief_session", response_model=BriefOut,
             responses={200: {"content": {"text/event-stream": {}},
                              "description": "JSON, or with stream=true events `token` ... then `done`"}})
async def brief(bank: str, session_id: str, body: BriefIn, request: Request, store: Store, worker: Worker,
                _reader: Reader) -> Any:
    """Answer ``task`` from the trajectory compacted to what the task attends to (Latent Briefing):
    ``budget_tokens`` and/or ``tau`` bound what is kept; neither keeps all of it."""
    call = partial(sessions_of(store).brief, bank, session_id, body.task, budget_tokens=body.budget_tokens,
                   tau=body.tau, selection=body.selection, include_documents=body.include_documents,
                   max_new_tokens=body.max_new_tokens,
                   started_at=request.state.started_at)
    if not body.stream:
        return _brief_out(await worker.run(call))
    await run_in_threadpool(sessions_of(store).get, bank, session_id, with_text=False)  # 404 before the stream
    return stream_events(request, worker, call, _brief_out)


@router.post("/{session_id}/prune", operation_id="prune_session", response_model=PruneOut)
async def prune(bank: str, session_id: str, body: PruneIn, store: Store, worker: Worker,
                _writer: Writer) -> PruneOut:
    """Drop the KV of segments no longer needed (``model``: the model's judgement in a separate call;
    ``attention``: ignored by the recent briefs). Their text stays; tokens before/after are reported."""
    result = await worker.run(partial(sessions_of(store).prune, bank, session_id, policy=body.policy,
                                      goal=body.goal, window=body.window, threshold=body.threshold))
    return PruneOut(**plain(result))
