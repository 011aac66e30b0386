"""Damage found and repaired since this process started, per bank (reported by ``GET /v1/integrity``)."""

from __future__ import annotations

import threading
from typing import Any


class IntegrityLog:
    """Per bank: what was found (a message) or how often (a count), e.g. ``corrupt_blocks``, ``index``."""

    def __init__(self) -> None:
        self._entries: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def note(self, bank: str, what: str, value: Any = 1) -> None:
        """Record damage found in ``bank``: a message, or a count when ``value`` is a number."""
        with self._lock:
            entry = self._entries.setdefault(bank, {})
            entry[what] = entry.get(what, 0) + value if isinstance(value, int) else value

    def report(self) -> dict[str, dict[str, Any]]:
        """Only banks with any damage: ``index`` (how a missing or damaged snapshot was handled),
        ``corrupt_blocks`` (failed their checksum or were missing), ``rebuilt_blocks`` (rewritten from text)."""
        with self._lock:
            return {bank: dict(entry) for bank, entry in self._entries.items()}
