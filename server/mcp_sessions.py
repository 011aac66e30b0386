"""Who opened each MCP session, and how many sessions each key holds open.

A session id answers only the key (by fingerprint) and bank that opened it. Each key may hold at most
``per_key`` sessions open, so no key can take every slot of the MCP SDK's session table (its limit is
global). The SDK does not say when a session ends on its own, so this table follows the SDK's rule: a
session with no request in flight for ``idle_s`` seconds is gone (the SDK is configured with the same idle
timeout); a DELETE, or the SDK answering 404 for the id, ends it at once. Everything runs on the event loop,
so a check and the reservation after it cannot interleave with another request.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

Owner = tuple[str, str]  # (key fingerprint, bank)


@dataclass
class _Entry:
    owner: Owner
    in_flight: int = 0
    last_active: float = field(default_factory=time.monotonic)


class SessionTable:
    """Session owners, open-session counts per key, and reservations for sessions being opened."""

    def __init__(self, per_key: int, idle_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_key = per_key
        self.idle_s = idle_s
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._opening: Counter[str] = Counter()

    def owner_of(self, session_id: str) -> Owner | None:
        """The owner of a live session, None for an unknown or expired one."""
        entry = self._entries.get(session_id)
        if entry is None or self._expired(entry, self._clock()):
            self._entries.pop(session_id, None)
            return None
        return entry.owner

    def reserve(self, fingerprint: str) -> bool:
        """Hold a slot for a session this key is opening; False when it already holds ``per_key``."""
        if self.held_by(fingerprint) >= self.per_key:
            return False
        self._opening[fingerprint] += 1
        return True

    def release(self, fingerprint: str) -> None:
        """The opening request is over (its session, if any, is bound by now)."""
        self._opening[fingerprint] -= 1
        if self._opening[fingerprint] <= 0:
            del self._opening[fingerprint]

    def bind(self, session_id: str, owner: Owner) -> None:
        """The opening request's answer named its session; it is in flight until ``end``."""
        self._entries[session_id] = _Entry(owner=owner, in_flight=1, last_active=self._clock())

    def begin(self, session_id: str) -> None:
        entry = self._entries.get(session_id)
        if entry is not None:
            entry.in_flight += 1
            entry.last_active = self._clock()

    def end(self, session_id: str) -> None:
        entry = self._entries.get(session_id)
        if entry is not None:
            entry.in_flight = max(0, entry.in_flight - 1)
            entry.last_active = self._clock()

    def forget(self, session_id: str) -> None:
        self._entries.pop(session_id, None)

    def held_by(self, fingerprint: str) -> int:
        """Sessions this key holds open or is opening (expired ones are dropped on the way)."""
        now = self._clock()
        for session_id in [sid for sid, e in self._entries.items() if self._expired(e, now)]:
            del self._entries[session_id]
        return sum(1 for e in self._entries.values() if e.owner[0] == fingerprint) + self._opening[fingerprint]

    def _expired(self, entry: _Entry, now: float) -> bool:
        return entry.in_flight == 0 and now - entry.last_active >= self.idle_s
