"""Issue 26, hole 5, through a real server: a key scoped to its own bank cannot tell, from anything it reads,
whether another bank holds or recently used a text it guesses."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.server_harness import LiveServer, live_server, make_key

SECRET = "The vault code of the Acme account is 4417; only the finance team may read it."
WRONG = "The vault code of the Acme account is 4418; only the finance team may read it."
QUESTION = "What is the vault code of the Acme account?"


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, tiny_llm, embedder) -> Iterator[LiveServer]:
    # Warm-at-ingest off: a guess's block must start cold, so a hot tier shared with the victim would show
    # (tests/engine/memory/test_tenancy.py covers warm-at-ingest's own independence from other banks).
    with live_server("sqlite", tmp_path_factory.mktemp("tenancy"), tiny_llm, embedder,
                     hot_tier_on_ingest=False) as server:
        yield server


def _memory_view(live: LiveServer, key: str, bank: str) -> dict[str, Any]:
    with live.client(key) as c:
        r = c.get(f"/v1/banks/{bank}")
    assert r.status_code == 200, r.text
    body = r.json()
    # Stored (compressed) bytes depend on the guess's own content; everything about memory must not.
    body["tiers"]["warm"].pop("bytes")
    return {"tiers": body["tiers"], "memory": body.get("memory")}


def test_a_guess_at_another_banks_text_reads_the_same_as_a_wrong_guess(live: LiveServer) -> None:
    with live.admin() as c:
        for bank in ("victim", "right", "wrong"):
            assert c.post("/v1/banks", json={"name": bank}).status_code == 201
    victim = make_key(live, banks=["victim"], name="victim")["key"]
    with live.client(victim) as c:
        assert c.put("/v1/banks/victim/documents/d", json={"text": SECRET}).status_code in (200, 201)
        for _ in range(2):
            assert c.post("/v1/banks/victim/query", json={"question": QUESTION, "max_new_tokens": 2}).status_code == 200
    assert _memory_view(live, victim, "victim")["tiers"]["hot"]["blocks"] == 1

    # The attacker stores its guesses in banks of its own and reads only its own banks' stats.
    attacker = make_key(live, banks=["right", "wrong"], name="attacker")["key"]
    views = {}
    with live.client(attacker) as c:
        for bank, guess in (("right", SECRET), ("wrong", WRONG)):
            assert c.put(f"/v1/banks/{bank}/documents/d", json={"text": guess}).status_code in (200, 201)
            before = _memory_view(live, attacker, bank)
            r = c.post(f"/v1/banks/{bank}/query", json={"question": QUESTION, "max_new_tokens": 2})
            assert r.status_code == 200
            views[bank] = (before, _memory_view(live, attacker, bank))
    assert views["right"] == views["wrong"]
    assert views["right"][0]["tiers"]["hot"] == {"blocks": 0, "bytes": 0}  # no hot block before its own query


def test_metrics_show_kv_memory_per_kind_and_its_budget(live: LiveServer) -> None:
    with live.admin() as c:
        assert c.post("/v1/banks", json={"name": "metered"}).status_code == 201
        assert c.put("/v1/banks/metered/documents/d", json={"text": SECRET}).status_code in (200, 201)
        assert c.post("/v1/banks/metered/query", json={"question": QUESTION, "max_new_tokens": 2}).status_code == 200
        text = c.get("/metrics").text
    samples = {(s.name, s.labels.get("kind")): s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[("kvrag_kv_memory_budget_bytes", None)] == live.settings.kv_memory_bytes
    assert samples[("kvrag_kv_memory_bytes", "blocks")] == live.store.kv_memory.kind_nbytes("blocks") > 0
    assert {("kvrag_kv_memory_bytes", kind) for kind in ("map", "sessions")} <= set(samples)
