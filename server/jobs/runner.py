"""The job runner: one per server process, claiming durable jobs (kvstore.storage.jobs) from the catalog.

It runs one job at a time (model work is serialized by the worker anyway), on the model worker one call at a
time so queries interleave with long work. While a job runs, a heartbeat renews its lease every third of
``job_lease_s`` and picks up cancel requests; the job's handler checkpoints its progress and resume state,
and stops at the next step boundary when the job was cancelled, its lease was lost, or the server is
stopping. On SIGTERM the runner stops claiming, lets the current step finish (``job_stop_grace_s`` at most)
and hands the job back to the queue, so the next start (or another replica) resumes it; a kill -9 leaves
the lease to expire, and every runner's sweep (``recover_expired``) re-queues or fails it with the reason.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

from starlette.concurrency import run_in_threadpool

from kvstore.bank import BankStore
from kvstore.errors import KVRagError, Unavailable
from kvstore.storage import jobs

from ..settings import ServerSettings
from ..worker import ModelWorker

log = logging.getLogger(__name__)
T = TypeVar("T")
CHECKPOINT_EVERY_S = 0.5  # progress writes of a fast loop are batched to about two a second


class JobStopped(Exception):
    """Raised by a handler's checkpoint when the job must stop at this step boundary."""


class JobError(Exception):
    """A job that failed on purpose: ``detail`` is shown (redacted) as its error, ``result`` is kept."""

    def __init__(self, detail: str, result: dict[str, Any] | None = None) -> None:
        super().__init__(detail)
        self.detail, self.result = detail, result


@dataclass
class JobContext:
    """What a handler gets: the claimed job, the store and model worker, and its progress/stop channel."""

    job: jobs.ClaimedJob
    store: BankStore
    worker: ModelWorker
    settings: ServerSettings
    runner: JobRunner
    lost: bool = False
    cancel: bool = False
    state: dict[str, Any] | None = None  # the newest resume state, kept as the result of a cancelled job
    _written_at: float = field(default=0.0)

    def should_stop(self) -> bool:
        return self.lost or self.cancel or self.runner.stopping

    async def model(self, fn: Callable[[], T], retry_s: float = 0.05) -> T:
        """Run ``fn`` on the model worker; a job yields to interactive requests, so a full queue means wait."""
        while True:
            try:
                return await self.worker.run(fn)
            except Unavailable:
                if self.should_stop():
                    raise JobStopped from None
                await asyncio.sleep(retry_s)

    async def progress(self, *, done: int | None = None, total: int | None = None, step: str | None = None,
                       state: dict[str, Any] | None = None, force: bool = False) -> None:
        """Record progress with the resume state (at most every ``CHECKPOINT_EVERY_S`` unless ``force``), then
        stop here (``JobStopped``) if the job must stop. Progress and state are written together, so a resume
        never redoes more than what came after the last checkpoint."""
        self.state = state if state is not None else self.state
        due = force or self.should_stop() or time.monotonic() - self._written_at >= CHECKPOINT_EVERY_S
        if due and not self.lost:
            held, cancel = await run_in_threadpool(partial(
                jobs.checkpoint, self.store.sessions, self.job.id, self.runner.id, done=done, total=total,
                step=step, state=state))
            self._written_at = time.monotonic()
            self.lost, self.cancel = self.lost or not held, self.cancel or cancel
        if self.should_stop():
            raise JobStopped


Handler = Callable[[JobContext], Awaitable[dict[str, Any]]]


class JobRunner:
    """Claims and runs jobs of the kinds it has handlers for, until stopped."""

    def __init__(self, store: BankStore, worker: ModelWorker, settings: ServerSettings,
                 handlers: dict[str, Handler]) -> None:
        self.store, self.worker, self.settings, self.handlers = store, worker, settings, handlers
        self.id = f"{socket.gethostname()[:60]}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self.stopping = False
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._current: JobContext | None = None
        self._next_purge = 0.0

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._loop(), name="kvrag-job-runner")

    def wake(self) -> None:
        """A job was just queued here: look now rather than at the next poll."""
        self._wake.set()

    async def _loop(self) -> None:
        while not self.stopping:
            self._wake.clear()  # before looking, so a job queued meanwhile wakes the wait below
            try:
                await self._housekeeping()
                claimed = await run_in_threadpool(partial(jobs.claim, self.store.sessions, self.id,
                                                          self.settings.job_lease_s, tuple(self.handlers)))
                if claimed is not None and not self.stopping:
                    await self._run(claimed)
                    continue
                if claimed is not None:  # stopping began while claiming: give it straight back
                    await run_in_threadpool(partial(jobs.release, self.store.sessions, claimed.id, self.id))
                    break
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a catalog hiccup must not end the runner; try again next poll
                log.exception("job runner: poll failed")
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.settings.job_poll_s)
            except TimeoutError:
                pass

    async def _housekeeping(self) -> None:
        """Sweep expired leases (resume or fail), and purge expired finished jobs now and then."""
        sessions = self.store.sessions
        swept = await run_in_threadpool(partial(jobs.recover_expired, sessions, self.settings.job_max_attempts))
        if any(swept.values()):
            log.warning("jobs whose server stopped renewing their lease: %s", swept)
        if time.monotonic() >= self._next_purge:
            purged = await run_in_threadpool(partial(jobs.purge_finished, sessions, self.settings.job_retention_s))
            if purged:
                log.info("purged %d finished jobs past their retention", purged)
            self._next_purge = time.monotonic() + min(self.settings.job_retention_s / 2, 60.0)

    async def _run(self, claimed: jobs.ClaimedJob) -> None:
        ctx = JobContext(job=claimed, store=self.store, worker=self.worker, settings=self.settings, runner=self,
                         state=claimed.state or None)
        self._current = ctx
        heartbeat = asyncio.create_task(self._heartbeat(ctx))
        sessions = self.store.sessions
        log.info("job %s (%s on %s) started, attempt %d", claimed.id, claimed.kind, claimed.bank, claimed.attempts)
        try:
            result = await self.handlers[claimed.kind](ctx)
            await run_in_threadpool(partial(jobs.finish, sessions, claimed.id, self.id, "succeeded", result=result))
            log.info("job %s succeeded", claimed.id)
        except JobStopped:
            await self._stopped(ctx)
        except (JobError, KVRagError) as exc:
            if await self._cancelled(ctx):  # e.g. its bank was deleted under it: that is the cancel, not a failure
                await self._stopped(ctx)
            else:
                detail = exc.detail if isinstance(exc, JobError) else f"{exc.code}: {exc.detail}"
                log.warning("job %s failed: %s", claimed.id, detail)  # in full for the operator; shown redacted
                partial_result = exc.result if isinstance(exc, JobError) else None
                await run_in_threadpool(partial(jobs.finish, sessions, claimed.id, self.id, "failed", error=detail,
                                                result=partial_result))
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - a job must end in a recorded state, whatever happened
            log.exception("job %s failed", claimed.id)
            await run_in_threadpool(partial(jobs.finish, sessions, claimed.id, self.id, "failed",
                                            error="internal error"))
        finally:
            heartbeat.cancel()
            self._current = None

    async def _cancelled(self, ctx: JobContext) -> bool:
        held, cancel = await run_in_threadpool(partial(jobs.renew, self.store.sessions, ctx.job.id, self.id,
                                                       self.settings.job_lease_s))
        ctx.lost, ctx.cancel = ctx.lost or not held, ctx.cancel or cancel
        return ctx.cancel

    async def _stopped(self, ctx: JobContext) -> None:
        sessions, job_id = self.store.sessions, ctx.job.id
        if ctx.lost:
            log.warning("job %s: lease lost to another runner; stopped without writing", job_id)
        elif ctx.cancel:  # what the finished steps did stays done: their part of the result is kept
            await run_in_threadpool(partial(jobs.finish, sessions, job_id, self.id, "cancelled",
                                            result=ctx.state or {}))
            log.info("job %s cancelled", job_id)
        else:
            await run_in_threadpool(partial(jobs.release, sessions, job_id, self.id))
            log.info("job %s handed back to the queue at shutdown; it resumes at the next start", job_id)

    async def _heartbeat(self, ctx: JobContext) -> None:
        every = self.settings.job_lease_s / 3
        while True:
            await asyncio.sleep(every)
            try:
                held, cancel = await run_in_threadpool(partial(jobs.renew, self.store.sessions, ctx.job.id, self.id,
                                                               self.settings.job_lease_s))
            except Exception:  # noqa: BLE001 - a missed renewal is retried; the lease has two more thirds
                log.exception("job %s: lease renewal failed", ctx.job.id)
                continue
            ctx.lost = ctx.lost or not held
            ctx.cancel = ctx.cancel or cancel

    async def stop(self) -> None:
        """Stop claiming; let the running job reach its next step boundary (``job_stop_grace_s`` at most),
        then make sure it is back in the queue, never left ``running``."""
        self.stopping = True
        self._wake.set()
        task = self._loop_task
        if task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout=self.settings.job_stop_grace_s)
        except TimeoutError:
            current = self._current
            task.cancel()
            if current is not None:  # its step is still running: hand the job back anyway (fenced writes)
                await run_in_threadpool(partial(jobs.release, self.store.sessions, current.job.id, self.id))
                log.warning("job %s: step still running after %.0f s; handed back to the queue",
                            current.job.id, self.settings.job_stop_grace_s)
        except Exception:  # noqa: BLE001 - shutdown goes on whatever the loop did
            log.exception("job runner stopped with an error")
