"""The resources of ``KVRag``: keys, banks, documents, jobs, sessions, context maps, and raw-response twins.

GENERATED from _async_resources.py by client/scripts/unasync.py: do not edit; edit _async_resources.py and run
the script.
"""

from __future__ import annotations

import builtins
import time
from collections.abc import Iterator, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from . import _operations as ops
from ._base import TimeoutLike, raw_wrapper
from ._exceptions import APITimeoutError, JobCancelled, JobFailed
from ._sessions import (
    AppendResult,
    BriefResult,
    PrunePolicy,
    PruneResult,
    RestoreResult,
    SegmentLike,
    Selection,
    Session,
    append_call,
    brief_call,
    create_call,
    delete_call,
    get_call,
    prune_call,
    restore_call,
)
from .types import (
    ApiKey,
    Bank,
    BankOptions,
    ContextMap,
    ContextMapEditResult,
    ContextMapRefresh,
    Document,
    Eviction,
    Job,
    KeyRole,
    MaintenanceReport,
    PutResult,
)

if TYPE_CHECKING:
    from ._client import KVRag

ProgressCallback = Callable[[Job], object]
R = TypeVar("R")


class _Resource:
    def __init__(self, client: KVRag) -> None:
        self._client = client


class Keys(_Resource):
    """API keys (admin only)."""

    def create(self, name: str, *, role: KeyRole = "read", banks: Iterable[str] = ("*",),
                     agent: str | None = None, timeout: TimeoutLike | None = None) -> ApiKey:
        """Create a key whose writes are attributed to ``agent`` (default: ``name``); the secret ``key``
        is in this answer only."""
        return self._client._call(ops.create_key(name, agent or name, role, banks), timeout)

    def list(self, *, timeout: TimeoutLike | None = None) -> builtins.list[ApiKey]:
        """Every key (prefixes only, never secrets)."""
        return self._client._call(ops.list_keys(), timeout)

    def delete(self, key_id: str, *, timeout: TimeoutLike | None = None) -> None:
        """Revoke a key at once."""
        self._client._call(ops.delete_key(key_id), timeout)


class Banks(_Resource):
    """Memory banks."""

    def create(self, name: str, *, codec: str | None = None, budget_bytes: int | None = None,
                     max_blocks: int | None = None, eviction: Eviction | None = None,
                     context_map_budget_tokens: int | None = None, timeout: TimeoutLike | None = None) -> Bank:
        """Create a bank; every option left None takes the server's default (``codec``: a preset name)."""
        options = BankOptions(codec=codec, budget_bytes=budget_bytes, max_blocks=max_blocks, eviction=eviction,
                              context_map_budget_tokens=context_map_budget_tokens)
        return self._client._call(ops.create_bank(name, options), timeout)

    def list(self, *, timeout: TimeoutLike | None = None) -> builtins.list[Bank]:
        """The banks this key can see."""
        return self._client._call(ops.list_banks(), timeout)

    def get(self, name: str, *, timeout: TimeoutLike | None = None) -> Bank:
        """A bank with its statistics."""
        return self._client._call(ops.get_bank(name), timeout)

    def update(self, name: str, *, codec: str | None = None, budget_bytes: int | None = None,
                     max_blocks: int | None = None, eviction: Eviction | None = None,
                     context_map_budget_tokens: int | None = None, timeout: TimeoutLike | None = None) -> Bank:
        """Change the given settings (a smaller budget evicts at once); the others keep their values."""
        changes = BankOptions(codec=codec, budget_bytes=budget_bytes, max_blocks=max_blocks, eviction=eviction,
                              context_map_budget_tokens=context_map_budget_tokens)
        return self._client._call(ops.update_bank(name, changes), timeout)

    def delete(self, name: str, *, timeout: TimeoutLike | None = None) -> None:
        """Delete a bank with everything in it."""
        self._client._call(ops.delete_bank(name), timeout)

    def maintain(self, name: str, *, evict: bool | None = None, merge: bool | None = None,
                       gc: bool | None = None, expire: bool | None = None, reencode: bool | None = None,
                       rebuild: bool | None = None,
                       timeout: TimeoutLike | None = None) -> JobHandle[MaintenanceReport]:
        """Start maintenance (a server-side job) and return its handle at once: ``handle.wait(progress=...)``
        gives the report. Steps (each on unless set False): ``evict`` to the budget, ``merge`` blocks with
        identical tokens into one blob, ``gc`` orphan blobs, ``expire`` documents past ``expires_at``,
        ``reencode`` after a model change (and re-warm cold blocks the budget has room for); ``rebuild=True``
        also checks every block's checksum and rebuilds damaged ones from their text."""
        steps = {"evict": evict, "merge": merge, "gc": gc, "expire": expire, "reencode": reencode,
                 "rebuild": rebuild}
        job = self._client._call(ops.maintain_bank(name, steps), timeout)
        return JobHandle(self._client, job, ops.maintenance_report)


class JobHandle(Generic[R]):
    """A job the server accepted: ``wait`` for its result, or look at (``get``) or ``cancel`` it meanwhile."""

    def __init__(self, client: KVRag, job: Job, parse: Callable[[Any], R]) -> None:
        self._client, self._parse = client, parse
        self.job = job  # the last state seen

    @property
    def id(self) -> str:
        return self.job.id

    def get(self) -> Job:
        """The job's current state."""
        self.job = self._client.jobs.get(self.id)
        return self.job

    def cancel(self) -> Job:
        """Cancel it (a running job stops at its next step)."""
        self.job = self._client.jobs.cancel(self.id)
        return self.job

    def wait(self, *, poll_interval: float = 0.5, timeout: float = 600.0,
                   progress: ProgressCallback | None = None) -> R:
        """Wait until it finishes and return its result; ``JobFailed`` if it failed, ``JobCancelled`` if it was
        cancelled. ``progress(job)`` sees each change of status, ``done`` or ``step``."""
        self.job = self._client.jobs.wait(self.id, poll_interval=poll_interval, timeout=timeout,
                                                progress=progress)
        if self.job.status == "cancelled":
            raise JobCancelled(self.id)
        return self._parse(self.job.result)

    def __repr__(self) -> str:
        return f"<JobHandle {self.id} {self.job.kind or ''} {self.job.status}>"


class Jobs(_Resource):
    """Background jobs (large batch ingests, maintenance): get, list, cancel, wait with progress."""

    def get(self, job_id: str, *, timeout: TimeoutLike | None = None) -> Job:
        """A job's current state (``done`` of ``total``)."""
        return self._client._call(ops.get_job(job_id), timeout)

    def list(self, bank: str, *, limit: int | None = None) -> Iterator[Job]:
        """The bank's jobs, newest first, fetching pages of ``limit`` as the iteration goes."""
        cursor = None
        while True:
            page = self._client._call(ops.list_jobs(bank, cursor, limit))
            for job in page.jobs:
                yield job
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    def cancel(self, job_id: str, *, timeout: TimeoutLike | None = None) -> Job:
        """Cancel a job: a queued one at once, a running one at its next step (``cancel_requested`` until then).
        Cancelling a finished job is a ``Conflict``."""
        return self._client._call(ops.cancel_job(job_id), timeout)

    def wait(self, job_id: str, *, poll_interval: float = 0.5, timeout: float = 600.0,
                   progress: ProgressCallback | None = None, on_progress: ProgressCallback | None = None) -> Job:
        """Poll until the job finishes (succeeded or cancelled: the job is returned); raise ``JobFailed`` if it
        failed, ``APITimeoutError`` after ``timeout`` seconds in all. ``progress(job)`` (``on_progress``, its
        older name) is called with the first state seen and each change of status, ``done`` or ``step`` (e.g.
        to move a progress bar)."""
        callback = progress or on_progress
        deadline = time.monotonic() + timeout
        seen: tuple[str, int | None, str | None] | None = None
        while True:
            job = self.get(job_id)
            if callback is not None and (job.status, job.done, job.step) != seen:
                seen = (job.status, job.done, job.step)
                callback(job)
            if job.status == "failed":
                raise JobFailed(job.id, job.error)
            if job.finished:
                return job
            if time.monotonic() >= deadline:
                raise APITimeoutError(f"job {job_id} still {job.status} after {timeout:g} s")
            time.sleep(poll_interval)


class Documents(_Resource):
    """Documents of a bank."""

    def put(self, bank: str, doc_id: str, text: str, metadata: Mapping[str, Any] | None = None,
                  tags: Iterable[str] | None = None, pinned: bool = False, if_match: int | str | None = None,
                  idempotency_key: str | None = None, *, timeout: TimeoutLike | None = None) -> PutResult:
        """Create or replace a document; ``if_match`` makes it conditional on the stored version."""
        call = ops.put_document(bank, doc_id, text, metadata, tags, pinned, if_match, idempotency_key)
        return self._client._call(call, timeout)

    def put_many(self, bank: str, docs: Iterable[ops.DocumentLike], *, idempotency_key: str | None = None,
                       poll_interval: float = 0.5, timeout: float = 600.0,
                       on_progress: ProgressCallback | None = None) -> builtins.list[PutResult]:
        """Write a batch (``{id, text, metadata?, tags?, pinned?}`` each); waits for the job of a large batch
        (``timeout`` seconds at most, ``on_progress`` as ``jobs.wait`` calls it)."""
        answer = self._client._call(ops.put_documents(bank, docs, idempotency_key))
        if isinstance(answer, Job):
            job = self._client.jobs.wait(answer.id, poll_interval=poll_interval, timeout=timeout,
                                               on_progress=on_progress)
            return ops.job_results(job)
        return answer

    def get(self, bank: str, doc_id: str, *, timeout: TimeoutLike | None = None) -> Document:
        """A document with its text."""
        return self._client._call(ops.get_document(bank, doc_id), timeout)

    def list(self, bank: str, *, limit: int | None = None) -> Iterator[Document]:
        """Every document of the bank, fetching pages of ``limit`` as the iteration goes."""
        cursor = None
        while True:
            page = self._client._call(ops.list_documents(bank, cursor, limit))
            for doc in page.documents:
                yield doc
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    def delete(self, bank: str, doc_id: str, *, if_match: int | str | None = None,
                     timeout: TimeoutLike | None = None) -> None:
        """Delete a document and its blocks; ``if_match`` makes it conditional on the stored version."""
        self._client._call(ops.delete_document(bank, doc_id, if_match), timeout)


class ContextMaps(_Resource):
    """Context maps: each bank's small, token-budgeted map of what it holds and what earlier work found."""

    def get(self, bank: str, *, version: int | None = None, timeout: TimeoutLike | None = None) -> ContextMap:
        """The current map, or an older ``version``."""
        return self._client._call(ops.get_context_map(bank, version), timeout)

    def edit(self, bank: str, edits: Iterable[ops.EditLike] = (), *,
                   feedback: Iterable[ops.FeedbackLike] | None = None, base_version: int | None = None,
                   timeout: TimeoutLike | None = None) -> ContextMapEditResult:
        """Apply ``edits`` ({op, id?, section?, content?}) and ``feedback`` ({id, tag}) as one new version;
        with ``base_version``, edits to items changed since then raise ``VersionMismatch``."""
        return self._client._call(ops.edit_context_map(bank, edits, feedback, base_version), timeout)

    def refresh(self, bank: str, *, timeout: TimeoutLike | None = None) -> ContextMapRefresh:
        """Distill the bank's recent queries into edits with the server's map LLM; see ``status``."""
        return self._client._call(ops.refresh_context_map(bank), timeout)

    def update(self, bank: str, *, frozen: bool | None = None, budget_tokens: int | None = None,
                     timeout: TimeoutLike | None = None) -> ContextMap:
        """Freeze/unfreeze the map or change its token budget (a smaller one evicts at once)."""
        return self._client._call(ops.update_context_map(bank, frozen, budget_tokens), timeout)

    def pin(self, bank: str, item_id: str, *, timeout: TimeoutLike | None = None) -> ContextMap:
        """Pin an item (owner key): no edit, refresh or eviction removes or replaces it until it is unpinned."""
        return self._client._call(ops.pin_context_map_item(bank, item_id, True), timeout)

    def unpin(self, bank: str, item_id: str, *, timeout: TimeoutLike | None = None) -> ContextMap:
        """Unpin an item (owner key)."""
        return self._client._call(ops.pin_context_map_item(bank, item_id, False), timeout)


class Sessions(_Resource):
    """Agent sessions of a bank: a trajectory kept as KV, briefed to workers, pruned."""

    def create(self, bank: str, session_id: str | None = None, *, metadata: Mapping[str, Any] | None = None,
                     timeout: TimeoutLike | None = None) -> Session:
        """A new empty session (a random id when none is given)."""
        return self._client._call(create_call(bank, session_id, metadata), timeout)

    def append(self, bank: str, session_id: str, segments: Iterable[SegmentLike], *,
                     timeout: TimeoutLike | None = None) -> AppendResult:
        """Append segments ({role, text, agent?}); only their tokens are prefilled. Durable once it returns."""
        return self._client._call(append_call(bank, session_id, segments), timeout)

    def brief(self, bank: str, session_id: str, task: str, *, budget_tokens: int | None = None,
                    tau: float | None = None, include_documents: int | None = None,
                    max_new_tokens: int | None = None, selection: Selection | None = None,
                    timeout: TimeoutLike | None = None) -> BriefResult:
        """Answer ``task`` from the trajectory compacted to what the task attends to (``selection``:
        ``"segments"``, the server's default, or ``"tokens"``)."""
        call = brief_call(bank, session_id, task, budget_tokens, tau, include_documents, max_new_tokens, selection)
        return self._client._call(call, timeout)

    def prune(self, bank: str, session_id: str, *, policy: PrunePolicy = "model", goal: str | None = None,
                    window: int | None = None, threshold: float | None = None,
                    timeout: TimeoutLike | None = None) -> PruneResult:
        """Drop the KV of segments no longer needed (``model`` or ``attention`` policy); text stays."""
        return self._client._call(prune_call(bank, session_id, policy, goal, window, threshold), timeout)

    def restore(self, bank: str, session_id: str, segments: Iterable[int] | None = None, *,
                      timeout: TimeoutLike | None = None) -> RestoreResult:
        """Make pruned segments live again with the KV they had (default: every one still restorable; the
        server keeps a pruned segment's KV for its retention period)."""
        return self._client._call(restore_call(bank, session_id, segments), timeout)

    def get(self, bank: str, session_id: str, *, timeout: TimeoutLike | None = None) -> Session:
        """A session with its segments, live tokens and stored bytes."""
        return self._client._call(get_call(bank, session_id), timeout)

    def delete(self, bank: str, session_id: str, *, timeout: TimeoutLike | None = None) -> None:
        """Delete a session with its KV."""
        self._client._call(delete_call(bank, session_id), timeout)


# -- raw responses: the same methods, answering RawResponse(status_code, headers, parsed) -------------------


class KeysWithRawResponse:
    def __init__(self, keys: Keys) -> None:
        self.create = raw_wrapper(keys.create)
        self.list = raw_wrapper(keys.list)
        self.delete = raw_wrapper(keys.delete)


class BanksWithRawResponse:
    def __init__(self, banks: Banks) -> None:
        self.create = raw_wrapper(banks.create)
        self.list = raw_wrapper(banks.list)
        self.get = raw_wrapper(banks.get)
        self.update = raw_wrapper(banks.update)
        self.delete = raw_wrapper(banks.delete)
        self.maintain = raw_wrapper(banks.maintain)


class JobsWithRawResponse:
    def __init__(self, jobs: Jobs) -> None:
        self.get = raw_wrapper(jobs.get)
        self.cancel = raw_wrapper(jobs.cancel)


class DocumentsWithRawResponse:
    def __init__(self, documents: Documents) -> None:
        self.put = raw_wrapper(documents.put)
        self.get = raw_wrapper(documents.get)
        self.delete = raw_wrapper(documents.delete)


class ContextMapsWithRawResponse:
    def __init__(self, maps: ContextMaps) -> None:
        self.get = raw_wrapper(maps.get)
        self.edit = raw_wrapper(maps.edit)
        self.refresh = raw_wrapper(maps.refresh)
        self.update = raw_wrapper(maps.update)
        self.pin = raw_wrapper(maps.pin)
        self.unpin = raw_wrapper(maps.unpin)


class SessionsWithRawResponse:
    def __init__(self, sessions: Sessions) -> None:
        self.create = raw_wrapper(sessions.create)
        self.append = raw_wrapper(sessions.append)
        self.brief = raw_wrapper(sessions.brief)
        self.prune = raw_wrapper(sessions.prune)
        self.restore = raw_wrapper(sessions.restore)
        self.get = raw_wrapper(sessions.get)
        self.delete = raw_wrapper(sessions.delete)
