"""Documents: put (If-Match, Idempotency-Key), batch put (large batches become jobs), get, list, delete."""

from __future__ import annotations

import asyncio
import json
import logging
from functools import partial
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Header, Query, Request, Response, status
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from kvstore import jobs
from kvstore.bank import BankStore, PutResult, validate_doc_id
from kvstore.config import Settings
from kvstore.errors import KVRagError, NotFound, PayloadTooLarge, Unavailable, ValidationFailed

from ..auth import AnyKey, Reader, Writer
from ..deps import Store, Worker, plain
from ..errors import redact
from ..schemas import (
    BatchOut,
    DocumentBatch,
    DocumentFull,
    DocumentItem,
    DocumentOut,
    DocumentPage,
    DocumentPut,
    JobAccepted,
    JobOut,
    JobPage,
    PutOut,
)
from ..worker import ModelWorker
from .common import ERRORS, IdempotencyKey, etag, idempotent, parse_if_match, replayable

log = logging.getLogger(__name__)

router = APIRouter(tags=["documents"], responses=ERRORS)
IfMatch = Annotated[str | None, Header(description="The version you last saw; 0 = must not exist yet.")]


def _put_out(result: PutResult) -> dict[str, Any]:
    return PutOut(**plain(result)).model_dump(mode="json")


def _precheck(settings: Settings, item: DocumentItem) -> None:
    """Reject a bad document before any of a batch is written, so a bad batch stores nothing."""
    validate_doc_id(item.id)
    if not item.text.strip():
        raise ValidationFailed(f"document {item.id!r}: text must be a non-empty string")
    if len(item.text) > settings.max_document_chars:
        raise PayloadTooLarge(f"document {item.id!r}: text exceeds {settings.max_document_chars} characters")
    if item.metadata and len(json.dumps(item.metadata)) > settings.max_metadata_bytes:
        raise ValidationFailed(f"document {item.id!r}: metadata exceeds {settings.max_metadata_bytes} bytes")


def _put_call(store: BankStore, bank: str, doc: DocumentPut, doc_id: str, agent: str | None,
              if_match: int | None = None) -> partial[PutResult]:
    return partial(store.put_document, bank, doc_id, doc.text, metadata=doc.metadata, tags=doc.tags,
                   pinned=doc.pinned, agent=agent, if_match=if_match)


@router.put("/v1/banks/{bank}/documents/{doc_id}", operation_id="put_document", response_model=PutOut,
            responses={201: {"model": PutOut, "description": "Created"}})
async def put_document(bank: str, doc_id: str, body: DocumentPut, request: Request, store: Store, worker: Worker,
                       principal: Writer, if_match: IfMatch = None,
                       idempotency_key: IdempotencyKey = None) -> JSONResponse:
    """Store a document (201 when new). Same text again is a no-op; new text makes a new version."""
    validate_doc_id(doc_id)
    version = parse_if_match(if_match)

    async def work() -> tuple[int, dict[str, Any]]:
        result = await worker.run(_put_call(store, bank, body, doc_id, principal.agent, version))
        return (status.HTTP_201_CREATED if result.created else status.HTTP_200_OK), _put_out(result)

    payload = {"body": body.model_dump(mode="json"), "if_match": version}
    code, out = await idempotent(request, store, bank, idempotency_key, payload, work)
    return JSONResponse(out, status_code=code, headers={"ETag": etag(out["document"]["version"])})


@router.post("/v1/banks/{bank}/documents", operation_id="put_documents", response_model=BatchOut,
             responses={202: {"model": JobAccepted, "description": "Accepted as a background job"}})
async def put_documents(bank: str, body: DocumentBatch, request: Request, store: Store, worker: Worker,
                        principal: Writer, idempotency_key: IdempotencyKey = None) -> JSONResponse:
    """Store many documents: answered in place up to the batch threshold, else as a job to poll."""
    settings: Settings = request.app.state.settings
    for item in body.documents:
        _precheck(settings, item)
    await run_in_threadpool(store.get_bank, bank)  # 404 now rather than inside a job

    async def work() -> tuple[int, dict[str, Any]]:
        if len(body.documents) <= settings.batch_job_threshold:
            results = [_put_out(await worker.run(_put_call(store, bank, d, d.id, principal.agent)))
                       for d in body.documents]
            return status.HTTP_200_OK, {"results": results}
        job = await run_in_threadpool(partial(jobs.create_job, store.sessions, kind="ingest", bank=bank,
                                              total=len(body.documents)))
        _spawn(request.app, _ingest_job(store, worker, job.id, bank, body.documents, principal.agent))
        return status.HTTP_202_ACCEPTED, JobAccepted(job_id=job.id, status=job.status).model_dump()

    code, out = await idempotent(request, store, bank, idempotency_key, body.model_dump(mode="json"), work)
    return JSONResponse(out, status_code=code)


def _spawn(app: FastAPI, coro: Any) -> None:
    """Run a job in the background, holding a reference so it is not collected, cancelled at shutdown."""
    task = asyncio.create_task(coro)
    app.state.tasks.add(task)
    task.add_done_callback(app.state.tasks.discard)


async def _run_when_free(worker: ModelWorker, call: partial[PutResult], retry_s: float = 0.05) -> PutResult:
    """A job yields to interactive requests: when the queue is full it waits instead of failing."""
    while True:
        try:
            return await worker.run(call)
        except Unavailable:
            await asyncio.sleep(retry_s)


async def _ingest_job(store: BankStore, worker: ModelWorker, job_id: str, bank: str, docs: list[DocumentItem],
                      agent: str | None) -> None:
    """Write the documents one worker call at a time, recording progress; stop at the first failure."""
    update = partial(jobs.update_job, store.sessions, job_id)
    results: list[dict[str, Any]] = []
    try:
        await run_in_threadpool(partial(update, status="running"))
        for done, doc in enumerate(docs, start=1):
            results.append(_put_out(await _run_when_free(worker, _put_call(store, bank, doc, doc.id, agent))))
            await run_in_threadpool(partial(update, done=done))
        await run_in_threadpool(partial(update, status="succeeded", result={"results": results}))
    except KVRagError as exc:
        await run_in_threadpool(partial(update, status="failed", error=f"{exc.code}: {exc.detail}",
                                        result={"results": results}))
    except Exception:  # noqa: BLE001 - a job must end in a recorded state, whatever happened
        log.exception("ingest job %s failed", job_id)
        await run_in_threadpool(partial(update, status="failed", error="internal error",
                                        result={"results": results}))


@router.get("/v1/jobs/{job_id}", operation_id="get_job", response_model=JobOut)
def get_job(job_id: str, store: Store, principal: AnyKey) -> JobOut:
    """A background job's status and progress (404 for a job on a bank outside the key's scope)."""
    job = jobs.get_job(store.sessions, job_id)
    if not principal.can_see(job.bank):
        raise NotFound(f"job {job_id!r} not found")
    out = JobOut(**plain(job))
    out.error = redact(out.error) if out.error else out.error
    return out


@router.get("/v1/banks/{bank}/jobs", operation_id="list_jobs", response_model=JobPage)
def list_jobs(bank: str, store: Store, _reader: Reader,
              cursor: Annotated[str | None, Query(max_length=128)] = None,
              limit: Annotated[int, Query(ge=1, le=1000)] = 50) -> JobPage:
    """The bank's background jobs, newest first, a page at a time; pass ``next_cursor`` back for the next."""
    store.get_bank(bank)  # 404 for a bank that does not exist, as every bank route answers
    page, next_cursor = jobs.list_jobs(store.sessions, bank, cursor=cursor, limit=limit)
    return JobPage(jobs=[JobOut(**plain(j)) for j in page], next_cursor=next_cursor)


@router.get("/v1/banks/{bank}/documents", operation_id="list_documents", response_model=DocumentPage)
def list_documents(bank: str, store: Store, _reader: Reader,
                   cursor: Annotated[str | None, Query(max_length=128)] = None,
                   limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> DocumentPage:
    """Documents ordered by id, a page at a time; pass ``next_cursor`` back for the next page."""
    docs, next_cursor = store.list_documents(bank, cursor=cursor, limit=limit)
    return DocumentPage(documents=[DocumentOut(**plain(d)) for d in docs], next_cursor=next_cursor)


@router.get("/v1/banks/{bank}/documents/{doc_id}", operation_id="get_document", response_model=DocumentFull)
def get_document(bank: str, doc_id: str, store: Store, _reader: Reader) -> JSONResponse:
    """One document with its text; ``ETag`` is its version."""
    doc = DocumentFull(**plain(store.get_document(bank, doc_id)))
    return JSONResponse(doc.model_dump(mode="json"), headers={"ETag": etag(doc.version)})


@router.delete("/v1/banks/{bank}/documents/{doc_id}", operation_id="delete_document",
               status_code=status.HTTP_204_NO_CONTENT, response_class=Response)
async def delete_document(bank: str, doc_id: str, request: Request, store: Store, principal: Writer,
                          if_match: IfMatch = None, idempotency_key: IdempotencyKey = None) -> Response:
    """Delete a document and its blocks (``If-Match`` honoured); a resend with the same Idempotency-Key gets
    the first answer (204), not a 404."""
    version = parse_if_match(if_match)

    async def work() -> None:
        await run_in_threadpool(partial(store.delete_document, bank, doc_id, if_match=version, agent=principal.agent))

    return await replayable(request, store, bank, idempotency_key, {"if_match": version}, work,
                            status.HTTP_204_NO_CONTENT)
