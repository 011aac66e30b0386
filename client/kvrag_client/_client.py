"""The synchronous client ``KVRag``."""

from __future__ import annotations

import builtins
import time
from collections.abc import Iterable, Iterator, Mapping
from types import TracebackType
from typing import Any, Literal, TypeVar, overload

import httpx

from . import _operations as ops
from ._base import Call, ClientConfig, EventReader, transport_error
from ._exceptions import APIConnectionError, APITimeoutError, JobFailed, Unavailable, error_from_response
from ._sessions import Sessions
from .types import (
    ApiKey,
    Bank,
    ContextMap,
    ContextMapEditResult,
    ContextMapRefresh,
    Document,
    Health,
    Hit,
    Job,
    MaintenanceReport,
    PutResult,
    QueryKnobs,
    QueryResult,
    Retrieval,
    StreamEvent,
)

T = TypeVar("T")


class QueryStream:
    """Events of a streamed query: ``TokenEvent``s, then one ``DoneEvent``; ``.result`` holds the final result.

    Iterate it once; it closes the connection when the iteration ends (or on ``close()`` / ``with``).
    """

    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self._reader = EventReader(response.headers.get("x-request-id"))

    @property
    def result(self) -> QueryResult | None:
        return self._reader.result

    def __iter__(self) -> Iterator[StreamEvent]:
        try:
            for line in self._response.iter_lines():
                event = self._reader.feed(line)
                if event is not None:
                    yield event
            last = self._reader.finish()
            if last is not None:
                yield last
        except httpx.TransportError as exc:
            raise transport_error(exc) from exc
        finally:
            self.close()

    def close(self) -> None:
        self._response.close()

    def __enter__(self) -> QueryStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Resource:
    def __init__(self, client: KVRag) -> None:
        self._client = client


class Keys(_Resource):
    """API keys (admin only)."""

    def create(self, name: str, *, role: str = "read", banks: Iterable[str] = ("*",),
               agent: str | None = None) -> ApiKey:
        """Create a key whose writes are attributed to ``agent`` (default: ``name``); the secret ``key``
        is in this answer only."""
        return self._client._call(ops.create_key(name, agent or name, role, banks))

    def list(self) -> builtins.list[ApiKey]:
        """Every key (prefixes only, never secrets)."""
        return self._client._call(ops.list_keys())

    def delete(self, key_id: str) -> None:
        """Revoke a key at once."""
        self._client._call(ops.delete_key(key_id))


class Banks(_Resource):
    """Memory banks."""

    def create(self, name: str, **options: Any) -> Bank:
        """Create a bank; options: ``codec``, ``budget_bytes``, ``max_blocks``, ``eviction``."""
        return self._client._call(ops.create_bank(name, options))

    def list(self) -> builtins.list[Bank]:
        """The banks this key can see."""
        return self._client._call(ops.list_banks())

    def get(self, name: str) -> Bank:
        """A bank with its statistics."""
        return self._client._call(ops.get_bank(name))

    def update(self, name: str, **changes: Any) -> Bank:
        """Change ``codec``, ``budget_bytes``, ``max_blocks`` or ``eviction``."""
        return self._client._call(ops.update_bank(name, changes))

    def delete(self, name: str) -> None:
        """Delete a bank with everything in it."""
        self._client._call(ops.delete_bank(name))

    def maintain(self, name: str, **steps: bool) -> MaintenanceReport:
        """Run maintenance now and return its report. Steps (each on unless set False): ``evict`` to the budget,
        ``merge`` near-duplicates, ``gc`` orphan blobs, ``expire`` documents past ``expires_at``, ``reencode``
        after a model change (and re-warm cold blocks the budget has room for); ``rebuild=True`` also checks
        every block's checksum and rebuilds damaged ones from their text."""
        return self._client._call(ops.maintain_bank(name, steps))


class Jobs(_Resource):
    """Background jobs (large batch ingests)."""

    def get(self, job_id: str) -> Job:
        """A job's current state."""
        return self._client._call(ops.get_job(job_id))

    def wait(self, job_id: str, *, poll_interval: float = 0.5, timeout: float = 600.0) -> Job:
        """Poll until the job finishes; raise ``JobFailed`` if it failed, ``APITimeoutError`` after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.get(job_id)
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
            idempotency_key: str | None = None) -> PutResult:
        """Create or replace a document; ``if_match`` makes it conditional on the stored version."""
        return self._client._call(ops.put_document(bank, doc_id, text, metadata, tags, pinned, if_match,
                                                   idempotency_key))

    def put_many(self, bank: str, docs: Iterable[ops.DocumentLike], *, idempotency_key: str | None = None,
                 poll_interval: float = 0.5, timeout: float = 600.0) -> builtins.list[PutResult]:
        """Write a batch (``{id, text, metadata?, tags?, pinned?}`` each); waits for the job of a large batch."""
        answer = self._client._call(ops.put_documents(bank, docs, idempotency_key))
        if isinstance(answer, Job):
            return ops.job_results(self._client.jobs.wait(answer.id, poll_interval=poll_interval, timeout=timeout))
        return answer

    def get(self, bank: str, doc_id: str) -> Document:
        """A document with its text."""
        return self._client._call(ops.get_document(bank, doc_id))

    def list(self, bank: str, *, limit: int | None = None) -> Iterator[Document]:
        """Every document of the bank, fetching pages of ``limit`` as the iteration goes."""
        cursor = None
        while True:
            page = self._client._call(ops.list_documents(bank, cursor, limit))
            yield from page.documents
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    def delete(self, bank: str, doc_id: str, *, if_match: int | str | None = None) -> None:
        """Delete a document and its blocks; ``if_match`` makes it conditional on the stored version."""
        self._client._call(ops.delete_document(bank, doc_id, if_match))


class ContextMaps(_Resource):
    """Context maps: each bank's small, token-budgeted map of what it holds and what earlier work found."""

    def get(self, bank: str, *, version: int | None = None) -> ContextMap:
        """The current map, or an older ``version``."""
        return self._client._call(ops.get_context_map(bank, version))

    def edit(self, bank: str, edits: Iterable[ops.EditLike] = (), *,
             feedback: Iterable[ops.FeedbackLike] | None = None, base_version: int | None = None
             ) -> ContextMapEditResult:
        """Apply ``edits`` ({op, id?, section?, content?}) and ``feedback`` ({id, tag}) as one new version;
        with ``base_version``, edits to items changed since then raise ``VersionMismatch``."""
        return self._client._call(ops.edit_context_map(bank, edits, feedback, base_version))

    def refresh(self, bank: str) -> ContextMapRefresh:
        """Distill the bank's recent queries into edits with the server's map LLM; see ``status``."""
        return self._client._call(ops.refresh_context_map(bank))

    def update(self, bank: str, *, frozen: bool | None = None, budget_tokens: int | None = None) -> ContextMap:
        """Freeze/unfreeze the map or change its token budget (a smaller one evicts at once)."""
        return self._client._call(ops.update_context_map(bank, frozen, budget_tokens))


class KVRag:
    """Synchronous client of a kvrag server.

    ``base_url`` defaults to ``$KVRAG_URL`` or http://127.0.0.1:8000, ``api_key`` to ``$KVRAG_API_KEY``.
    429 and 503 answers and failed connections are retried ``max_retries`` times with exponential backoff,
    honouring ``Retry-After``.
    """

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *,
                 timeout: float | httpx.Timeout | None = None, max_retries: int = 3,
                 http_client: httpx.Client | None = None) -> None:
        self._config = ClientConfig(base_url, api_key, timeout, max_retries)
        self._owns_http = http_client is None
        self._http = http_client or httpx.Client(timeout=self._config.timeout)
        self.keys = Keys(self)
        self.banks = Banks(self)
        self.documents = Documents(self)
        self.jobs = Jobs(self)
        self.sessions = Sessions(self)
        self.context_map = ContextMaps(self)

    @property
    def base_url(self) -> str:
        return self._config.base_url

    # -- retrieval --------------------------------------------------------------------------------

    def search(self, bank: str, query: str, k: int = 5, filter: ops.FilterLike = None,
                retrieval: Retrieval | None = None) -> list[Hit]:
        """Top-k blocks; ``filter`` ({agent, tags, metadata}) applies before top-k.

        ``retrieval`` picks the ranking ("embedding", "kv", "hybrid", "hybrid_kv"; default: the server's).
        """
        return self._call(ops.search(bank, query, k, filter, retrieval))

    @overload
    def query(self, bank: str, question: str, k: int = ..., mode: str = ..., max_new_tokens: int = ...,
              filter: ops.FilterLike = ..., stream: Literal[False] = ..., context_map: bool = ...,
              retrieval: Retrieval | None = ..., recompute: float | None = ...,
              compaction: Mapping[str, float] | None = ...) -> QueryResult: ...

    @overload
    def query(self, bank: str, question: str, k: int = ..., mode: str = ..., max_new_tokens: int = ...,
              filter: ops.FilterLike = ..., *, stream: Literal[True], context_map: bool = ...,
              retrieval: Retrieval | None = ..., recompute: float | None = ...,
              compaction: Mapping[str, float] | None = ...) -> QueryStream: ...

    def query(self, bank: str, question: str, k: int = 5, mode: str = "kv", max_new_tokens: int = 64,
              filter: ops.FilterLike = None, stream: bool = False, context_map: bool = False,
              retrieval: Retrieval | None = None, recompute: float | None = None,
              compaction: Mapping[str, float] | None = None
              ) -> QueryResult | QueryStream:
        """Answer from the top-k blocks (``mode`` "kv": stored KV; "text": re-read their text).

        ``context_map=True`` puts the bank's context map before the blocks (its KV is cached per map version).
        ``retrieval``, ``recompute`` and ``compaction`` override the server's defaults (see ``QueryKnobs``).
        With ``stream=True`` it returns a ``QueryStream`` of token events ending with the full result.
        """
        knobs = QueryKnobs(retrieval=retrieval, recompute=recompute,
                           compaction=dict(compaction) if compaction is not None else None)
        call = ops.query(bank, question, k, mode, max_new_tokens, filter, stream, context_map, knobs)
        if stream:
            return QueryStream(self._send(call, stream=True))
        return self._call(call)

    # -- health -----------------------------------------------------------------------------------

    def health(self) -> Health:
        """Liveness of the server process."""
        return self._call(ops.health())

    def ready(self) -> bool:
        """Whether the server is ready (model, catalog and indexes loaded); False on 503 or no connection."""
        try:
            self._call(ops.ready())
        except (Unavailable, APIConnectionError):
            return False
        return True

    def wait_ready(self, timeout: float = 60.0, poll_interval: float = 0.2) -> None:
        """Block until ``ready()``; raise ``APITimeoutError`` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not self.ready():
            if time.monotonic() >= deadline:
                raise APITimeoutError(f"{self.base_url} not ready after {timeout:g} s")
            time.sleep(poll_interval)

    # -- plumbing ---------------------------------------------------------------------------------

    def _send(self, call: Call[Any], *, stream: bool = False) -> httpx.Response:
        """Send with retries; return a 2xx response or raise the typed error."""
        retry = self._config.retry
        attempt = 0
        while True:
            request = self._http.build_request(call.method, self._config.base_url + call.path, json=call.json,
                                               params=call.params,
                                               headers={**self._config.default_headers(), **call.headers},
                                               timeout=self._config.timeout)
            try:
                response = self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                if call.retries and retry.retry_exception(attempt, exc, call):
                    time.sleep(retry.delay(attempt))
                    attempt += 1
                    continue
                raise transport_error(exc) from exc
            if response.is_success:
                return response
            if stream:
                response.read()
                response.close()
            if call.retries and retry.retry_status(attempt, response.status_code):
                time.sleep(retry.delay(attempt, response))
                attempt += 1
                continue
            raise error_from_response(response)

    def _call(self, call: Call[T]) -> T:
        response = self._send(call)
        return call.parse(response.json() if response.content else None)

    def close(self) -> None:
        """Close the connection pool (unless the caller passed its own ``http_client``)."""
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> KVRag:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
