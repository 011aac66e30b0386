"""Engine-level interleavings the crash test can only hit by luck, forced deterministically."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from kvstore.bank import BankStore
from kvstore.codec.format import decode_block

SHARED = "The harbour ledger is kept in the archive."


def test_a_blob_freed_between_an_ingest_writing_it_and_committing_it_is_rewritten(
        make_store: Callable[..., BankStore], monkeypatch: pytest.MonkeyPatch) -> None:
    """Blobs are content-addressed and written before the catalog transaction, outside the blob lock.
    If the last other reference to the same bytes is deleted in that gap, the ingest must not commit a
    block whose blob file is gone."""
    store = make_store()
    store.create_bank("race")
    store.put_document("race", "first", SHARED)
    real_put = store.blobs.put
    interleaved: list[str] = []

    def put_then_delete_the_other(data: bytes, **kwargs: Any) -> str:
        blob_id = real_put(data, **kwargs)
        if not interleaved:
            interleaved.append(blob_id)
            store.delete_document("race", "first")  # frees the blob this ingest is about to reference
        return blob_id

    monkeypatch.setattr(store.blobs, "put", put_then_delete_the_other)
    store.put_document("race", "second", SHARED)
    assert interleaved
    fingerprint = store.get_bank("race").model_fingerprint
    decode_block(store.blobs.get(interleaved[0]), fingerprint)  # raises CorruptBlock if the file is gone
    assert store.verify("race") == {"checked": 1, "rebuilt": 0}


def test_orphan_collection_during_an_ingest_keeps_the_ingest_blobs(make_store: Callable[..., BankStore],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Orphan collection with no grace period running between an ingest's blob write and its commit."""
    store = make_store()
    store.create_bank("gc")
    store.memory.config.orphan_grace_s = 0.0
    real_put = store.blobs.put
    written: list[str] = []

    def put_then_collect(data: bytes, **kwargs: Any) -> str:
        blob_id = real_put(data, **kwargs)
        if not written:
            written.append(blob_id)
            store.memory.collect_orphans()  # the blob is not referenced yet: collected
        return blob_id

    monkeypatch.setattr(store.blobs, "put", put_then_collect)
    store.put_document("gc", "doc", SHARED)
    decode_block(store.blobs.get(written[0]), store.get_bank("gc").model_fingerprint)
    assert store.verify("gc") == {"checked": 1, "rebuilt": 0}
