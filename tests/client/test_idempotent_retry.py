"""A write whose answer is lost is retried by the SDK with the same Idempotency-Key, and the server answers the
retry from its record of the first: one write, the first answer. A real server behind a proxy that drops the
answer after the server has sent it (the write committed)."""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
from kvrag_client import KVRag

from tests.client.dropping_proxy import DroppingProxy
from tests.client.live import Live, live  # noqa: F401 - the fixture, by name


@pytest.fixture
def proxy(live: Live) -> Iterator[DroppingProxy]:  # noqa: F811
    url = urlsplit(live.url)
    proxy = DroppingProxy((url.hostname or "127.0.0.1", url.port or 80))
    yield proxy
    proxy.close()


def _one_key(proxy: DroppingProxy, method: str, suffix: str) -> str:
    sent = proxy.requests(method, suffix)
    assert [s.dropped for s in sent] == [True, False], sent  # the first answer lost, the retry answered
    keys = {s.headers.get("idempotency-key") for s in sent}
    assert len(keys) == 1 and None not in keys  # one key for the logical call, the same on its retry
    return keys.pop() or ""


def test_lost_answers_are_retried_without_writing_twice(live: Live, proxy: DroppingProxy) -> None:  # noqa: F811
    direct = KVRag(live.url)
    through = KVRag(proxy.url, max_retries=2)

    proxy.drop.add(("POST", "/v1/banks"))
    assert through.banks.create("notes").name == "notes"  # not a 409 for the bank its own first try made
    _one_key(proxy, "POST", "/v1/banks")

    proxy.drop.add(("POST", "/documents"))
    results = through.documents.put_many("notes", [{"id": "a", "text": "The Normans gave their name to Normandy."}])
    assert [r.created for r in results] == [True]  # the first answer, replayed: not "unchanged"
    _one_key(proxy, "POST", "/documents")
    assert [(d.doc_id, d.version) for d in direct.documents.list("notes")] == [("a", 1)]

    through.sessions.create("notes", "run")
    proxy.drop.add(("POST", "/append"))
    appended = through.sessions.append("notes", "run", [{"role": "tool", "text": "Normandy is in France."}])
    _one_key(proxy, "POST", "/append")
    segments = direct.sessions.get("notes", "run").segments
    assert len(segments) == 1 and appended.segment_ids == [segments[0].id]  # ONE segment, not two

    proxy.drop.add(("POST", "/context-map/edits"))
    through.context_map.edit("notes", [{"op": "add", "section": "understanding", "content": "About Normans."}])
    _one_key(proxy, "POST", "/context-map/edits")
    assert [i.content for i in direct.context_map.get("notes").items].count("About Normans.") == 1

    proxy.drop.add(("DELETE", "/documents/a"))
    through.documents.delete("notes", "a")  # the retry gets the first 204, not a 404
    _one_key(proxy, "DELETE", "/documents/a")
    assert list(direct.documents.list("notes")) == []

    proxy.drop.add(("DELETE", "/sessions/run"))
    through.sessions.delete("notes", "run")
    _one_key(proxy, "DELETE", "/sessions/run")
    through.close()
    direct.close()


def test_each_call_gets_its_own_key_and_a_given_key_wins(live: Live, proxy: DroppingProxy) -> None:  # noqa: F811
    with KVRag(proxy.url) as kv:
        kv.banks.create("notes")
        kv.sessions.create("notes", "run")
        for text in ("one", "two"):
            kv.sessions.append("notes", "run", [{"role": "note", "text": text}])
        kv.documents.put("notes", "a", "text", idempotency_key="mine-1")
        assert len(kv.sessions.get("notes", "run").segments) == 2  # two calls, two appends
    appends = proxy.requests("POST", "/append")
    assert len({s.headers["idempotency-key"] for s in appends}) == 2
    assert proxy.requests("PUT", "/documents/a")[0].headers["idempotency-key"] == "mine-1"
    with KVRag(proxy.url, max_retries=0) as kv:  # nothing will be retried: no key is needed
        kv.sessions.append("notes", "run", [{"role": "note", "text": "three"}])
    assert "idempotency-key" not in proxy.requests("POST", "/append")[-1].headers
