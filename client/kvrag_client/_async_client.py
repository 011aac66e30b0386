"""The asynchronous client ``AsyncKVRag``.

This file is the one source of both clients: ``client/scripts/unasync.py`` writes ``_client.py`` (``KVRag``)
from it, as it writes ``_resources.py`` from ``_async_resources.py``; tests/client/test_options.py fails when
a generated file is stale.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from functools import cached_property
from types import TracebackType
from typing import Any, Literal, TypeVar, overload

import httpx

from . import _operations as ops
from ._async_resources import (
    AsyncBanks,
    AsyncBanksWithRawResponse,
    AsyncContextMaps,
    AsyncContextMapsWithRawResponse,
    AsyncDocuments,
    AsyncDocumentsWithRawResponse,
    AsyncJobs,
    AsyncJobsWithRawResponse,
    AsyncKeys,
    AsyncKeysWithRawResponse,
    AsyncSessions,
    AsyncSessionsWithRawResponse,
)
from ._base import Call, ClientConfig, EventReader, TimeoutLike, async_raw_wrapper, record_response, transport_error
from ._exceptions import APIConnectionError, APITimeoutError, Unavailable, error_from_response
from .types import Health, Hit, Mode, QueryKnobs, QueryResult, Retrieval, StreamEvent

T = TypeVar("T")


class AsyncQueryStream:
    """Events of a streamed query: ``TokenEvent``s, then one ``DoneEvent``; ``.result`` holds the final result.

    Iterate it once; it closes the connection when the iteration ends (or on ``aclose()`` / ``with``).
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


class AsyncKVRag:
    """Client of a kvrag server.

    ``base_url`` defaults to ``$KVRAG_URL`` or http://127.0.0.1:8000, ``api_key`` to ``$KVRAG_API_KEY``;
    ``headers`` are sent with every request. 429 and 503 answers and failed connections are retried
    ``max_retries`` times with exponential backoff, honouring ``Retry-After``; a write is sent with an
    ``Idempotency-Key`` (one per call, the same on each retry), so a retry after a lost answer is answered
    from the server's record of the first instead of writing twice. Every method takes ``timeout=``;
    ``with_options()`` gives a copy with other defaults, ``with_raw_response`` the status and headers too.
    """

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *,
                 timeout: TimeoutLike | None = None, max_retries: int = 3, headers: Mapping[str, str] | None = None,
                 http_client: httpx.AsyncClient | None = None) -> None:
        self._config = ClientConfig.create(base_url, api_key, timeout, max_retries, headers)
        self._owns_http = http_client is None
        self._http = http_client or httpx.AsyncClient(timeout=self._config.timeout)
        self._add_resources()

    def _add_resources(self) -> None:
        self.keys = AsyncKeys(self)
        self.banks = AsyncBanks(self)
        self.documents = AsyncDocuments(self)
        self.jobs = AsyncJobs(self)
        self.sessions = AsyncSessions(self)
        self.context_map = AsyncContextMaps(self)

    @property
    def base_url(self) -> str:
        return self._config.base_url

    @property
    def timeout(self) -> httpx.Timeout:
        return self._config.timeout

    @property
    def max_retries(self) -> int:
        return self._config.retry.max_retries

    def with_options(self, *, timeout: TimeoutLike | None = None, max_retries: int | None = None,
                     headers: Mapping[str, str] | None = None) -> AsyncKVRag:
        """A client with these defaults changed (``headers`` added), sharing this one's connection pool;
        closing it leaves the pool open."""
        clone = object.__new__(type(self))
        clone._config = self._config.with_options(timeout, max_retries, headers)
        clone._owns_http = False
        clone._http = self._http
        clone._add_resources()
        return clone

    @cached_property
    def with_raw_response(self) -> AsyncKVRagWithRawResponse:
        """The same methods, answering ``RawResponse`` (``status_code``, ``headers``, ``parsed``)."""
        return AsyncKVRagWithRawResponse(self)

    # -- retrieval --------------------------------------------------------------------------------

    async def search(self, bank: str, query: str, k: int = 5, filter: ops.FilterLike = None,
                     retrieval: Retrieval | None = None, *, timeout: TimeoutLike | None = None) -> list[Hit]:
        """Top-k blocks; ``filter`` ({agent, tags, metadata}) applies before top-k.

        ``retrieval`` picks the ranking ("embedding", "kv", "hybrid", "hybrid_kv"; default: the server's).
        """
        return await self._call(ops.search(bank, query, k, filter, retrieval), timeout)

    @overload
    async def query(self, bank: str, question: str, k: int = ..., mode: Mode = ..., max_new_tokens: int = ...,
                    filter: ops.FilterLike = ..., stream: Literal[False] = ..., context_map: bool = ...,
                    retrieval: Retrieval | None = ..., recompute: float | None = ...,
                    compaction: Mapping[str, float] | None = ..., *,
                    timeout: TimeoutLike | None = ...) -> QueryResult: ...

    @overload
    async def query(self, bank: str, question: str, k: int = ..., mode: Mode = ..., max_new_tokens: int = ...,
                    filter: ops.FilterLike = ..., *, stream: Literal[True], context_map: bool = ...,
                    retrieval: Retrieval | None = ..., recompute: float | None = ...,
                    compaction: Mapping[str, float] | None = ...,
                    timeout: TimeoutLike | None = ...) -> AsyncQueryStream: ...

    async def query(self, bank: str, question: str, k: int = 5, mode: Mode = "kv", max_new_tokens: int = 64,
                    filter: ops.FilterLike = None, stream: bool = False, context_map: bool = False,
                    retrieval: Retrieval | None = None, recompute: float | None = None,
                    compaction: Mapping[str, float] | None = None, *,
                    timeout: TimeoutLike | None = None) -> QueryResult | AsyncQueryStream:
        """Answer from the top-k blocks (``mode`` "kv": stored KV; "text": re-read their text).

        ``context_map=True`` puts the bank's context map before the blocks (its KV is cached per map version).
        ``retrieval``, ``recompute`` and ``compaction`` override the server's defaults (see ``QueryKnobs``).
        With ``stream=True`` it returns a stream of token events ending with the full result.
        """
        knobs = QueryKnobs(retrieval=retrieval, recompute=recompute,
                           compaction=dict(compaction) if compaction is not None else None)
        call = ops.query(bank, question, k, mode, max_new_tokens, filter, stream, context_map, knobs)
        if stream:
            return AsyncQueryStream(await self._send(call, timeout, stream=True))
        return await self._call(call, timeout)

    # -- health -----------------------------------------------------------------------------------

    async def health(self, *, timeout: TimeoutLike | None = None) -> Health:
        """Liveness of the server process."""
        return await self._call(ops.health(), timeout)

    async def ready(self, *, timeout: TimeoutLike | None = None) -> bool:
        """Whether the server is ready (model, catalog and indexes loaded); False on 503 or no connection."""
        try:
            await self._call(ops.ready(), timeout)
        except (Unavailable, APIConnectionError):
            return False
        return True

    async def wait_ready(self, timeout: float = 60.0, poll_interval: float = 0.2) -> None:
        """Wait until ``ready()``; raise ``APITimeoutError`` after ``timeout`` seconds in all."""
        deadline = time.monotonic() + timeout
        while not await self.ready():
            if time.monotonic() >= deadline:
                raise APITimeoutError(f"{self.base_url} not ready after {timeout:g} s")
            await asyncio.sleep(poll_interval)

    # -- plumbing ---------------------------------------------------------------------------------

    async def _send(self, call: Call[Any], timeout: TimeoutLike | None = None, *,
                    stream: bool = False) -> httpx.Response:
        """Send with retries; return a 2xx response or raise the typed error."""
        retry = self._config.retry
        call = self._config.prepare(call)
        attempt = 0
        while True:
            request = self._http.build_request(call.method, self._config.base_url + call.path, json=call.json,
                                               params=call.params,
                                               headers={**self._config.default_headers(), **call.headers},
                                               timeout=self._config.request_timeout(timeout))
            try:
                response = await self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                if call.retries and retry.retry_exception(attempt, exc, call):
                    await asyncio.sleep(retry.delay(attempt))
                    attempt += 1
                    continue
                raise transport_error(exc) from exc
            if response.is_success:
                record_response(response)
                return response
            if stream:
                await response.aread()
                await response.aclose()
            if call.retries and retry.retry_status(attempt, response.status_code):
                await asyncio.sleep(retry.delay(attempt, response))
                attempt += 1
                continue
            raise error_from_response(response)

    async def _call(self, call: Call[T], timeout: TimeoutLike | None = None) -> T:
        response = await self._send(call, timeout)
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


class AsyncKVRagWithRawResponse:
    """``client.with_raw_response``: every single-request method, answering ``RawResponse``."""

    def __init__(self, client: AsyncKVRag) -> None:
        self.keys = AsyncKeysWithRawResponse(client.keys)
        self.banks = AsyncBanksWithRawResponse(client.banks)
        self.documents = AsyncDocumentsWithRawResponse(client.documents)
        self.jobs = AsyncJobsWithRawResponse(client.jobs)
        self.sessions = AsyncSessionsWithRawResponse(client.sessions)
        self.context_map = AsyncContextMapsWithRawResponse(client.context_map)
        self.search = async_raw_wrapper(client.search)
        self.query = async_raw_wrapper(client.query)
        self.health = async_raw_wrapper(client.health)
