"""The ``ingest`` job: a large batch of documents, written one model-worker call at a time.

Its input is the batch as accepted (stored before the 202). Each checkpoint stores the results so far; a
resumed job continues after the last checkpointed document, and a document written after that checkpoint but
before the crash is simply written again (same text: a no-op that answers ``changed: false``).
"""

from __future__ import annotations

from functools import partial
from typing import Any

from kvstore.bank import BankStore
from kvstore.errors import KVRagError
from kvstore.types import PutResult

from ..deps import plain
from ..schemas import DocumentItem, DocumentPut, PutOut
from .runner import JobContext, JobError

KIND = "ingest"


def put_call(store: BankStore, bank: str, doc: DocumentPut, doc_id: str, agent: str | None,
             if_match: int | None = None) -> partial[PutResult]:
    return partial(store.put_document, bank, doc_id, doc.text, metadata=doc.metadata, tags=doc.tags,
                   pinned=doc.pinned, agent=agent, if_match=if_match)


def put_out(result: PutResult) -> dict[str, Any]:
    return PutOut(**plain(result)).model_dump(mode="json")


def job_input(docs: list[DocumentItem], agent: str | None) -> dict[str, Any]:
    """What the job stores to run (and resume) the batch: the documents and the writing key's agent."""
    return {"documents": [d.model_dump(mode="json") for d in docs], "agent": agent}


async def run(ctx: JobContext) -> dict[str, Any]:
    """Write the documents in order, checkpointing results; stop at the first failure (kept as the error)."""
    bank, agent = ctx.job.bank, ctx.job.input.get("agent")
    docs = [DocumentItem(**d) for d in ctx.job.input.get("documents", [])]
    results: list[dict[str, Any]] = list(ctx.job.state.get("results", []))
    await ctx.progress(done=len(results), total=len(docs), step="write", force=True)
    for doc in docs[len(results):]:
        try:
            results.append(put_out(await ctx.model(put_call(ctx.store, bank, doc, doc.id, agent))))
        except KVRagError as exc:
            raise JobError(f"{exc.code}: {exc.detail}", result={"results": results}) from exc
        await ctx.progress(done=len(results), state={"results": results}, force=len(results) == len(docs))
    return {"results": results}
