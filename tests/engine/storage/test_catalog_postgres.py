"""The engine on a real PostgreSQL catalog: the same write/read/restart/delete path as on SQLite."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from kvstore.bank import BankStore
from kvstore.errors import Conflict, VersionMismatch
from kvstore.types import SearchFilter

pytestmark = pytest.mark.postgres


def test_bank_lifecycle_on_postgres(make_store: Callable[..., BankStore], postgres_url: str) -> None:
    store = make_store(database_url=postgres_url)
    store.create_bank("pg")
    with pytest.raises(Conflict):
        store.create_bank("pg")
    store.put_document("pg", "normans", "The Normans gave their name to Normandy.", tags=["history"], agent="a",
                       metadata={"n": 1})
    store.put_document("pg", "paris", "Paris is the capital of France.", agent="b")
    assert store.put_document("pg", "paris", "Paris is the capital of France.", agent="b").changed is False
    with pytest.raises(VersionMismatch):
        store.put_document("pg", "paris", "Lyon.", if_match=7)
    hits = store.search("pg", "Normandy", k=2, filter=SearchFilter(tags=["history"]))
    assert [h.doc_id for h in hits] == ["normans"] and hits[0].metadata == {"n": 1}
    answer = store.query("pg", "Where is Normandy?", k=1, max_new_tokens=4).answer
    stats = store.stats("pg")
    assert (stats.documents, stats.blocks) == (2, 2) and isinstance(stats.compression_ratio, float)
    store.close()
    reopened = make_store(database_url=postgres_url)
    assert reopened.query("pg", "Where is Normandy?", k=1, max_new_tokens=4).answer == answer
    reopened.delete_document("pg", "normans")
    assert reopened.stats("pg").documents == 1
    reopened.delete_bank("pg")
    assert reopened.list_banks() == []
