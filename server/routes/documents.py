"""Documents: put (If-Match, Idempotency-Key), batch put (large batches become jobs), get, list, delete."""

from __future__ import annotations

import json
from functools import partial
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response, status
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from kvstore.banks.documents import validate_doc_id
from kvstore.errors import PayloadTooLarge, ValidationFailed

from ..auth import Reader, Writer
from ..deps import Store, Worker, plain
from ..jobs import ingest
from ..jobs.submit import JOB_RESPONSES, submit
from ..schemas import (
    BatchOut,
    DocumentBatch,
    DocumentFull,
    DocumentItem,
    DocumentOut,
    DocumentPage,
    DocumentPut,
    PutOut,
)
from ..settings import ServerSettings
from .common import ERRORS, IdempotencyKey, etag, idempotent, parse_if_match, replayable

router = APIRouter(tags=["documents"], responses=ERRORS)
IfMatch = Annotated[str | None, Header(description="The version you last saw; 0 = must not exist yet.")]


def _precheck(settings: ServerSettings, item: DocumentItem) -> None:
    """Reject a bad document before any of a batch is written, so a bad batch stores nothing."""
    validate_doc_id(item.id)
    if not item.text.strip():
        raise ValidationFailed(f"document {item.id!r}: text must be a non-empty string")
    if len(item.text) > settings.max_document_chars:
        raise PayloadTooLarge(f"document {item.id!r}: text exceeds {settings.max_document_chars} characters")
    if item.metadata and len(json.dumps(item.metadata)) > settings.max_metadata_bytes:
        raise ValidationFailed(f"document {item.id!r}: metadata exceeds {settings.max_metadata_bytes} bytes")


@router.put("/v1/banks/{bank}/documents/{doc_id}", operation_id="put_document", response_model=PutOut,
            responses={201: {"model": PutOut, "description": "Created"}})
async def put_document(bank: str, doc_id: str, body: DocumentPut, request: Request, store: Store, worker: Worker,
                       principal: Writer, if_match: IfMatch = None,
                       idempotency_key: IdempotencyKey = None) -> JSONResponse:
    """Store a document (201 when new). Same text again is a no-op; new text makes a new version."""
    validate_doc_id(doc_id)
    version = parse_if_match(if_match)

    async def work() -> tuple[int, dict[str, Any]]:
        result = await worker.run(ingest.put_call(store, bank, body, doc_id, principal.agent, version))
        return (status.HTTP_201_CREATED if result.created else status.HTTP_200_OK), ingest.put_out(result)

    payload = {"body": body.model_dump(mode="json"), "if_match": version}
    code, out = await idempotent(request, store, bank, idempotency_key, payload, work)
    return JSONResponse(out, status_code=code, headers={"ETag": etag(out["document"]["version"])})


@router.post("/v1/banks/{bank}/documents", operation_id="put_documents", response_model=BatchOut,
             responses=JOB_RESPONSES)
async def put_documents(bank: str, body: DocumentBatch, request: Request, store: Store, worker: Worker,
                        principal: Writer, idempotency_key: IdempotencyKey = None) -> JSONResponse:
    """Store many documents: answered in place up to the batch threshold, else as a durable job to poll
    (``GET /v1/jobs/{job_id}``; 429 when the key already has ``KVRAG_JOBS_PER_KEY`` jobs unfinished)."""
    settings: ServerSettings = request.app.state.settings
    for item in body.documents:
        _precheck(settings, item)
    await run_in_threadpool(store.get_bank, bank)  # 404 now rather than inside a job

    async def work() -> tuple[int, dict[str, Any]]:
        if len(body.documents) <= settings.batch_job_threshold:
            results = [ingest.put_out(await worker.run(ingest.put_call(store, bank, d, d.id, principal.agent)))
                       for d in body.documents]
            return status.HTTP_200_OK, {"results": results}
        return status.HTTP_202_ACCEPTED, await submit(request, store, principal, kind=ingest.KIND, bank=bank,
                                                      input=ingest.job_input(body.documents, principal.agent),
                                                      total=len(body.documents))

    code, out = await idempotent(request, store, bank, idempotency_key, body.model_dump(mode="json"), work)
    headers = {"Location": f"/v1/jobs/{out['job_id']}"} if code == status.HTTP_202_ACCEPTED else None
    return JSONResponse(out, status_code=code, headers=headers)


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
