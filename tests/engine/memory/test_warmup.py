"""Blocks are decoded into the hot tier at ingest, within its free room (issue 33: a first touch loaded and
decoded every block before the question's forward)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from sqlalchemy import select

from kvstore.bank import BankStore
from kvstore.codec.format import decode_block
from kvstore.storage.catalog import BlockRow
from kvstore.types import BlockKV

TEXT = ("The Normans were the people who in the 10th and 11th centuries gave their name to Normandy. " * 6
        + "Paris is the capital and most populous city of France. The Seine flows through it. " * 6)
QUESTION = "Who were the Normans?"


def _blob_ids(store: BankStore) -> list[str]:
    with store.sessions() as s:
        return [b for b in s.scalars(select(BlockRow.blob_id).order_by(BlockRow.id)) if b]


def _bank_id(store: BankStore, bank: str) -> int:
    with store.sessions() as s:
        return store.bank_row(s, bank).id


def test_first_query_loads_nothing_and_answers_as_from_the_blob(make_store: Callable[..., BankStore]) -> None:
    store = make_store(block_tokens=32)
    store.create_bank("b")
    store.put_document("b", "d", TEXT)
    blobs, bank = _blob_ids(store), _bank_id(store, "b")
    assert len(blobs) > 1 and all(store.hot.contains(bank, b) for b in blobs)
    for blob_id in blobs:  # what is cached is the codec's decoding, exactly what a later load gives
        hot, stored = store.hot.kv.peek(bank, "blocks", blob_id), decode_block(store.blobs.get(blob_id))
        assert hot is not None and torch.equal(hot.k, stored.k) and torch.equal(hot.v, stored.v)
    first = store.query("b", QUESTION, k=3, max_new_tokens=4)
    assert store.memory.counters.warm_loads == 0 and store.memory.counters.hot_hits == 3

    cold = make_store(block_tokens=32, hot_tier_on_ingest=False)  # same data dir: loads every block from its blob
    assert not any(cold.hot.contains(bank, b) for b in blobs)
    again = cold.query("b", QUESTION, k=3, max_new_tokens=4)
    assert cold.memory.counters.warm_loads == 3
    assert again.answer == first.answer and [h.block_id for h in again.sources] == [h.block_id for h in first.sources]


def test_ingest_uses_only_free_room(make_store: Callable[..., BankStore]) -> None:
    store = make_store(block_tokens=32)
    store.create_bank("b")
    resident = BlockKV(k=torch.zeros(2, 2, 40, 16), v=torch.zeros(2, 2, 40, 16), key="resident")
    store.hot.budget_bytes = resident.nbytes + 1024  # room for the resident block and far less than a new one
    bank = _bank_id(store, "b")
    store.hot.put(bank, "resident", resident)
    store.put_document("b", "d", TEXT)
    assert store.hot.contains(bank, "resident")  # nothing pushed out
    assert store.hot.kv.usage(bank)["blocks"]["entries"] == 1  # nothing added
    assert store.query("b", QUESTION, k=1, max_new_tokens=1).answer is not None
    assert store.memory.counters.warm_loads == 1
