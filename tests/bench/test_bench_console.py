"""bench/console.py end to end on a small bank: rows copied into the catalog render like ingested ones."""

from __future__ import annotations

from pathlib import Path

from bench.console import ADMIN, BANK, activity, ingest, pages, time_renders
from kvstore.model.loader import Embedder, LoadedModel
from tests.server_harness import live_server


def test_console_bench_builds_its_bank_and_times_every_page(tmp_path: Path, tiny_llm: LoadedModel,
                                                            embedder: Embedder) -> None:
    with live_server("sqlite", tmp_path, tiny_llm, embedder, admin_key=ADMIN) as live:
        setup = ingest(live.store, 30, 4)
        assert setup["real_ingest_docs"] == 4 and setup["catalog_copied_docs"] == 26
        stats = live.store.stats(BANK)
        assert stats.documents == 30 and stats.blocks == 30
        assert stats.tiers["cold"]["blocks"] == len([i for i in range(4, 30) if i % 3 == 0])
        activity(live.store, live.url, queries=2)
        assert {e.mode for e in live.store.recent_queries(BANK)} == {"kv", "text"}
        urls = pages(live.store, 30)
        renders = time_renders(live.url, urls, loads=2)
    assert set(renders) == set(urls) and len(urls) == 12
    assert all(r["render_p50_ms"] > 0 and r["render_p90_ms"] >= r["render_p50_ms"] and r["bytes"] > 500
               for r in renders.values())
