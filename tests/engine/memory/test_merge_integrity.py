"""Blocks share stored KV only when their tokens are identical (issue 26, hole 4).

Near-duplicate merging (cosine >= 0.95 and bigram overlap >= 0.7) pointed a block at another block's KV and
token ids: two documents differing in one fact then answered with the same fact. These tests check that
maintenance never changes what a document answers, that exact duplicates still share one blob, and that a bank
the old code merged is repaired by the next maintenance after migration 0010 flagged it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sqlalchemy import select, update

from kvstore.bank import BankStore
from kvstore.storage.catalog import BankRow, BlockRow, DocumentRow
from kvstore.types import SearchFilter

# Two documents that differ in one fact, close enough for the old thresholds (same words, one number).
FACT_A = ("The Normans were a people who gave their name to Normandy, a region in northern France; their duke "
          "Rollo signed the treaty with the Frankish king in the year 911.")
FACT_B = ("The Normans were a people who gave their name to Normandy, a region in northern France; their duke "
          "Rollo signed the treaty with the Frankish king in the year 933.")
QUESTION = "In which year did Rollo sign the treaty?"
MIGRATIONS = Path(__file__).resolve().parents[3] / "migrations"


def _answers(store: BankStore, bank: str, doc: str) -> tuple[str, str]:
    """kv and text answers of a query that can only retrieve ``doc``."""
    flt = SearchFilter(tags=[doc])
    kv = store.query(bank, QUESTION, k=1, mode="kv", max_new_tokens=8, filter=flt)
    text = store.query(bank, QUESTION, k=1, mode="text", max_new_tokens=8, filter=flt)
    assert [h.doc_id for h in kv.sources] == [doc] == [h.doc_id for h in text.sources]
    return kv.answer, text.answer


def _own_tokens(store: BankStore, bank: str) -> dict[str, bool]:
    """Per document: do its blocks' stored token ids (what kv, text and cold re-encodes serve) encode its text?"""
    with store.session() as s:
        rows = s.execute(select(DocumentRow.doc_id, BlockRow.text, BlockRow.token_ids).join(
            BlockRow, BlockRow.document_id == DocumentRow.id).join(BankRow, BankRow.id == DocumentRow.bank_id).where(
            BankRow.name == bank)).all()
    own: dict[str, bool] = {}
    for doc_id, text, token_ids in rows:
        ids = store.runner.tokenize(text)
        own[doc_id] = own.get(doc_id, True) and bytes(token_ids) == _ids(ids)
    return own


def _ids(ids: list[int]) -> bytes:
    import numpy as np

    return np.asarray(ids, dtype="<i4").tobytes()


def _two_facts(store: BankStore) -> tuple[str, dict[str, tuple[str, str]]]:
    store.create_bank("kb")
    store.put_document("kb", "a", FACT_A, tags=["a"])
    store.put_document("kb", "b", FACT_B, tags=["b"])
    return "kb", {doc: _answers(store, "kb", doc) for doc in ("a", "b")}


def test_near_duplicates_differing_in_one_fact_keep_their_own_answers(make_store: Callable[..., BankStore]) -> None:
    store = make_store()
    bank, before = _two_facts(store)
    report = store.maintain(bank)
    assert report["merged"] == 0 and report["repaired_merges"] == 0
    assert _own_tokens(store, bank) == {"a": True, "b": True}
    assert {doc: _answers(store, bank, doc) for doc in ("a", "b")} == before
    with store.session() as s:
        assert s.scalar(select(BlockRow).where(BlockRow.merged_into.is_not(None))) is None
    # Deleting one leaves the other exactly as it was, its KV included.
    store.delete_document(bank, "a")
    assert _answers(store, bank, "b") == before["b"]
    assert store.verify(bank) == {"checked": 1, "rebuilt": 0}


def test_blocks_with_identical_tokens_share_one_blob(make_store: Callable[..., BankStore]) -> None:
    """Dedup stays: the same text stored under another codec is pointed at the older blob by maintenance."""
    store = make_store()
    store.create_bank("kb", codec="int8")
    store.put_document("kb", "a", FACT_A, tags=["a"])
    store.update_bank("kb", codec="fp16")
    store.put_document("kb", "b", FACT_A, tags=["b"])
    assert len(set(store.blobs.ids())) == 2
    report = store.maintain("kb")
    assert report["merged"] == 1 and store.stats("kb").merges == 1
    assert len(set(store.blobs.ids())) == 1
    with store.session() as s:
        dup = s.scalar(select(BlockRow).where(BlockRow.merged_into.is_not(None)))
        assert dup is not None and dup.codec == "int8"
    answers = _answers(store, "kb", "a")
    assert _answers(store, "kb", "b") == answers
    store.delete_document("kb", "a")  # the shared blob stays: "b" references it
    assert _answers(store, "kb", "b") == answers and store.verify("kb") == {"checked": 1, "rebuilt": 0}
    assert store.maintain("kb")["merged"] == 0


def _merge_as_the_old_code_did(store: BankStore, bank: str, keep: str, dup: str) -> None:
    """The catalog state the old ``MemoryManager._merge`` wrote: the duplicate serves the canonical's blob, token
    ids and key summary, keeps its own text, and its own blob is deleted."""
    with store.session() as s:
        def block(doc: str) -> BlockRow:
            return s.scalars(select(BlockRow).join(DocumentRow, DocumentRow.id == BlockRow.document_id).where(
                DocumentRow.doc_id == doc)).one()

        canon, alias = block(keep), block(dup)
        freed = alias.blob_id
        alias.blob_id, alias.stored_bytes, alias.merged_into = canon.blob_id, canon.stored_bytes, canon.id
        alias.token_ids, alias.token_count, alias.raw_bytes = canon.token_ids, canon.token_count, canon.raw_bytes
        alias.kv_summary = canon.kv_summary
        s.execute(update(BankRow).where(BankRow.name == bank).values(merges=BankRow.merges + 1))
        s.commit()
    assert freed
    store.blobs.delete(freed)


def _downgrade_to_before_the_repair(store: BankStore) -> None:
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", store.settings.resolved_database_url())
    command.downgrade(cfg, "0008")


def test_a_bank_the_old_merge_touched_is_repaired_by_the_next_maintenance(
        make_store: Callable[..., BankStore]) -> None:
    store = make_store()
    bank, before = _two_facts(store)
    _merge_as_the_old_code_did(store, bank, keep="a", dup="b")
    assert _own_tokens(store, bank) == {"a": True, "b": False}
    store.close()
    _downgrade_to_before_the_repair(store)  # the catalog as the old code left it; the restart migrates it

    store = make_store()
    report = store.maintain(bank)
    assert report["repaired_merges"] == 1 and report["merged"] == 0
    assert _own_tokens(store, bank) == {"a": True, "b": True}
    assert {doc: _answers(store, bank, doc) for doc in ("a", "b")} == before
    with store.session() as s:
        assert s.scalar(select(BankRow.merge_repair).where(BankRow.name == bank)) is False
        assert s.scalar(select(BlockRow).where(BlockRow.merged_into.is_not(None))) is None
    assert store.maintain(bank)["repaired_merges"] == 0  # the flag is cleared: no second scan
    store.delete_document(bank, "a")  # nothing of "a" is left inside "b"
    assert _answers(store, bank, "b") == before["b"]
    assert store.verify(bank) == {"checked": 1, "rebuilt": 0}
