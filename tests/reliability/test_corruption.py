"""Corruption on disk, through the HTTP server: flipped bytes, truncation, a missing blob, a blob that
is really a pickle, a truncated or deleted FAISS snapshot, an unrepairable blob path.

Damage is detected by checksum, reported (``/readyz`` ``integrity``, bank stats, the log), the block
is quarantined and rebuilt from the stored text; the server starts, and the other bank serves
normally, whatever one bank's state.
"""

from __future__ import annotations

import pickle
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from kvstore.codec.format import decode_block
from kvstore.storage.catalog import BankRow, BlockRow, make_engine
from tests.reliability.procs import ForkServer, ServerLife

HURT = [f"The harbour ledger entry {i} records a cargo of {w} from the north." for i, w in
        enumerate(("salt", "amber", "timber", "wool"))]
FINE = [f"Paris note {i}: the Seine flows past the {w} quarter." for i, w in
        enumerate(("old", "river", "market", "eastern"))]


class Detonator:
    """A pickle that, if ever unpickled, leaves a marker file behind."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (Path.touch, (str(self.marker),))  # type: ignore[return-value]


def _blob_path(data_dir: Path, blob_id: str) -> Path:
    return data_dir / "blobs" / blob_id[:2] / blob_id[2:4] / blob_id


def _blobs_of(data_dir: Path, bank: str) -> tuple[int, list[str]]:
    """The bank's id and its blocks' blob ids, in block order (read while no server runs)."""
    engine = make_engine(f"sqlite:///{(data_dir / 'catalog.sqlite3').resolve()}")
    try:
        with engine.connect() as conn:
            bank_id = conn.scalar(select(BankRow.id).where(BankRow.name == bank))
            blobs = list(conn.scalars(select(BlockRow.blob_id).where(BlockRow.bank_id == bank_id)
                                      .order_by(BlockRow.id)))
    finally:
        engine.dispose()
    return int(bank_id), blobs


@pytest.fixture
def populated(fork_server: ForkServer, tmp_path: Path) -> Iterator[Path]:
    """Two banks of four one-block documents, shut down cleanly (index snapshots written)."""
    data_dir = tmp_path / "data"
    life = fork_server.start(data_dir)
    with life.client() as c:
        for bank, texts in (("hurt", HURT), ("fine", FINE)):
            assert c.post("/v1/banks", json={"name": bank}).status_code == 201
            for i, text in enumerate(texts):
                assert c.put(f"/v1/banks/{bank}/documents/d{i}", json={"text": text}).status_code == 201
    _stop(life)
    yield data_dir


def _stop(life: ServerLife) -> None:
    life.signal(signal.SIGTERM)
    life.wait_dead()


def _serves_normally(life: ServerLife, bank: str, texts: list[str]) -> None:
    with life.client() as c:
        stats = c.get(f"/v1/banks/{bank}").json()
        assert stats["documents"] == len(texts) and stats["index_entries"] == stats["blocks"] == len(texts)
        assert stats["quarantined_blocks"] == 0
        hits = c.post(f"/v1/banks/{bank}/search", json={"query": texts[1], "k": 1}).json()["hits"]
        assert hits[0]["doc_id"] == "d1"
        r = c.post(f"/v1/banks/{bank}/query", json={"question": "What is recorded?", "k": len(texts),
                                                    "max_new_tokens": 1})
        assert r.status_code == 200, r.text


def test_damaged_blobs_and_snapshots_are_detected_reported_and_rebuilt(fork_server: ForkServer,
                                                                       populated: Path, tmp_path: Path) -> None:
    data_dir = populated
    hurt_id, hurt = _blobs_of(data_dir, "hurt")
    fine_id, _ = _blobs_of(data_dir, "fine")
    marker = tmp_path / "unpickled"
    flipped = bytearray(_blob_path(data_dir, hurt[0]).read_bytes())
    flipped[len(flipped) // 2] ^= 0xFF
    _blob_path(data_dir, hurt[0]).write_bytes(bytes(flipped))
    truncated = _blob_path(data_dir, hurt[1])
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    _blob_path(data_dir, hurt[2]).unlink()
    _blob_path(data_dir, hurt[3]).write_bytes(pickle.dumps(Detonator(marker)))
    snapshot = data_dir / "indexes" / f"bank-{hurt_id}.faiss"
    snapshot.write_bytes(snapshot.read_bytes()[:100])
    (data_dir / "indexes" / f"bank-{fine_id}.faiss").unlink()

    life = fork_server.start(data_dir)
    try:
        with life.client() as c:  # per-bank detail needs the admin key (names no bank without it)
            integrity = c.get("/readyz").json()["integrity"]
        assert integrity["hurt"]["index"].startswith("snapshot damaged")
        assert integrity["fine"]["index"].startswith("snapshot missing")
        _serves_normally(life, "fine", FINE)
        with life.client() as c:
            stats = c.get("/v1/banks/hurt").json()
            assert stats["index_entries"] == stats["blocks"] == 4  # rebuilt from the catalog
            r = c.post("/v1/banks/hurt/query", json={"question": "Which cargo?", "k": 4, "max_new_tokens": 1})
            assert r.status_code == 200, r.text
            assert c.get("/v1/banks/hurt").json()["quarantined_blocks"] == 0
            integrity = c.get("/readyz").json()["integrity"]
        assert integrity["hurt"]["corrupt_blocks"] == 4 and integrity["hurt"]["rebuilt_blocks"] == 4
        assert "corrupt_blocks" not in integrity["fine"]
        _serves_normally(life, "hurt", HURT)
    finally:
        _stop(life)
    log = life.log_text()
    for reason in ("block checksum mismatch", "is missing", "bad magic"):
        assert reason in log, reason
    assert log.count("quarantined, rebuilding from the stored text") == 4
    assert not marker.exists(), "a blob was unpickled"
    fingerprint = fork_server.fingerprint
    for blob_id in _blobs_of(data_dir, "hurt")[1]:
        decode_block(_blob_path(data_dir, blob_id).read_bytes(), fingerprint)


def test_an_unrepairable_block_is_quarantined_and_refused_while_other_banks_serve(
        fork_server: ForkServer, populated: Path) -> None:
    data_dir = populated
    _, hurt = _blobs_of(data_dir, "hurt")
    # The blob's directory becomes a file: the blob can be neither read nor rewritten.
    parent = _blob_path(data_dir, hurt[0]).parent
    shutil.rmtree(parent)
    parent.write_bytes(b"not a directory")
    life = fork_server.start(data_dir)
    try:
        with life.client() as c:
            r = c.post("/v1/banks/hurt/query", json={"question": "Which cargo?", "k": 4, "max_new_tokens": 1})
            assert r.status_code == 500 and r.json()["code"] == "corrupt_block", r.text
            assert c.get("/v1/banks/hurt").json()["quarantined_blocks"] == 1
            assert c.get("/readyz").json()["integrity"]["hurt"]["corrupt_blocks"] == 1
            hits = c.post("/v1/banks/hurt/search", json={"query": HURT[2], "k": 1}).json()["hits"]
            assert hits[0]["doc_id"] == "d2"  # the bank's healthy blocks are still found
        _serves_normally(life, "fine", FINE)
    finally:
        _stop(life)
