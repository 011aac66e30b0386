"""/readyz stays open but names no bank (issue 26, hole 10c): without the admin key it reports integrity as
counts only; the per-bank detail needs the admin key."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import select

from kvstore.storage.catalog import BlockRow
from tests.server_harness import LiveServer, live_server, maintain, make_key

BANK = "tenant-secret-name"
TEXT = "The harbour ledger is kept in the archive under the third arch."


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, tiny_llm, embedder) -> Iterator[LiveServer]:
    with live_server("sqlite", tmp_path_factory.mktemp("readyz"), tiny_llm, embedder) as server:
        with server.admin() as c:
            assert c.post("/v1/banks", json={"name": BANK}).status_code == 201
            assert c.put(f"/v1/banks/{BANK}/documents/d1", json={"text": TEXT}).status_code == 201
        # Damage one blob; the integrity check finds it, quarantines it and rebuilds it from the text.
        with server.store.session() as s:
            blob_id = s.scalars(select(BlockRow.blob_id)).first()
        assert blob_id
        path = server.settings.data_dir / "blobs" / blob_id[:2] / blob_id[2:4] / blob_id
        damaged = bytearray(path.read_bytes())
        damaged[len(damaged) // 2] ^= 0xFF
        path.write_bytes(bytes(damaged))
        with server.admin() as c:
            report = maintain(c, BANK, rebuild=True, merge=False)
        assert report["verify"]["rebuilt"] == 1
        yield server


def test_readyz_without_a_key_reports_counts_not_bank_names(live: LiveServer) -> None:
    reader = make_key(live, role="read", banks=[BANK])["key"]
    for key in (None, reader, "kvr_not-a-key-at-all"):
        with live.client(key) as c:
            r = c.get("/readyz")
        assert r.status_code == 200, r.text
        assert BANK not in r.text
        body = r.json()
        assert body["status"] == "ready" and "integrity" not in body
        assert body["integrity_summary"] == {"banks": 1, "corrupt_blocks": 1, "rebuilt_blocks": 1,
                                             "index_problems": 0}


def test_readyz_with_the_admin_key_names_the_bank(live: LiveServer) -> None:
    with live.admin() as c:
        body = c.get("/readyz").json()
    assert body["integrity"][BANK] == {"corrupt_blocks": 1, "rebuilt_blocks": 1}
    assert body["integrity_summary"]["banks"] == 1
