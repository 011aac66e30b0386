"""Every REST call of the v1 API as a ``Call``: the sync and async clients only differ in how they send it."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from pydantic import BaseModel

from . import _ids as ids
from ._base import Call
from .types import (
    ApiKey,
    Bank,
    ContextMap,
    ContextMapEdit,
    ContextMapEditResult,
    ContextMapFeedback,
    ContextMapRefresh,
    Document,
    DocumentInput,
    Health,
    Hit,
    Job,
    MaintenanceReport,
    PutResult,
    QueryKnobs,
    QueryResult,
    Retrieval,
    SearchFilter,
)
from .types import BankOptions as BankOptions
from .types import KeyRole as KeyRole
from .types import Mode as Mode

FilterLike = SearchFilter | Mapping[str, Any] | None
EditLike = ContextMapEdit | Mapping[str, Any]
FeedbackLike = ContextMapFeedback | Mapping[str, Any]
DocumentLike = DocumentInput | Mapping[str, Any]


class DocumentPage(BaseModel):
    documents: list[Document]
    next_cursor: str | None = None


class JobPage(BaseModel):
    jobs: list[Job]
    next_cursor: str | None = None


def _bank_path(bank: str) -> str:
    """``/v1/banks/{bank}``; every id put in a path is checked first (``_ids``: no dot segment gets through)."""
    return f"/v1/banks/{ids.segment(ids.bank_name(bank))}"


def _doc_path(bank: str, doc_id: str) -> str:
    return f"{_bank_path(bank)}/documents/{ids.segment(ids.doc_id(doc_id))}"


def _none(_: Any) -> None:
    return None


def _filter(flt: FilterLike) -> dict[str, Any] | None:
    if flt is None:
        return None
    model = flt if isinstance(flt, SearchFilter) else SearchFilter.model_validate(dict(flt))
    return model.model_dump(exclude_none=True) or None


def _if_match(version: int | str | None) -> dict[str, str]:
    """``If-Match: <version>``: the write applies only if the stored version is still that one (0: new)."""
    return {} if version is None else {"If-Match": str(version)}


def _drop_none(body: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if v is not None}


# -- health -----------------------------------------------------------------------------------------


def health() -> Call[Health]:
    return Call("GET", "/healthz", lambda d: Health.model_validate(d if isinstance(d, dict) else {"status": d}))


def ready() -> Call[None]:
    # Readiness is asked repeatedly by callers that wait; a retry loop inside would only hide the answer.
    return Call("GET", "/readyz", _none, retries=False)


# -- keys -------------------------------------------------------------------------------------------


def create_key(name: str, agent: str, role: KeyRole, banks: Iterable[str]) -> Call[ApiKey]:
    body = {"name": name, "agent": agent, "role": role, "banks": list(banks)}
    # Never resent, and no Idempotency-Key: a replayed answer would have to keep the secret on the server.
    return Call("POST", "/v1/keys", ApiKey.model_validate, json=body)


def list_keys() -> Call[list[ApiKey]]:
    return Call("GET", "/v1/keys", lambda d: [ApiKey.model_validate(k) for k in d["keys"]])


def delete_key(key_id: str) -> Call[None]:
    return Call("DELETE", f"/v1/keys/{ids.segment(ids.opaque_id('key id', key_id))}", _none)


# -- banks ------------------------------------------------------------------------------------------


def create_bank(name: str, options: BankOptions) -> Call[Bank]:
    return Call("POST", "/v1/banks", Bank.model_validate, json={"name": ids.bank_name(name), **options.body()},
                keyed=True)


def list_banks() -> Call[list[Bank]]:
    return Call("GET", "/v1/banks", lambda d: [Bank.model_validate(b) for b in d["banks"]])


def get_bank(name: str) -> Call[Bank]:
    return Call("GET", _bank_path(name), Bank.model_validate)


def update_bank(name: str, changes: BankOptions) -> Call[Bank]:
    # PATCH with only the given fields; resending the same changes gives the same state.
    return Call("PATCH", _bank_path(name), Bank.model_validate, json=changes.body(), keyed=True)


def delete_bank(name: str) -> Call[None]:
    # No Idempotency-Key: the server's record of it would go with the bank; a resent delete may answer 404.
    return Call("DELETE", _bank_path(name), _none)


def _accepted(kind: str, bank: str) -> Callable[[Mapping[str, Any]], Job]:
    def parse(data: Mapping[str, Any]) -> Job:
        return Job(id=data["job_id"], kind=kind, bank=bank, status=data.get("status", "queued"))

    return parse


def maintain_bank(name: str, steps: Mapping[str, bool | None]) -> Call[Job]:
    # A job (202): the Idempotency-Key makes a resend after a lost answer get the same job, not a second run.
    return Call("POST", f"{_bank_path(name)}/maintenance", _accepted("maintenance", name), json=_drop_none(steps),
                keyed=True)


def maintenance_report(result: Any) -> MaintenanceReport:
    """A finished maintenance job's result as the report."""
    return MaintenanceReport.model_validate(result)


# -- documents --------------------------------------------------------------------------------------


def put_document(bank: str, doc_id: str, text: str, metadata: Mapping[str, Any] | None, tags: Iterable[str] | None,
                 pinned: bool, if_match: int | str | None, idempotency_key: str | None) -> Call[PutResult]:
    body = _drop_none({"text": text, "metadata": None if metadata is None else dict(metadata),
                       "tags": None if tags is None else list(tags), "pinned": pinned})
    headers = _if_match(if_match)
    if idempotency_key is not None:
        headers["Idempotency-Key"] = idempotency_key
    return Call("PUT", _doc_path(bank, doc_id), PutResult.model_validate, json=body, headers=headers, keyed=True)


def _batch_answer(data: Mapping[str, Any]) -> list[PutResult] | Job:
    if "job_id" in data:
        return Job(id=data["job_id"], status=data.get("status", "queued"))
    return [PutResult.model_validate(r) for r in data["results"]]


def put_documents(bank: str, docs: Iterable[DocumentLike], idempotency_key: str | None) -> Call[list[PutResult] | Job]:
    items = [(d if isinstance(d, DocumentInput) else DocumentInput.model_validate(dict(d))).model_dump(
        exclude_none=True) for d in docs]
    headers = {} if idempotency_key is None else {"Idempotency-Key": idempotency_key}
    # Each document is an upsert by id, so resending the batch cannot duplicate anything; the key also makes a
    # resent large batch answer with the first one's job instead of starting a second job.
    return Call("POST", f"{_bank_path(bank)}/documents", _batch_answer, json={"documents": items}, headers=headers,
                keyed=True)


def job_results(job: Job) -> list[PutResult]:
    """The per-document results a finished batch job carries (``{"results": [...]}`` or a bare list)."""
    result = job.result
    if isinstance(result, Mapping):
        result = result.get("results", [])
    return [PutResult.model_validate(r) for r in result or []]


def list_documents(bank: str, cursor: str | None, limit: int | None) -> Call[DocumentPage]:
    params = _drop_none({"cursor": cursor, "limit": limit})
    return Call("GET", f"{_bank_path(bank)}/documents", DocumentPage.model_validate, params=params)


def get_document(bank: str, doc_id: str) -> Call[Document]:
    return Call("GET", _doc_path(bank, doc_id), Document.model_validate)


def delete_document(bank: str, doc_id: str, if_match: int | str | None) -> Call[None]:
    return Call("DELETE", _doc_path(bank, doc_id), _none, headers=_if_match(if_match), keyed=True)


# -- jobs -------------------------------------------------------------------------------------------


def get_job(job_id: str) -> Call[Job]:
    return Call("GET", f"/v1/jobs/{ids.segment(ids.opaque_id('job id', job_id))}", Job.model_validate)


def cancel_job(job_id: str) -> Call[Job]:
    # Cancelling twice answers as once (a cancelled job stays cancelled), so a lost answer may be resent.
    return Call("POST", f"/v1/jobs/{ids.segment(ids.opaque_id('job id', job_id))}/cancel", Job.model_validate,
                idempotent=True)


def list_jobs(bank: str, cursor: str | None, limit: int | None) -> Call[JobPage]:
    params = _drop_none({"cursor": cursor, "limit": limit})
    return Call("GET", f"{_bank_path(bank)}/jobs", JobPage.model_validate, params=params)


# -- retrieval --------------------------------------------------------------------------------------


def search(bank: str, query: str, k: int, flt: FilterLike, retrieval: Retrieval | None = None) -> Call[list[Hit]]:
    body = _drop_none({"query": query, "k": k, "filter": _filter(flt), "retrieval": retrieval})
    return Call("POST", f"{_bank_path(bank)}/search", lambda d: [Hit.model_validate(h) for h in d["hits"]],
                json=body, idempotent=True)


def query(bank: str, question: str, k: int, mode: Mode, max_new_tokens: int, flt: FilterLike,
          stream: bool, context_map: bool = False, knobs: QueryKnobs | None = None) -> Call[QueryResult]:
    body = _drop_none({"question": question, "k": k, "mode": mode, "max_new_tokens": max_new_tokens,
                       "stream": stream, "filter": _filter(flt)})
    if knobs is not None:  # unset knobs are not sent: the server's defaults (chosen by measurement) apply
        body.update(knobs.body())
    if context_map:  # only sent when asked, so an older server keeps accepting the request
        body["context_map"] = True
    headers = {"Accept": "text/event-stream"} if stream else {}
    return Call("POST", f"{_bank_path(bank)}/query", QueryResult.model_validate, json=body, headers=headers,
                idempotent=True)


# -- context map ------------------------------------------------------------------------------------


def _map_path(bank: str) -> str:
    return f"{_bank_path(bank)}/context-map"


def get_context_map(bank: str, version: int | None) -> Call[ContextMap]:
    return Call("GET", _map_path(bank), ContextMap.model_validate, params=_drop_none({"version": version}))


def edit_context_map(bank: str, edits: Iterable[EditLike], feedback: Iterable[FeedbackLike] | None,
                     base_version: int | None) -> Call[ContextMapEditResult]:
    body: dict[str, Any] = {
        "edits": [(e if isinstance(e, ContextMapEdit) else ContextMapEdit.model_validate(dict(e))).model_dump(
            exclude_none=True) for e in edits],
        "feedback": [(f if isinstance(f, ContextMapFeedback) else ContextMapFeedback.model_validate(dict(f)))
                     .model_dump() for f in feedback or ()],
    }
    if base_version is not None:
        body["base_version"] = base_version
    # An add is not idempotent by itself: only the Idempotency-Key keeps a resent edit from adding twice.
    return Call("POST", f"{_map_path(bank)}/edits", ContextMapEditResult.model_validate, json=body, keyed=True)


def refresh_context_map(bank: str) -> Call[ContextMapRefresh]:
    return Call("POST", f"{_map_path(bank)}/refresh", ContextMapRefresh.model_validate, keyed=True)


def pin_context_map_item(bank: str, item_id: str, pinned: bool) -> Call[ContextMap]:
    path = f"{_map_path(bank)}/items/{ids.segment(ids.map_item_id(item_id))}/{'pin' if pinned else 'unpin'}"
    return Call("POST", path, ContextMap.model_validate, keyed=True)


def update_context_map(bank: str, frozen: bool | None, budget_tokens: int | None) -> Call[ContextMap]:
    body = _drop_none({"frozen": frozen, "budget_tokens": budget_tokens})
    return Call("PATCH", _map_path(bank), ContextMap.model_validate, json=body, keyed=True)
