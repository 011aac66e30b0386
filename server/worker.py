"""One bounded worker for model work: the model is not thread-safe and the CPU is small.

Work runs one call at a time, in arrival order: a call holds the worker's turn while it runs. When more
than ``queue_size`` calls are already waiting, a new one is refused at once with ``Unavailable`` (503 +
Retry-After) instead of piling up. With ``threads`` > 1 a call can give its turn up while it waits
(:func:`released_turn`): a kv query waiting for its batched answer lets the next call retrieve and
load meanwhile, so that one can join the next batch (kvstore.model.batching).
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from typing import Any, TypeVar

from kvstore.errors import Unavailable

T = TypeVar("T")


class _Turn:
    """A lock handed out in the order it was asked for (a plain lock lets any waiter in); a call taking its
    turn back after a wait goes first, since its answer is what that wait was for."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: deque[object] = deque()
        self._busy = False

    def acquire(self, first: bool = False) -> None:
        me = object()
        with self._cond:
            if first:
                self._queue.appendleft(me)
            else:
                self._queue.append(me)
            self._cond.wait_for(lambda: not self._busy and self._queue[0] is me)
            self._queue.popleft()
            self._busy = True

    def release(self) -> None:
        with self._cond:
            self._busy = False
            self._cond.notify_all()


_HELD = threading.local()  # per thread: the worker turn its current call holds (None outside a worker call)


@contextmanager
def released_turn() -> Iterator[None]:
    """Give up the turn the calling thread's worker call holds, for the block (the call still counts as
    running), then wait to get it back first. Outside a worker call it does nothing. Any worker's: a store
    takes this as its batcher's ``while_waiting`` when it is built, before or after the worker."""
    turn: _Turn | None = getattr(_HELD, "turn", None)
    if turn is None:
        yield
        return
    turn.release()
    try:
        yield
    finally:
        turn.acquire(first=True)


class ModelWorker:
    """Runs one call at a time (the turn), with a bounded wait queue, on a primary thread when it is free.

    torch's OpenMP runtime keeps a team of helper threads for every thread that ever ran model work, for as long as
    that thread lives; once the runtime manages more threads than there are cores it stops spinning between
    parallel regions, and every op then pays a sleep and a wake-up (a question's forward took 1.2x as long, in process
    on a 2-core box; issue 33). So a call runs on the one long-lived primary thread whenever that thread is free, which
    is always the case for calls that come one at a time; a call arriving while the primary is busy (a kv question
    waiting for its batch gives its turn up there) runs on a thread of its own, which ends with the call and takes
    its helpers with it. ``threads`` bounds the threads running calls at once, the primary included.
    """

    def __init__(self, queue_size: int, threads: int = 1) -> None:
        self.queue_size = queue_size
        self._primary = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvrag-model")
        self._overflow_slots = max(0, threads - 1)
        self._overflow: set[threading.Thread] = set()  # running calls' own threads, for shutdown to join
        self._overflow_calls = 0  # slots taken: counted when a call is routed, so routing never over-commits
        self._primary_calls = 0  # submitted to the primary and not finished
        self._lock = threading.Lock()
        self._turn = _Turn()
        self._waiting = 0
        self._running = 0

    @property
    def waiting(self) -> int:
        """Calls submitted and not yet started."""
        return self._waiting

    @property
    def depth(self) -> int:
        """Calls waiting plus the one running."""
        return self._waiting + self._running

    def submit(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Queue ``fn(*args)``; raises ``Unavailable`` right away when the queue is full."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._waiting >= self.queue_size:
                raise Unavailable("the model worker is busy; retry shortly")
            self._waiting += 1
            primary = self._primary_calls == 0 or self._overflow_calls >= self._overflow_slots
            if primary:
                self._primary_calls += 1
            else:
                self._overflow_calls += 1
        try:
            if primary:
                return loop.run_in_executor(self._primary, self._on_primary, fn, args)
            return self._on_own_thread(loop, fn, args)
        except BaseException:
            with self._lock:
                self._waiting -= 1
                self._primary_calls -= primary
                self._overflow_calls -= not primary
            raise

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on a worker thread and await its result."""
        return await self.submit(fn, *args)

    def _on_primary(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        try:
            return self._call(fn, args)
        finally:
            with self._lock:
                self._primary_calls -= 1

    def _on_own_thread(self, loop: asyncio.AbstractEventLoop, fn: Callable[..., T],
                       args: tuple[Any, ...]) -> asyncio.Future[T]:
        """``fn(*args)`` on a new thread that ends with the call (the caller has taken an overflow slot for it)."""
        future: asyncio.Future[T] = loop.create_future()

        def settle(result: T | None, error: BaseException | None) -> None:
            if future.cancelled():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)  # type: ignore[arg-type]

        def body() -> None:
            try:
                result, error = self._call(fn, args), None
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
                result, error = None, exc
            finally:
                with self._lock:
                    self._overflow.discard(thread)
                    self._overflow_calls -= 1
            try:
                loop.call_soon_threadsafe(settle, result, error)
            except RuntimeError:  # the loop closed while the call ran: nobody awaits it any more
                pass

        thread = threading.Thread(target=body, name="kvrag-model-overflow", daemon=True)
        with self._lock:
            self._overflow.add(thread)
        try:
            thread.start()
        except BaseException:
            with self._lock:
                self._overflow.discard(thread)
            raise  # submit gives the slot back
        return future

    def _call(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        self._turn.acquire()
        with self._lock:
            self._waiting -= 1
            self._running += 1
        _HELD.turn = self._turn
        try:
            return fn(*args)
        finally:
            _HELD.turn = None
            with self._lock:
                self._running -= 1
            self._turn.release()

    def released(self) -> AbstractContextManager[None]:
        """:func:`released_turn`: give the turn up for the block, then wait to get it back."""
        return released_turn()

    def shutdown(self) -> None:
        """Let the running and queued calls finish, then stop the threads."""
        self._primary.shutdown(wait=True)
        with self._lock:
            overflow = list(self._overflow)
        for thread in overflow:
            thread.join()
