"""FAISS index per bank (IDMap2 over inner product on unit vectors), derived from the catalog.

A snapshot on disk records the last op-log sequence it includes and a checksum of its bytes; on
start the tail of the op log is replayed, and a missing or damaged snapshot is rebuilt from the
catalog, which is the source of truth.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path

import faiss
import numpy as np

log = logging.getLogger(__name__)


class BankIndex:
    """Vectors of one bank's live blocks, keyed by block id."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self.seq = 0
        self.lock = threading.RLock()

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def ids(self) -> np.ndarray:
        with self.lock:
            return faiss.vector_to_array(self.index.id_map).astype(np.int64)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """ids: [n] int64; vectors: [n, dim] float32 unit norm. Re-adding an id replaces it."""
        if len(ids) == 0:
            return
        with self.lock:
            self.remove(ids)
            self.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32),
                                    np.ascontiguousarray(ids, dtype=np.int64))

    def remove(self, ids: np.ndarray) -> None:
        if len(ids) == 0:
            return
        with self.lock:
            self.index.remove_ids(faiss.IDSelectorBatch(np.ascontiguousarray(ids, dtype=np.int64)))

    def search(self, query: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k block ids and scores for ``query: [dim]``; ``allowed`` restricts ids before top-k."""
        with self.lock:
            if self.ntotal == 0 or k <= 0:
                return np.empty(0, np.int64), np.empty(0, np.float32)
            params = None
            if allowed is not None:
                if len(allowed) == 0:
                    return np.empty(0, np.int64), np.empty(0, np.float32)
                params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(np.ascontiguousarray(allowed, np.int64)))
            scores, ids = self.index.search(query.reshape(1, -1).astype(np.float32), min(k, self.ntotal),
                                            params=params)
        keep = ids[0] >= 0
        return ids[0][keep], scores[0][keep]

    # -- snapshots --------------------------------------------------------------------------------

    def save(self, path: Path, seq: int) -> None:
        """Write the index and its sidecar atomically (temp file, fsync, rename)."""
        with self.lock:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            faiss.write_index(self.index, str(tmp))
            data = tmp.read_bytes()
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
            meta = {"seq": seq, "count": self.ntotal, "sha256": hashlib.sha256(data).hexdigest(), "dim": self.dim}
            side = path.with_suffix(".json.tmp")
            side.write_text(json.dumps(meta))
            os.replace(side, path.with_suffix(".json"))
            self.seq = seq

    @classmethod
    def load(cls, path: Path, dim: int) -> BankIndex | None:
        """The snapshot at ``path``, or None if it is missing, damaged or of another dimension."""
        side = path.with_suffix(".json")
        try:
            meta = json.loads(side.read_text())
            data = path.read_bytes()
        except (OSError, ValueError):
            return None
        if hashlib.sha256(data).hexdigest() != meta.get("sha256") or meta.get("dim") != dim:
            log.warning("index snapshot %s is damaged or stale; rebuilding from the catalog", path)
            return None
        try:
            index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        except RuntimeError:
            return None
        out = cls(dim)
        out.index = faiss.IndexIDMap2.cast(index) if not isinstance(index, faiss.IndexIDMap2) else index
        out.seq = int(meta["seq"])
        return out
