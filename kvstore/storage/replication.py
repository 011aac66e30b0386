"""Several kvrag processes on one PostgreSQL catalog and one object store, acting as one service (issue 28).

What is shared lives in the catalog; each replica keeps derived copies (its FAISS indexes, hot tier, blob cache)
and this module keeps them honest:

- :class:`OpLogFollower` applies the other replicas' writes, updates and deletes (the catalog's ``op_log``) to this
  replica's indexes within ``KVRAG_REPLICA_STALENESS_S``: an insert into ``op_log`` notifies channel
  ``kvrag_oplog`` (a trigger, migration 0012), delivered when its transaction commits; a poll every half bound
  is the fallback when a notification is lost (a dropped LISTEN connection).
- :class:`ReplicaRegistry` records each running replica with its model fingerprint and blob store, and refuses a
  replica whose model or blob store differs from the live ones (their KV would not mix).
- :func:`claim_version` makes document versions (and so If-Match) a conditional UPDATE in the database.
- :func:`blob_gc_lock` orders orphan-blob deletion against writers' transactions across processes.

Op-log sequence numbers come from one PostgreSQL identity, taken at insert but visible at commit: a replica can
see seq 12 before seq 11 commits. The follower therefore keeps a watermark ``through`` (every seq up to it is
applied or known absent) and re-reads what lies above it; a hole (a seq not seen) is waited for up to
``gap_s``, after which it is taken as a rolled-back insert. Applying an op is idempotent and re-checks the
catalog (only live blocks are added), so reading an op twice, or after a later op, changes nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from kvstore.errors import Unavailable
from kvstore.storage.catalog import DocumentRow, OpLogRow, ReplicaRow, utcnow

log = logging.getLogger(__name__)

CHANNEL = "kvrag_oplog"
# pg_advisory_xact_lock keys ("kvrag" + n): orphan-blob collection against blob-writing transactions, and
# replica registration (two replicas starting at once must see each other).
BLOB_GC_LOCK_KEY = 0x6B7672616702
REGISTER_LOCK_KEY = 0x6B7672616703
_BATCH = 5000  # op-log rows read per catch-up query


class ReplicaRefused(Unavailable):
    """This process cannot join the replicas on its catalog (another model, another blob store)."""


def is_postgres(sessions: sessionmaker[Session]) -> bool:
    return sessions.kw["bind"].dialect.name == "postgresql"


# -- versions and blob collection, enforced by the database ----------------------------------------------------


def claim_version(s: Session, doc: DocumentRow, seen: int) -> bool:
    """Move ``doc`` from version ``seen`` to ``seen + 1`` with ``UPDATE ... WHERE version = seen``; False when
    another writer (on any replica) changed it first. The row stays locked until ``s`` commits, so two conditional
    writes of one version never both succeed: PostgreSQL re-checks the condition of the one that waited."""
    result = s.execute(update(DocumentRow).where(DocumentRow.id == doc.id, DocumentRow.version == seen)
                       .values(version=seen + 1).execution_options(synchronize_session=False))
    if int(result.rowcount or 0) != 1:  # type: ignore[attr-defined]
        return False
    # The ORM object still holds the old version: set it so a later flush writes the same value, not the old one.
    s.expire(doc, ["version"])
    return True


def blob_gc_lock(s: Session, *, exclusive: bool) -> None:
    """Hold the blob-collection lock until ``s``'s transaction ends (PostgreSQL; no-op elsewhere, where one
    process holds the data dir). Writers take it shared before they (re)write the blobs their transaction will
    reference; collection takes it exclusive around "unreferenced?" and the delete. So a blob is never deleted
    between a writer's put and its commit: the writer's put comes after the delete, or its commit before the
    check."""
    if s.get_bind().dialect.name != "postgresql":
        return
    fn = "pg_advisory_xact_lock" if exclusive else "pg_advisory_xact_lock_shared"
    s.execute(select(getattr(func, fn)(BLOB_GC_LOCK_KEY)))


# -- the registry -------------------------------------------------------------------------------------------------


@dataclass
class ReplicaIdentity:
    fingerprint: str
    model_name: str
    blob_url: str
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)


def _dead_here(row: ReplicaRow, me: ReplicaIdentity) -> bool:
    """A row left by a process of this host that no longer runs (killed): not a live replica."""
    if row.host != me.host:
        return False
    if row.pid == me.pid:
        return True  # this process (an earlier store in it, or a pid reused after a kill)
    try:
        os.kill(row.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class ReplicaRegistry:
    """The ``replicas`` table: register at start (refusing a mismatch), heartbeat, unregister at close."""

    def __init__(self, sessions: sessionmaker[Session], me: ReplicaIdentity, heartbeat_s: float) -> None:
        self.sessions, self.me, self.heartbeat_s = sessions, me, heartbeat_s

    def live_window(self) -> timedelta:
        return timedelta(seconds=3 * self.heartbeat_s)

    def register(self) -> None:
        """Join, or raise :class:`ReplicaRefused` naming the live replica this one cannot serve beside."""
        me = self.me
        with self.sessions() as s:
            s.execute(select(func.pg_advisory_xact_lock(REGISTER_LOCK_KEY)))
            now = utcnow()
            s.execute(delete(ReplicaRow).where(ReplicaRow.heartbeat_at < now - timedelta(days=1)))
            live = [r for r in s.scalars(select(ReplicaRow).where(ReplicaRow.heartbeat_at > now - self.live_window()))
                    if not _dead_here(r, me)]
            for other in live:
                if other.model_fingerprint != me.fingerprint:
                    raise ReplicaRefused(
                        f"refusing to start: replica {other.host}:{other.pid} serves this catalog with model "
                        f"{other.model_name!r} (fingerprint {other.model_fingerprint[:12]}); this one loaded "
                        f"{me.model_name!r} ({me.fingerprint[:12]}): every replica on one catalog loads the same model")
                if other.blob_url != me.blob_url:
                    raise ReplicaRefused(
                        f"refusing to start: replica {other.host}:{other.pid} stores blocks in "
                        f"{other.blob_url or 'local files'}, this one in {me.blob_url or 'local files'}: replicas "
                        "share one blob store (KVRAG_BLOB_URL)")
            if live and not me.blob_url:
                log.warning("%d other replica(s) share this catalog but blocks are local files: each replica reads "
                            "only its own; set KVRAG_BLOB_URL=s3://... on every replica", len(live))
            s.add(ReplicaRow(id=me.id, host=me.host, pid=me.pid, model_fingerprint=me.fingerprint,
                             model_name=me.model_name, blob_url=me.blob_url, started_at=now, heartbeat_at=now))
            s.commit()

    def heartbeat(self) -> None:
        with self.sessions() as s:
            s.execute(update(ReplicaRow).where(ReplicaRow.id == self.me.id).values(heartbeat_at=utcnow()))
            s.commit()

    def unregister(self) -> None:
        with self.sessions() as s:
            s.execute(delete(ReplicaRow).where(ReplicaRow.id == self.me.id))
            s.commit()


# -- following the op log -----------------------------------------------------------------------------------------


ApplyOps = Callable[[Session, Sequence[OpLogRow]], None]


class OpLogFollower:
    """Applies ``op_log`` rows this replica has not applied, in seq order, through ``apply``."""

    def __init__(self, sessions: sessionmaker[Session], apply: ApplyOps, gap_s: float) -> None:
        # A weak reference to the store's method: a store dropped without close() ends its thread (see _run).
        self._apply = weakref.WeakMethod(apply) if hasattr(apply, "__self__") else (lambda: apply)
        self.sessions, self.gap_s = sessions, gap_s
        self._seen: set[int] = set()  # applied seqs above ``through``
        self._holes: dict[int, float] = {}  # first missing seq of a hole -> when it was first noticed
        self._lock = threading.Lock()
        self.last_caught_up = time.monotonic()
        self.ops_applied = 0  # other replicas' ops applied here (for /metrics)
        with sessions() as s:
            # Everything committed was loaded with the indexes; only a recent seq may still have been in flight
            # then, so the watermark starts below the ops of the last gap_s (re-reading them changes nothing).
            old = utcnow() - timedelta(seconds=gap_s)
            self.through: int = int(s.scalar(select(func.max(OpLogRow.seq)).where(OpLogRow.created_at < old)) or 0)

    def alive(self) -> bool:
        """Whether the store this follower updates still exists (one dropped without close() ends the thread)."""
        return self._apply() is not None

    def applied(self, seq: int) -> None:
        """This replica applied ``seq`` itself (its own write): no need to read it back."""
        with self._lock:
            if seq > self.through:
                self._seen.add(seq)

    def catch_up(self) -> int:
        """Apply what is new; returns how many ops were applied."""
        apply = self._apply()
        if apply is None:
            raise ReferenceError("the store is gone")
        with self._lock:
            with self.sessions() as s:
                rows = s.scalars(select(OpLogRow).where(OpLogRow.seq > self.through).order_by(OpLogRow.seq)
                                 .limit(_BATCH)).all()
                fresh = [r for r in rows if r.seq not in self._seen]
                if fresh:
                    apply(s, fresh)
            self._seen.update(r.seq for r in fresh)
            self.ops_applied += len(fresh)
            self._advance(time.monotonic())
            self.last_caught_up = time.monotonic()
            return len(fresh)

    def _advance(self, now: float) -> None:
        """Move ``through`` over applied seqs and over holes older than ``gap_s``."""
        seen = sorted(self._seen)
        prev = self.through
        for seq in seen:  # note every hole between what is applied (a hole is known by its first seq)
            if seq > prev + 1:
                self._holes.setdefault(prev + 1, now)
            prev = seq
        for seq in seen:
            start = self.through + 1
            if seq == start:
                self.through = seq
                self._seen.discard(seq)
                continue
            noticed = self._holes.get(start)
            if noticed is None or now - noticed < self.gap_s:
                break
            log.info("op log seqs %d..%d never appeared in %.0f s: taken as rolled back", start, seq - 1, self.gap_s)
            del self._holes[start]
            self.through = seq
            self._seen.discard(seq)
        self._holes = {k: v for k, v in self._holes.items() if k > self.through}


def listen_dsn(url: str) -> str:
    """A libpq connection string for the catalog's SQLAlchemy URL (``postgresql+psycopg://...``)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


class Replication:
    """The background thread of a replica: LISTEN for op-log changes (poll as a fallback), apply them, heartbeat."""

    def __init__(self, url: str, follower: OpLogFollower, registry: ReplicaRegistry, staleness_s: float) -> None:
        self.url, self.follower, self.registry = url, follower, registry
        self.poll_s = max(0.01, staleness_s / 2)  # a lost notification is picked up within half the bound
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvrag-replication", daemon=True)
        self._conn: Any = None
        self._listen_failing = False

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _listen(self) -> Any:
        import psycopg

        conn = psycopg.connect(listen_dsn(self.url), autocommit=True, connect_timeout=5)
        conn.execute(f"LISTEN {CHANNEL}")
        return conn

    def _wait(self) -> None:
        """Until a notification or ``poll_s``; without a LISTEN connection (lost, or not yet back), just sleep."""
        if self._conn is None:
            try:
                self._conn = self._listen()
            except Exception as exc:  # noqa: BLE001 - polling keeps the bound meanwhile
                if not self._listen_failing:  # one line per outage, not one per poll
                    log.warning("replication: LISTEN %s failed (%s); polling every %.2f s", CHANNEL, exc, self.poll_s)
                self._listen_failing = True
                self._stop.wait(self.poll_s)
                return
            self._listen_failing = False
        try:
            for _ in self._conn.notifies(timeout=self.poll_s, stop_after=1):
                pass
        except Exception as exc:  # noqa: BLE001 - a dropped connection: reconnect on the next turn
            log.warning("replication: LISTEN connection lost (%s); reconnecting", exc)
            self._close_conn()

    def _close_conn(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:  # noqa: BLE001, S110 - closing a broken connection
                pass
            self._conn = None

    def _run(self) -> None:
        beat = time.monotonic()
        failing = False
        while not self._stop.is_set() and self.follower.alive():
            self._wait()
            if self._stop.is_set():
                break
            try:
                self.follower.catch_up()
                if time.monotonic() - beat >= self.registry.heartbeat_s:
                    self.registry.heartbeat()
                    beat = time.monotonic()
                if failing:
                    log.info("replication: caught up with the op log again")
                failing = False
            except ReferenceError:
                break  # the store was dropped without close(): nothing left to keep up to date
            except Exception as exc:  # noqa: BLE001 - the catalog is away for a moment: retry next turn
                if not failing:  # one line per outage, not one per poll
                    log.warning("replication: catching up with the op log failed (%s); retrying", exc)
                failing = True
                self._stop.wait(self.poll_s)
        self._close_conn()




def open_replication(sessions: sessionmaker[Session], settings: Any, llm: Any, apply: ApplyOps) -> Replication | None:
    """On a PostgreSQL catalog: register this replica (:class:`ReplicaRefused` on a mismatch) and build its
    follower, not yet started. None on SQLite, the one-process embedded default."""
    if not is_postgres(sessions):
        return None
    me = ReplicaIdentity(fingerprint=llm.fingerprint, model_name=llm.name, blob_url=settings.blob_url or "")
    registry = ReplicaRegistry(sessions, me, settings.replica_heartbeat_s)
    registry.register()
    follower = OpLogFollower(sessions, apply, settings.replica_gap_s)
    return Replication(settings.resolved_database_url(), follower, registry, settings.replica_staleness_s)


__all__ = ["BLOB_GC_LOCK_KEY", "CHANNEL", "OpLogFollower", "ReplicaIdentity", "ReplicaRefused", "ReplicaRegistry",
           "Replication", "blob_gc_lock", "claim_version", "is_postgres", "listen_dsn", "open_replication"]
