"""The asynchronous client ``AsyncKVRag`` (same methods as ``KVRag``, awaited)."""

from __future__ import annotations

import asyncio
import builtins
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from types import TracebackType
from typing import Any, Literal, TypeVar, overload

import httpx

from . import _operations as ops
from ._base import Call, ClientConfig, EventReader, transport_error
from ._exceptions import APIConnectionError, APITimeoutError, JobFailed, Unavailable, error_from_response
from ._sessions import AsyncSessions
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


class AsyncQueryStream:
    """Events of a streamed query: ``TokenEvent``s, then one ``DoneEvent``; ``.result`` holds the final result.

    Iterate it once (``async for``); it closes the connection when the iteration ends (or on ``aclose()``).
    """

    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self._reader = EventReader(response.headers.get("x-request-id"))

    @property
    def result(self) -> QueryResult | None:
        return self._reader.result

    async def __aiter__(self) -> AsyncIterator[StreamEvent]:
        try:
            async for line in self._response.aiter_lines():
                event = self._reader.feed(line)
                if event is not None:
                    yield event
            last = self._reader.finish()
            if last is not None:
                yield last
        except httpx.TransportError as exc:
            raise transport_error(exc) from exc
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        await self._response.aclose()

    async def __aenter__(self) -> AsyncQueryStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class _Resource:
    def __init__(self, client: AsyncKVRag) -> None:
        self._client = client


class AsyncKeys(_Resource):
    """API keys (admin only)."""

    async def create(self, name: str, *, role: str = "read", banks: Iterable[str] = ("*",),
               agent: str | None = None) -> ApiKey:
        """Create a key whose writes are attributed to ``agent`` (default: ``name``); the secret ``key``
        is in this answer only."""
        return await self._client._call(ops.create_key(name, agent or name, role, banks))

    async def list(self) -> builtins.list[ApiKey]:
        """Every key (prefixes only, never secrets)."""
        return await self._client._call(ops.list_keys())

    async def delete(self, key_id: str) -> None:
        """Revoke a key at once."""
        await self._client._call(ops.delete_key(key_id))


class AsyncBanks(_Resource):
    """Memory banks."""

    async def create(self, name: str, **options: Any) -> Bank:
        """Create a bank; options: ``codec``, ``budget_bytes``, ``max_blocks``, ``eviction``."""
        return await self._client._call(ops.create_bank(name, options))

    async def list(self) -> builtins.list[Bank]:
        """The banks this key can see."""
        return await self._client._call(ops.list_banks())

    async def get(self, name: str) -> Bank:
        """A bank with its statistics."""
        return await self._client._call(ops.get_bank(name))

    async def update(self, name: str, **changes: Any) -> Bank:
        """Change ``codec``, ``budget_bytes``, ``max_blocks`` or ``eviction``."""
        return await self._client._call(ops.update_bank(name, changes))

    async def delete(self, name: str) -> None:
        """Delete a bank with everything in it."""
        await self._client._call(ops.delete_bank(name))

    async def maintain(self, name: str, **steps: bool) -> MaintenanceReport:
        """Run maintenance now and return its report. Steps (each on unless set False): ``evict`` to the budget,
        ``merge`` near-duplicates, ``gc`` orphan blobs, ``expire`` documents past ``expires_at``, ``reencode``
        after a model change (and re-warm cold blocks the budget has room for); ``rebuild=True`` also checks
        every block's checksum and rebuilds damaged ones from their text."""
        return await self._client._call(ops.maintain_bank(name, steps))


class AsyncJobs(_Resource):
    """Background jobs (large batch ingests)."""

    async def get(self, job_id: str) -> Job:
        """A job's current state."""
        return await self._client._call(ops.get_job(job_id))

    async def wait(self, job_id: str, *, poll_interval: float = 0.5, timeout: float = 600.0) -> Job:
        """Poll until the job finishes; raise ``JobFailed`` if it failed, ``APITimeoutError`` after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            job = await self.get(job_id)
            if job.status == "failed":
                raise JobFailed(job.id, job.error)
            if job.finished:
                return job
            if time.monotonic() >= deadline:
                raise APITimeoutError(f"job {job_id} still {job.status} after {timeout:g} s")
            await asyncio.sleep(poll_interval)


class AsyncDocuments(_Resource):
    """Documents of a bank."""

    async def put(self, bank: str, doc_id: str, text: str, metadata: Mapping[str, Any] | None = None,
            tags: Iterable[str] | None = None, pinned: bool = False, if_match: int | str | None = None,
            idempotency_key: str | None = None) -> PutResult:
        """Create or replace a document; ``if_match`` makes it conditional on the stored version."""
        return await self._client._call(ops.put_document(bank, doc_id, text, metadata, tags, pinned, if_match,
                                                   idempotency_key))

    async def put_many(self, bank: str, docs: Iterable[ops.DocumentLike], *, idempotency_key: str | None = None,
                 poll_interval: float = 0.5, timeout: float = 600.0) -> builtins.list[PutResult]:
        """Write a batch (``{id, text, metadata?, tags?, pinned?}`` each); waits for the job of a large batch."""
        answer = await self._client._call(ops.put_documents(bank, docs, idempotency_key))
        if isinstance(answer, Job):
            job = await self._client.jobs.wait(answer.id, poll_interval=poll_interval, timeout=timeout)
            return ops.job_results(job)
        return answer

    async def get(self, bank: str, doc_id: str) -> Document:
        """A document with its text."""
        return await self._client._call(ops.get_document(bank, doc_id))

    async def list(self, bank: str, *, limit: int | None = None) -> AsyncIterator[Document]:
        """Every document of the bank (``async for``), fetching pages of ``limit`` as the iteration goes."""
        cursor = None
        while True:
            page = await self._client._call(ops.list_documents(bank, cursor, limit))
            for doc in page.documents:
                yield doc
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    async def delete(self, bank: str, doc_id: str, *, if_match: int | str | None = None) -> None:
        """Delete a document and its blocks; ``if_match`` makes it conditional on the stored version."""
        await self._client._call(ops.delete_document(bank, doc_id, if_match))


class AsyncContextMaps(_Resource):
    """Context maps: each bank's small, token-budgeted map of what it holds and what earlier work found."""

    async def get(self, bank: str, *, version: int | None = None) -> ContextMap:
        """The current map, or an older ``version``."""
        return await self._client._call(ops.get_context_map(bank, version))

    async def edit(self, bank: str, edits: Iterable[ops.EditLike] = (), *,
             feedback: Iterable[ops.FeedbackLike] | None = None, base_version: int | None = None
             ) -> ContextMapEditResult:
        """Apply ``edits`` ({op, id?, section?, content?}) and ``feedback`` ({id, tag}) as one new version;
        with ``base_version``, edits to items changed since then raise ``VersionMismatch``."""
        return await self._client._call(ops.edit_context_map(bank, edits, feedback, base_version))

    async def refresh(self, bank: str) -> ContextMapRefresh:
        """Distill the bank's recent queries into edits with the server's map LLM; see ``status``."""
        return await self._client._call(ops.refresh_context_map(bank))

    async def update(self, bank: str, *, frozen: bool | None = None, budget_tokens: int | None = None) -> ContextMap:
        """Freeze/unfreeze the map or change its token budget (a smaller one evicts at once)."""
        return await self._client._call(ops.update_context_map(bank, frozen, budget_tokens))


class AsyncKVRag:
    """Asynchronous client of a kvrag server (every method is awaited).

    ``base_url`` defaults to ``$KVRAG_URL`` or http://127.0.0.1:8000, ``api_key`` to ``$KVRAG_API_KEY``.
    429 and 503 answers and failed connections are retried ``max_retries`` times with exponential backoff,
    honouring ``Retry-After``.
    """

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *,
                 timeout: float | httpx.Timeout | None = None, max_retries: int = 3,
                 http_client: httpx.AsyncClient | None = None) -> None:
        self._config = ClientConfig(base_url, api_key, timeout, max_retries)
        self._owns_http = http_client is None
        self._http = http_client or httpx.AsyncClient(timeout=self._config.timeout)
        self.keys = AsyncKeys(self)
        self.banks = AsyncBanks(self)
        self.documents = AsyncDocuments(self)
        self.jobs = AsyncJobs(self)
        self.sessions = AsyncSessions(self)
        self.context_map = AsyncContextMaps(self)

    @property
    def base_url(self) -> str:
        return self._config.base_url

    # -- retrieval --------------------------------------------------------------------------------

    async def search(self, bank: str, query: str, k: int = 5, filter: ops.FilterLike = None,
                      retrieval: Retrieval | None = None) -> list[Hit]:
        """Top-k blocks; ``filter`` ({agent, tags, metadata}) applies before top-k.

        ``retrieval`` picks the ranking ("embedding", "kv", "hybrid", "hybrid_kv"; default: the server's).
        """
        return await self._call(ops.search(bank, query, k, filter, retrieval))

    @overload
    async def query(self, bank: str, question: str, k: int = ..., mode: str = ..., max_new_tokens: int = ...,
              filter: ops.FilterLike = ..., stream: Literal[False] = ..., context_map: bool = ...,
                    retrieval: Retrieval | None = ..., recompute: float | None = ...,
                    compaction: Mapping[str, float] | None = ...) -> QueryResult: ...

    @overload
    async def query(self, bank: str, question: str, k: int = ..., mode: str = ..., max_new_tokens: int = ...,
              filter: ops.FilterLike = ..., *, stream: Literal[True], context_map: bool = ...,
                    retrieval: Retrieval | None = ..., recompute: float | None = ...,
                    compaction: Mapping[str, float] | None = ...) -> AsyncQueryStream: ...

    async def query(self, bank: str, question: str, k: int = 5, mode: str = "kv", max_new_tokens: int = 64,
              filter: ops.FilterLike = None, stream: bool = False, context_map: bool = False,
                    retrieval: Retrieval | None = None, recompute: float | None = None,
                    compaction: Mapping[str, float] | None = None
              ) -> QueryResult | AsyncQueryStream:
        """Answer from the top-k blocks (``mode`` "kv": stored KV; "text": re-read their text).

        ``context_map=True`` puts the bank's context map before the blocks (its KV is cached per map version).
        ``retrieval``, ``recompute`` and ``compaction`` override the server's defaults (see ``QueryKnobs``).
        With ``stream=True`` it returns a ``AsyncQueryStream`` of token events ending with the full result.
        """
        knobs = QueryKnobs(retrieval=retrieval, recompute=recompute,
                           compaction=dict(compaction) if compaction is not None else None)
        call = ops.query(bank, question, k, mode, max_new_tokens, filter, stream, context_map, knobs)
        if stream:
            return AsyncQueryStream(await self._send(call, stream=True))
        return await self._call(call)

    # -- health -----------------------------------------------------------------------------------

    async def health(self) -> Health:
        """Liveness of the server process."""
        return await self._call(ops.health())

    async def ready(self) -> bool:
        """Whether the server is ready (model, catalog and indexes loaded); False on 503 or no connection."""
        try:
            await self._call(ops.ready())
        except (Unavailable, APIConnectionError):
            return False
        return True

    async def wait_ready(self, timeout: float = 60.0, poll_interval: float = 0.2) -> None:
        """Block until ``ready()``; raise ``APITimeoutError`` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not await self.ready():
            if time.monotonic() >= deadline:
                raise APITimeoutError(f"{self.base_url} not ready after {timeout:g} s")
            await asyncio.sleep(poll_interval)

    # -- plumbing ---------------------------------------------------------------------------------

    async def _send(self, call: Call[Any], *, stream: bool = False) -> httpx.Response:
        """Send with retries; return a 2xx response or raise the typed error."""
        retry = self._config.retry
        attempt = 0
        while True:
            request = self._http.build_request(call.method, self._config.base_url + call.path, json=call.json,
                                               params=call.params,
                                               headers={**self._config.default_headers(), **call.headers},
                                               timeout=self._config.timeout)
            try:
                response = await self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                if call.retries and retry.retry_exception(attempt, exc, call):
                    await asyncio.sleep(retry.delay(attempt))
                    attempt += 1
                    continue
                raise transport_error(exc) from exc
            if response.is_success:
                return response
            if stream:
                await response.aread()
                await response.aclose()
            if call.retries and retry.retry_status(attempt, response.status_code):
                await asyncio.sleep(retry.delay(attempt, response))
                attempt += 1
                continue
            raise error_from_response(response)

    async def _call(self, call: Call[T]) -> T:
        response = await self._send(call)
        return call.parse(response.json() if response.content else None)

    async def close(self) -> None:
        """Close the connection pool (unless the caller passed its own ``http_client``)."""
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncKVRag:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        await self.close()
