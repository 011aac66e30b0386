"""One byte budget over every KV the process keeps in memory, partitioned by bank.

Three kinds of KV live here: ``blocks`` (the hot tier: decoded blocks and cold blocks' on-the-fly KV),
``map`` (a bank's rendered context map, prefilled) and ``sessions`` (an agent session's live KV). Each is
only a cache: an entry evicted is recomputed (or decoded again) when next needed, so eviction changes
latency, never an answer.

Why partitioned by bank: entries used to be shared by content hash, so whether *another* bank had recently
used a text showed in a bank's hot-tier stats and its queries' ``load_ms``. Here every key carries its
bank, and a bank only ever finds, counts or frees its own entries: the same text in two banks is two
entries. What one bank's activity can still do to another is take memory when the global cap is reached,
and then the victim is the least recently used entry of the bank holding the most bytes (max-min fair:
a bank using less than the others is evicted last). An operator who wants no cross-bank effect at all
sets a per-bank cap (``KVRAG_KV_MEMORY_BANK_BYTES``) with banks x cap <= the global cap.

Caps: ``total_bytes`` over everything (``KVRAG_KV_MEMORY_BYTES``), optional ``bank_bytes`` per bank, and
optional caps per kind (the hot tier keeps its own ``KVRAG_HOT_TIER_BYTES`` within the total).
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from collections.abc import Collection, Hashable
from dataclasses import dataclass
from typing import Any

from kvstore.lru import HasBytes

KINDS = ("blocks", "map", "sessions")


@dataclass
class _Entry:
    item: Any
    nbytes: int
    tick: int  # when last used (a global counter): orders a bank's kinds against each other


@dataclass
class KindCounters:
    """Lookups of one kind, process-wide (for /metrics, which only an admin reads)."""

    hits: int = 0
    misses: int = 0


class KVBudget:
    """Entries keyed by (bank, kind, key) under a global byte cap, an optional per-bank cap and per-kind caps;
    thread-safe.

    Banks are the catalog's bank ids; a deleted bank's entries go with :meth:`drop_bank`.
    """

    def __init__(self, total_bytes: int, *, bank_bytes: int | None = None,
                 kind_bytes: dict[str, int] | None = None) -> None:
        self.total_bytes = total_bytes
        self.bank_bytes = bank_bytes
        self.kind_bytes: dict[str, int] = dict(kind_bytes or {})
        self._parts: dict[tuple[int, str], OrderedDict[Hashable, _Entry]] = {}  # least recently used first
        self._part_used: dict[tuple[int, str], int] = {}
        self._bank_used: dict[int, int] = {}
        self._kind_used: dict[str, int] = dict.fromkeys(KINDS, 0)
        self._used = 0
        self._ticks = itertools.count()
        self._lock = threading.Lock()
        self.counters = {kind: KindCounters() for kind in KINDS}

    # -- reads ------------------------------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        return self._used

    def kind_nbytes(self, kind: str) -> int:
        return self._kind_used[kind]

    def _entry(self, bank: int, kind: str, key: Hashable) -> _Entry | None:
        part = self._parts.get((bank, kind))
        return part.get(key) if part is not None else None

    def peek(self, bank: int, kind: str, key: Hashable) -> Any | None:
        """The entry without touching its recency or the counters."""
        with self._lock:
            entry = self._entry(bank, kind, key)
            return entry.item if entry is not None else None

    def get(self, bank: int, kind: str, key: Hashable) -> Any | None:
        """The entry, now the most recently used of its bank; None (a miss) when absent."""
        with self._lock:
            part = self._parts.get((bank, kind))
            entry = part.get(key) if part is not None else None
            if entry is None or part is None:
                self.counters[kind].misses += 1
                return None
            part.move_to_end(key)
            entry.tick = next(self._ticks)
            self.counters[kind].hits += 1
            return entry.item

    def size_of(self, bank: int, kind: str, key: Hashable) -> int:
        """Bytes of the entry, 0 if absent."""
        with self._lock:
            entry = self._entry(bank, kind, key)
            return entry.nbytes if entry is not None else 0

    def usage(self, bank: int) -> dict[str, dict[str, int]]:
        """Entries and bytes per kind that ``bank`` holds (and nothing of any other bank)."""
        with self._lock:
            return {kind: {"entries": len(self._parts.get((bank, kind), ())),
                           "bytes": self._part_used.get((bank, kind), 0)} for kind in KINDS}

    # -- writes -----------------------------------------------------------------------------------

    def fits(self, kind: str, nbytes: int) -> bool:
        """Whether an entry of this size can be kept at all (it may still evict others)."""
        caps = [self.total_bytes, self.kind_bytes.get(kind, self.total_bytes)]
        if self.bank_bytes is not None:
            caps.append(self.bank_bytes)
        return nbytes <= min(caps)

    def put(self, bank: int, kind: str, key: Hashable, item: HasBytes) -> bool:
        """Insert or replace, then evict until every cap holds. An entry larger than a cap is not kept (it
        would evict everything and then itself): returns False, and any older entry under the key is gone."""
        size = item.nbytes
        with self._lock:
            self._remove(bank, kind, key)
            if not self.fits(kind, size):
                return False
            part = self._parts.setdefault((bank, kind), OrderedDict())
            part[key] = _Entry(item, size, next(self._ticks))
            self._account(bank, kind, size)
            self._enforce(bank, kind, key)
            return True

    def discard(self, bank: int, kind: str, key: Hashable) -> None:
        with self._lock:
            self._remove(bank, kind, key)

    def discard_everywhere(self, kind: str, key: Hashable, keep: Collection[int] = ()) -> None:
        """Drop ``key`` from every bank but those in ``keep`` (e.g. a blob deleted from disk: keep none)."""
        with self._lock:
            for bank, k in list(self._parts):
                if k == kind and bank not in keep:
                    self._remove(bank, kind, key)

    def drop_bank(self, bank: int) -> int:
        """Forget every entry of ``bank`` (it was deleted); the bytes freed."""
        with self._lock:
            freed = 0
            for kind in KINDS:
                if self._parts.pop((bank, kind), None) is None:
                    continue
                size = self._part_used.get((bank, kind), 0)
                self._account(bank, kind, -size)
                self._part_used.pop((bank, kind), None)
                freed += size
            self._bank_used.pop(bank, None)
            return freed

    def drop_kind(self, kind: str) -> None:
        """Forget every entry of ``kind`` in every bank (e.g. after the source of all of them changed)."""
        with self._lock:
            for bank, k in list(self._parts):
                if k == kind:
                    for key in list(self._parts[(bank, k)]):
                        self._remove(bank, kind, key)

    def shrink(self) -> None:
        """Evict until every cap holds again (after a cap was lowered)."""
        with self._lock:
            self._enforce(None, None)

    # -- internals (caller holds the lock) --------------------------------------------------------

    def _account(self, bank: int, kind: str, delta: int) -> None:
        self._used += delta
        self._kind_used[kind] += delta
        self._bank_used[bank] = self._bank_used.get(bank, 0) + delta
        self._part_used[(bank, kind)] = self._part_used.get((bank, kind), 0) + delta

    def _remove(self, bank: int, kind: str, key: Hashable) -> None:
        part = self._parts.get((bank, kind))
        entry = part.pop(key, None) if part is not None else None
        if entry is not None:
            self._account(bank, kind, -entry.nbytes)

    def _evict_one(self, bank: int, kinds: tuple[str, ...], protect: tuple[int, str, Hashable] | None) -> bool:
        """Evict the least recently used entry of ``bank`` among ``kinds``, never ``protect`` (the entry just
        put: a cache that drops what it was just given is no cache); False when nothing else is there."""
        heads = []
        for kind in kinds:
            for key, entry in itertools.islice(self._parts.get((bank, kind), {}).items(), 2):
                if (bank, kind, key) != protect:
                    heads.append((entry.tick, kind, key))
                    break
        if not heads:
            return False
        _, kind, key = min(heads, key=lambda h: h[0])
        self._remove(bank, kind, key)
        return True

    def _evict_fairly(self, kind: str | None, protect: tuple[int, str, Hashable] | None) -> None:
        """Evict from the bank holding the most bytes (of ``kind``, or of all kinds); ties go to the lowest
        bank id (deterministic). A bank whose only entry is ``protect`` passes the turn to the next one."""
        def held(bank: int) -> int:
            return self._bank_used.get(bank, 0) if kind is None else self._part_used.get((bank, kind), 0)
        banks = sorted({b for b, k in self._parts if (kind is None or k == kind) and self._parts[(b, k)]})
        for bank in sorted(banks, key=lambda b: -held(b)):
            if self._evict_one(bank, KINDS if kind is None else (kind,), protect):
                return
        raise AssertionError("over a cap with only the protected entry left, which fits every cap")

    def _enforce(self, bank: int | None, kind: str | None, key: Hashable = None) -> None:
        protect = (bank, kind, key) if bank is not None and kind is not None else None
        # Only the bank that grew can exceed its own cap; every bank when the cap itself was lowered.
        if self.bank_bytes is not None:
            for b in ([bank] if bank is not None else list(self._bank_used)):
                while self._bank_used.get(b, 0) > self.bank_bytes:
                    if not self._evict_one(b, KINDS, protect):
                        raise AssertionError("a bank over its cap with only the protected entry left")
        for k in ([kind] if kind is not None else list(KINDS)):
            cap = self.kind_bytes.get(k)
            while cap is not None and self._kind_used[k] > cap:
                self._evict_fairly(k, protect)
        while self._used > self.total_bytes:
            self._evict_fairly(None, protect)
