"""Every bank's FAISS index: loaded from its snapshot plus the op-log tail, or rebuilt from the catalog.

The index is derived data: the catalog's op log is the truth. A write applies its op here after its catalog
commit; every ``snapshot_every`` ops (and at close) the index is saved with the op seq it holds, so a start
replays only the ops after it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from kvstore.storage.catalog import BankRow, BlockRow, OpLogRow
from kvstore.storage.index import BankIndex

log = logging.getLogger(__name__)

SNAPSHOT_EVERY_OPS = 256


class Watermark(Protocol):
    """A replica's op-log follower (:class:`kvstore.storage.replication.OpLogFollower`): every op up to
    ``through`` is applied here; ``applied`` reports one this process wrote itself."""

    through: int

    def applied(self, seq: int) -> None: ...


Note = Callable[[str, str, Any], None]  # (bank, what, value): damage found, as kvstore.storage.integrity records it


class BankIndexes:
    """The loaded index of each bank (by bank id), its snapshot files under ``directory``, and the op log
    applied to them. ``follower`` is set on a replica (PostgreSQL catalog), None in the embedded default."""

    def __init__(self, sessions: sessionmaker[Session], directory: Path, dim: int, note: Note,
                 follower: Watermark | None = None, snapshot_every: int = SNAPSHOT_EVERY_OPS) -> None:
        self.sessions = sessions
        self.directory = directory
        self.dim = dim  # the embedder's vector size
        self.note = note
        self.follower = follower
        self.snapshot_every = snapshot_every
        self._indexes: dict[int, BankIndex] = {}
        self._lock = threading.Lock()
        self._ops_since_snapshot: dict[int, int] = {}

    def path(self, bank: BankRow) -> Path:
        return self.directory / f"bank-{bank.id}.faiss"

    def load_all(self) -> None:
        """Load every bank's index. A bank whose index cannot be loaded is reported and retried on first use,
        so one damaged bank never keeps the others from serving."""
        with self.sessions() as s:
            for bank in s.scalars(select(BankRow)).all():
                try:
                    self._indexes[bank.id] = self._load(s, bank)
                except Exception as exc:  # noqa: BLE001 - isolate the damage to this bank
                    s.rollback()
                    log.exception("bank %s: index could not be loaded; retrying on first use", bank.name)
                    self.note(bank.name, "index", f"failed to load: {type(exc).__name__}")

    def get(self, bank: BankRow) -> BankIndex:
        """The bank's index, loaded now if it was not (a new bank of another replica, or a failed load)."""
        with self._lock:
            if bank.id not in self._indexes:
                with self.sessions() as s:
                    self._indexes[bank.id] = self._load(s, bank)
            return self._indexes[bank.id]

    def create(self, bank_id: int) -> None:
        """An empty index for a bank just created."""
        with self._lock:
            self._indexes[bank_id] = BankIndex(self.dim)

    def drop(self, bank: BankRow) -> None:
        """Forget a deleted bank's index and delete its snapshot."""
        with self._lock:
            self._indexes.pop(bank.id, None)
        path = self.path(bank)
        path.unlink(missing_ok=True)
        path.with_suffix(".json").unlink(missing_ok=True)

    def _load(self, s: Session, bank: BankRow) -> BankIndex:
        """Snapshot + op-log tail, or a full rebuild from the catalog."""
        path = self.path(bank)
        index = BankIndex.load(path, self.dim)
        if index is not None:
            tail = s.scalars(select(OpLogRow).where(OpLogRow.bank_id == bank.id, OpLogRow.seq > index.seq)
                             .order_by(OpLogRow.seq)).all()
            for op in tail:
                index.remove(np.asarray(op.removed or [], dtype=np.int64))
                self.add_rows(index, s, [int(i) for i in op.added or []])
                index.seq = op.seq
            if tail:
                log.info("bank %s: replayed %d op-log entries onto the index snapshot", bank.name, len(tail))
            return index
        index = BankIndex(self.dim)
        ids = s.scalars(select(BlockRow.id).where(BlockRow.bank_id == bank.id, BlockRow.status == "live")).all()
        self.add_rows(index, s, list(ids))
        index.seq = s.scalar(select(func.max(OpLogRow.seq)).where(OpLogRow.bank_id == bank.id)) or 0
        if path.exists():
            log.warning("bank %s: index snapshot damaged; rebuilt from the catalog (%d blocks)", bank.name,
                        index.ntotal)
            self.note(bank.name, "index", "snapshot damaged; rebuilt from the catalog")
        elif index.seq and self.follower is not None:
            # A replica: normal for a bank another replica created, or one this replica has not snapshotted yet.
            log.info("bank %s: index built from the catalog (%d blocks)", bank.name, index.ntotal)
        elif index.seq:
            # Normal after a crash before the first snapshot; worth reporting if snapshots were deleted.
            log.warning("bank %s: no index snapshot; rebuilt from the catalog (%d blocks)", bank.name, index.ntotal)
            self.note(bank.name, "index", "snapshot missing; rebuilt from the catalog")
        return index

    @staticmethod
    def add_rows(index: BankIndex, s: Session, block_ids: list[int]) -> None:
        """Add the embeddings of those of ``block_ids`` still live in the catalog."""
        if not block_ids:
            return
        rows = s.execute(select(BlockRow.id, BlockRow.embedding).where(
            BlockRow.id.in_(block_ids), BlockRow.status == "live")).all()
        if rows:
            vecs = np.stack([np.frombuffer(r.embedding, dtype="<f4") for r in rows])
            index.add(np.asarray([r.id for r in rows], dtype=np.int64), vecs)

    def snapshot_all(self) -> None:
        """Snapshot every loaded index, so the next start replays nothing."""
        with self.sessions() as s:
            for bank in s.scalars(select(BankRow)):
                if bank.id in self._indexes:
                    self._snapshot(s, bank)

    def _snapshot(self, s: Session, bank: BankRow) -> None:
        index = self._indexes[bank.id]
        with index.lock:
            if self.follower is not None:
                # Other replicas' ops above the follower's watermark may not be applied yet: claim no more.
                seq = self.follower.through
            else:
                seq = max(s.scalar(select(func.max(OpLogRow.seq)).where(OpLogRow.bank_id == bank.id)) or 0,
                          index.seq)
            index.save(self.path(bank), seq)
        self._ops_since_snapshot[bank.id] = 0

    def apply(self, s: Session, bank: BankRow, op: OpLogRow, rows: Sequence[BlockRow]) -> None:
        """Apply this process's committed write (``rows``: the blocks it added) and snapshot now and then."""
        index = self.get(bank)
        with index.lock:
            index.remove(np.asarray(op.removed or [], dtype=np.int64))
            if rows:
                index.add(np.asarray([r.id for r in rows], dtype=np.int64),
                          np.stack([np.frombuffer(r.embedding, dtype="<f4") for r in rows]))
            index.seq = max(index.seq, op.seq)
        if self.follower is not None:
            self.follower.applied(op.seq)
        count = self._ops_since_snapshot.get(bank.id, 0) + 1
        self._ops_since_snapshot[bank.id] = count
        if count >= self.snapshot_every:
            self._snapshot(s, bank)

    def apply_ops(self, s: Session, ops: Sequence[OpLogRow]) -> None:
        """Apply op-log entries (another replica's writes) to the loaded indexes; idempotent, and only blocks still
        live in the catalog are added. A bank not loaded here is skipped: it loads from the catalog when used."""
        for op in ops:
            # Under the lock: a bank loading right now (its catalog read maybe older than this op) is waited for
            # and then updated, never skipped.
            with self._lock:
                index = self._indexes.get(op.bank_id)
            if index is None:
                continue
            with index.lock:
                index.remove(np.asarray(op.removed or [], dtype=np.int64))
                self.add_rows(index, s, [int(i) for i in op.added or []])
