"""The FastAPI application and ``run``: thin routes over ``BankStore``, one model worker, one error shape."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import uvicorn
from fastapi import APIRouter, FastAPI
from fastapi.routing import APIRoute
from starlette.middleware.cors import CORSMiddleware

from kvstore.bank import BankStore
from kvstore.storage import lock as data_dir_lock
from kvstore.storage.replication import ReplicaRefused

from . import console, mcp_http
from .auth import route_role
from .browser import BrowserGuard, is_loopback_name
from .errors import install_error_handlers
from .jobs import HANDLERS, JobRunner
from .metrics import Metrics
from .middleware import RequestContextMiddleware
from .path_guard import DotSegmentGuard
from .routes import (
    banks,
    context_map,
    documents,
    jobs,
    keys,
    maintenance,
    openai_compat,
    retrieval,
    sessions,
    system,
)
from .settings import ServerSettings
from .worker import ModelWorker, released_turn

log = logging.getLogger(__name__)


def _load_in_background(app: FastAPI, settings: ServerSettings) -> asyncio.Task[None]:
    """Load the store off the event loop so /healthz and /readyz answer while the model loads."""

    async def load() -> None:
        try:
            # On the model worker's primary thread, where the queries will run: a thread that does model work keeps
            # its own team of OpenMP helpers (server.worker.ModelWorker). Batched questions give up the turn.
            app.state.store = await app.state.worker.run(partial(BankStore, settings, while_waiting=released_turn))
            # What startup made (modules, the model's Python objects; ~680,000 objects) lives as long as the process:
            # kept out of the collector, a full collection no longer scans it (320 ms each time, measured, landing
            # on whichever query is running).
            gc.freeze()
            _start_jobs(app)
            log.info("kvrag is ready")
        except (ReplicaRefused, data_dir_lock.DataDirInUse) as exc:
            # Not a state to wait in: this process can never serve here. One line, then stop (run() exits 1).
            log.error("%s", exc.detail)
            app.state.load_error = type(exc).__name__
            app.state.fatal = exc.detail
            os.kill(os.getpid(), signal.SIGTERM)
        except Exception as exc:  # noqa: BLE001 - reported by /readyz; the process stays up to say so
            log.exception("loading the store failed")
            app.state.load_error = type(exc).__name__

    return asyncio.create_task(load())


def _start_jobs(app: FastAPI) -> None:
    """Start claiming durable jobs (this server's, and any a stopped server left) once the store is open."""
    app.state.jobs = JobRunner(app.state.store, app.state.worker, app.state.settings, HANDLERS)
    app.state.jobs.start()


def create_app(settings: ServerSettings, store: BankStore | None = None) -> FastAPI:
    """The kvrag API over ``store``, or over a store loaded from ``settings`` at startup."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = None if store is not None else _load_in_background(app, settings)
        if store is not None:
            _start_jobs(app)
        yield
        if loader is not None:
            await loader  # a thread cannot be interrupted; let it finish so the store closes cleanly
        runner: JobRunner | None = app.state.jobs
        if runner is not None:
            await runner.stop()  # the running job ends its step and goes back to the queue, never left running
        for task in list(app.state.tasks):
            task.cancel()
        await asyncio.to_thread(app.state.worker.shutdown)
        loaded: BankStore | None = getattr(app.state, "store", None)
        if loaded is not None:
            await asyncio.to_thread(loaded.close)
            log.info("store closed")

    # The docs pages are the console's (server.console.apidocs): FastAPI's own load their assets from CDNs.
    app = FastAPI(title="kvrag", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="A memory database for LLM agents: documents stored as their KV cache.")
    app.state.settings = settings
    # Twice the batch size: while one batch runs, the next one's requests retrieve and load.
    threads = 2 * settings.batch_max_size if settings.batch_max_size > 1 else 1
    app.state.worker = worker = ModelWorker(settings.queue_size, threads=threads)
    app.state.store = store  # built with while_waiting=released_turn, to batch questions across requests
    app.state.load_error = None
    app.state.fatal = None
    app.state.tasks = set()
    app.state.jobs = None
    app.state.metrics = metrics = Metrics(queue_depth=lambda: worker.depth,
                                          hot=lambda: app.state.store.hot if app.state.store else None,
                                          batches=lambda: app.state.store.batcher.stats if app.state.store else None,
                                          store=lambda: app.state.store)
    install_error_handlers(app)
    _add_middleware(app, settings, metrics)
    for module in (system, keys, banks, documents, jobs, retrieval, maintenance, context_map, sessions,
                   openai_compat, mcp_http):
        _publish_roles(module.router)
        app.include_router(module.router)
    console.install(app)
    return app


def _publish_roles(router: APIRouter) -> None:
    """Each operation's role in OpenAPI (``x-kvrag-role``), read from its dependencies (server.auth). Stamped on
    the router's routes before it is included (an included router's routes are read at inclusion)."""
    for route in router.routes:
        if isinstance(route, APIRoute):
            route.openapi_extra = {**(route.openapi_extra or {}), "x-kvrag-role": route_role(route) or "unstated"}


# What a browser page on an allowed origin may send and read (CORS).
CORS_REQUEST_HEADERS = ["Authorization", "X-API-Key", "Content-Type", "If-Match", "Idempotency-Key", "X-Request-ID",
                        "Mcp-Session-Id", "MCP-Protocol-Version", "Last-Event-ID"]
CORS_EXPOSED_HEADERS = ["X-Request-ID", "ETag", "Retry-After", "Mcp-Session-Id"]


def _add_middleware(app: FastAPI, settings: ServerSettings, metrics: Metrics) -> None:
    """Outermost first: request context (id, body limits, metrics), the dot-segment guard, the browser guard,
    CORS when configured. (Starlette wraps in reverse order of adding.)"""
    open_mode = settings.admin_key is None
    if open_mode and "*" in settings.cors_origins:
        raise ValueError("KVRAG_CORS_ORIGINS=* needs an admin key: without one every web page could drive the API")
    if settings.cors_origins:
        # No credentials mode: kvrag authenticates with headers, never cookies.
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins,
                           allow_methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"],
                           allow_headers=CORS_REQUEST_HEADERS, expose_headers=CORS_EXPOSED_HEADERS, max_age=600)
    app.add_middleware(BrowserGuard, open_mode=open_mode, allowed_origins=settings.cors_origins)
    app.add_middleware(DotSegmentGuard)  # inside the request context: its 400 carries the request id
    app.add_middleware(RequestContextMiddleware, settings=settings, metrics=metrics)


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the server reachable from this machine only."""
    return is_loopback_name(host)


def run(settings: ServerSettings, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve until interrupted. Without an admin key only loopback is allowed (requests are then
    unauthenticated); SIGTERM/SIGINT shut down gracefully and close the store."""
    if settings.admin_key is None and not is_loopback(host):
        raise SystemExit(f"refusing to listen on {host}: no admin key is configured, so requests would be "
                         "unauthenticated. Set KVRAG_ADMIN_KEY, or bind to 127.0.0.1.")
    if settings.admin_key is None:
        log.warning("no admin key configured (KVRAG_ADMIN_KEY): accepting unauthenticated requests on %s only",
                    host)
    try:  # a second process on this data dir is refused before the model loads; the store shares this lock
        held = data_dir_lock.acquire(settings.data_dir)
    except data_dir_lock.DataDirInUse as exc:
        raise SystemExit(f"error: {exc.detail}") from None
    app = create_app(settings)
    try:
        uvicorn.run(app, host=host, port=port, timeout_graceful_shutdown=30)
    finally:
        held.release()
    if app.state.fatal:
        raise SystemExit(f"error: {app.state.fatal}")
