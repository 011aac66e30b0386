"""One bounded worker for model work: the model is not thread-safe and the CPU is small.

Work runs on a single thread, in arrival order. When more than ``queue_size`` calls are already
waiting, a new one is refused at once with ``Unavailable`` (503 + Retry-After) instead of piling up.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from kvstore.errors import Unavailable

T = TypeVar("T")


class ModelWorker:
    """A single-thread executor with a bounded wait queue."""

    def __init__(self, queue_size: int) -> None:
        self.queue_size = queue_size
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvrag-model")
        self._lock = threading.Lock()
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
        with self._lock:
            if self._waiting >= self.queue_size:
                raise Unavailable("the model worker is busy; retry shortly")
            self._waiting += 1
        try:
            return asyncio.get_running_loop().run_in_executor(self._executor, self._call, fn, args)
        except BaseException:
            with self._lock:
                self._waiting -= 1
            raise

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the worker thread and await its result."""
        return await self.submit(fn, *args)

    def _call(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        with self._lock:
            self._waiting -= 1
            self._running += 1
        try:
            return fn(*args)
        finally:
            with self._lock:
                self._running -= 1

    def shutdown(self) -> None:
        """Let the running and queued calls finish, then stop the thread."""
        self._executor.shutdown(wait=True)
