"""Index hits are looked up within their bank (issue 26, hole 10g).

The FAISS index is derived data: a snapshot restored to the wrong bank, or left behind by a deleted bank whose id
a new one reuses, may hold another bank's block ids. The catalog, not the index, decides which bank a block
belongs to, so a bank never serves another bank's text or KV, whatever its index says.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable

from sqlalchemy import select

from kvstore.bank import BankStore
from kvstore.storage.catalog import BankRow

SECRET = "The launch code of the other tenant is 7741, kept in the vault under the Seine."
PUBLIC = "Paris is the capital and most populous city of France."


def _snapshot(store: BankStore, bank: str):
    with store.session() as s:
        bank_id = s.scalar(select(BankRow.id).where(BankRow.name == bank))
    return store.settings.data_dir / "indexes" / f"bank-{bank_id}.faiss"


def test_a_foreign_index_snapshot_never_serves_the_other_banks_blocks(make_store: Callable[..., BankStore]) -> None:
    store = make_store()
    store.create_bank("mine")
    store.put_document("mine", "paris", PUBLIC)
    store.create_bank("theirs")
    store.put_document("theirs", "vault", SECRET)  # written last: its snapshot's sequence covers both banks' ops
    store.close()
    mine, theirs = _snapshot(store, "mine"), _snapshot(store, "theirs")
    for suffix in (".faiss", ".json"):  # bank "mine" now loads the index (and its checksum) of "theirs"
        shutil.copyfile(theirs.with_suffix(suffix), mine.with_suffix(suffix))

    store = make_store()
    hits = store.search("mine", "launch code in the vault", k=5, retrieval="embedding")
    assert all(h.doc_id == "paris" and "7741" not in h.text for h in hits)
    result = store.query("mine", "What is the launch code?", k=5, mode="text", max_new_tokens=2)
    assert all(src.doc_id == "paris" for src in result.sources)
    # The other bank still finds its own document.
    assert [h.doc_id for h in store.search("theirs", "launch code in the vault", k=1)] == ["vault"]
