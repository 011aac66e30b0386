"""The synchronous client ``KVRag``.

GENERATED from _async_client.py by client/scripts/unasync.py: do not edit; edit _async_client.py and run
the script.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from functools import cached_property
from types import TracebackType
from typing import Any, Literal, TypeVar, overload

import httpx

from . import _operations as ops
from ._resources import (
    Banks,
    BanksWithRawResponse,
    ContextMaps,
    ContextMapsWithRawResponse,
    Documents,
    DocumentsWithRawResponse,
    Jobs,
    JobsWithRawResponse,
    Keys,
    KeysWithRawResponse,
    Sessions,
    SessionsWithRawResponse,
)
from ._base import Call, ClientConfig, EventReader, TimeoutLike, raw_wrapper, record_response, transport_error
from ._exceptions import APIConnectionError, APITimeoutError, Unavailable, error_from_response
from .types import Health, Hit, Mode, QueryKnobs, QueryResult, Retrieval, StreamEvent

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


class KVRag:
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
                 http_client: httpx.Client | None = None) -> None:
        self._config = ClientConfig.create(base_url, api_key, timeout, max_retries, headers)
        self._owns_http = http_client is None
        self._http = http_client or httpx.Client(timeout=self._config.timeout)
        self._add_resources()

    def _add_resources(self) -> None:
        self.keys = Keys(self)
        self.banks = Banks(self)
        self.documents = Documents(self)
        self.jobs = Jobs(self)
        self.sessions = Sessions(self)
        self.context_map = ContextMaps(self)

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
                     headers: Mapping[str, str] | None = None) -> KVRag:
        """A client with these defaults changed (``headers`` added), sharing this one's connection pool;
        closing it leaves the pool open."""
        clone = object.__new__(type(self))
        clone._config = self._config.with_options(timeout, max_retries, headers)
        clone._owns_http = False
        clone._http = self._http
        clone._add_resources()
        return clone

    @cached_property
    def with_raw_response(self) -> KVRagWithRawResponse:
        """The same methods, answering ``RawResponse`` (``status_code``, ``headers``, ``parsed``)."""
        return KVRagWithRawResponse(self)

    # -- retrieval --------------------------------------------------------------------------------

    def search(self, bank: str, query: str, k: int = 5, filter: ops.FilterLike = None,
                     retrieval: Retrieval | None = None, *, timeout: TimeoutLike | None = None) -> list[Hit]:
        """Top-k blocks; ``filter`` ({agent, tags, metadata}) applies before top-k.

        ``retrieval`` picks the ranking ("embedding", "kv", "hybrid", "hybrid_kv"; default: the server's).
        """
        return self._call(ops.search(bank, query, k, filter, retrieval), timeout)

    @overload
    def query(self, bank: str, question: str, k: int = ..., mode: Mode = ..., max_new_tokens: int = ...,
                    filter: ops.FilterLike = ..., stream: Literal[False] = ..., context_map: bool = ...,
                    retrieval: Retrieval | None = ..., recompute: float | None = ...,
                    compaction: Mapping[str, float] | None = ..., *,
                    timeout: TimeoutLike | None = ...) -> QueryResult: ...

    @overload
    def query(self, bank: str, question: str, k: int = ..., mode: Mode = ..., max_new_tokens: int = ...,
                    filter: ops.FilterLike = ..., *, stream: Literal[True], context_map: bool = ...,
                    retrieval: Retrieval | None = ..., recompute: float | None = ...,
                    compaction: Mapping[str, float] | None = ...,
                    timeout: TimeoutLike | None = ...) -> QueryStream: ...

    def query(self, bank: str, question: str, k: int = 5, mode: Mode = "kv", max_new_tokens: int = 64,
                    filter: ops.FilterLike = None, stream: bool = False, context_map: bool = False,
                    retrieval: Retrieval | None = None, recompute: float | None = None,
                    compaction: Mapping[str, float] | None = None, *,
                    timeout: TimeoutLike | None = None) -> QueryResult | QueryStream:
        """Answer from the top-k blocks (``mode`` "kv": stored KV; "text": re-read their text).

        ``context_map=True`` puts the bank's context map before the blocks (its KV is cached per map version).
        ``retrieval``, ``recompute`` and ``compaction`` override the server's defaults (see ``QueryKnobs``).
        With ``stream=True`` it returns a stream of token events ending with the full result.
        """
        knobs = QueryKnobs(retrieval=retrieval, recompute=recompute,
                           compaction=dict(compaction) if compaction is not None else None)
        call = ops.query(bank, question, k, mode, max_new_tokens, filter, stream, context_map, knobs)
        if stream:
            return QueryStream(self._send(call, timeout, stream=True))
        return self._call(call, timeout)

    # -- health -----------------------------------------------------------------------------------

    def health(self, *, timeout: TimeoutLike | None = None) -> Health:
        """Liveness of the server process."""
        return self._call(ops.health(), timeout)

    def ready(self, *, timeout: TimeoutLike | None = None) -> bool:
        """Whether the server is ready (model, catalog and indexes loaded); False on 503 or no connection."""
        try:
            self._call(ops.ready(), timeout)
        except (Unavailable, APIConnectionError):
            return False
        return True

    def wait_ready(self, timeout: float = 60.0, poll_interval: float = 0.2) -> None:
        """Wait until ``ready()``; raise ``APITimeoutError`` after ``timeout`` seconds in all."""
        deadline = time.monotonic() + timeout
        while not self.ready():
            if time.monotonic() >= deadline:
                raise APITimeoutError(f"{self.base_url} not ready after {timeout:g} s")
            time.sleep(poll_interval)

    # -- plumbing ---------------------------------------------------------------------------------

    def _send(self, call: Call[Any], timeout: TimeoutLike | None = None, *,
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
                response = self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                if call.retries and retry.retry_exception(attempt, exc, call):
                    time.sleep(retry.delay(attempt))
                    attempt += 1
                    continue
                raise transport_error(exc) from exc
            if response.is_success:
                record_response(response)
                return response
            if stream:
                response.read()
                response.close()
            if call.retries and retry.retry_status(attempt, response.status_code):
                time.sleep(retry.delay(attempt, response))
                attempt += 1
                continue
            raise error_from_response(response)

    def _call(self, call: Call[T], timeout: TimeoutLike | None = None) -> T:
        response = self._send(call, timeout)
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


class KVRagWithRawResponse:
    """``client.with_raw_response``: every single-request method, answering ``RawResponse``."""

    def __init__(self, client: KVRag) -> None:
        self.keys = KeysWithRawResponse(client.keys)
        self.banks = BanksWithRawResponse(client.banks)
        self.documents = DocumentsWithRawResponse(client.documents)
        self.jobs = JobsWithRawResponse(client.jobs)
        self.sessions = SessionsWithRawResponse(client.sessions)
        self.context_map = ContextMapsWithRawResponse(client.context_map)
        self.search = raw_wrapper(client.search)
        self.query = raw_wrapper(client.query)
        self.health = raw_wrapper(client.health)
