"""Every write route a client may resend honours ``Idempotency-Key``: the same key and request again answer
the first answer and change nothing more; the same key on a different request is a 409."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from tests.client.live import Live, live  # noqa: F401 - the fixture, by name

Send = Callable[[str], httpx.Response]


def _twice(client: httpx.Client, method: str, path: str, body: object | None, key: str) -> tuple[httpx.Response, ...]:
    def send() -> httpx.Response:
        return client.request(method, path, json=body, headers={"Idempotency-Key": key})

    return send(), send()


def test_every_retried_write_is_done_once(live: Live) -> None:  # noqa: F811
    with httpx.Client(base_url=live.url, timeout=60) as c:
        first, again = _twice(c, "POST", "/v1/banks", {"name": "notes"}, "k-bank")
        assert first.status_code == again.status_code == 201 and first.json() == again.json()
        assert c.post("/v1/banks", json={"name": "notes"}).status_code == 409  # without the key: a conflict

        first, again = _twice(c, "PATCH", "/v1/banks/notes", {"max_blocks": 50}, "k-patch")
        assert first.status_code == again.status_code == 200 and again.json()["max_blocks"] == 50

        assert c.put("/v1/banks/notes/documents/a", json={"text": "The Normans named Normandy."}).status_code == 201
        c.post("/v1/banks/notes/sessions", json={"session_id": "run"})
        first, again = _twice(c, "POST", "/v1/banks/notes/sessions/run/append",
                              {"segments": [{"role": "tool", "text": "Normandy is in France."}]}, "k-append")
        assert first.status_code == again.status_code == 200 and first.json() == again.json()
        assert len(c.get("/v1/banks/notes/sessions/run").json()["segments"]) == 1
        other = c.post("/v1/banks/notes/sessions/run/append", headers={"Idempotency-Key": "k-append"},
                       json={"segments": [{"role": "tool", "text": "Something else."}]})
        assert other.status_code == 409 and other.json()["code"] == "conflict"

        first, again = _twice(c, "POST", "/v1/banks/notes/context-map/edits",
                              {"edits": [{"op": "add", "section": "understanding", "content": "One fact."}]}, "k-map")
        assert first.json() == again.json()
        items = c.get("/v1/banks/notes/context-map").json()["items"]
        assert [i["content"] for i in items].count("One fact.") == 1
        first, again = _twice(c, "PATCH", "/v1/banks/notes/context-map", {"budget_tokens": 600}, "k-map-patch")
        assert first.json() == again.json() and again.json()["budget_tokens"] == 600

        first, again = _twice(c, "POST", "/v1/banks/notes/maintenance", {"merge": False}, "k-maint")
        assert first.status_code == again.status_code == 202 and first.json() == again.json()  # one job
        first, again = _twice(c, "POST", "/v1/banks/notes/sessions/run/prune", {"policy": "attention"}, "k-prune")
        assert first.json() == again.json()

        first, again = _twice(c, "POST", "/v1/banks/notes/sessions", {}, "k-session")
        assert first.status_code == again.status_code == 201 and first.json() == again.json()  # one random id
        assert first.json()["session_id"] != "run"

        first, again = _twice(c, "DELETE", "/v1/banks/notes/documents/a", None, "k-del-doc")
        assert first.status_code == again.status_code == 204  # the replay, not a 404
        first, again = _twice(c, "DELETE", "/v1/banks/notes/sessions/run", None, "k-del-session")
        assert first.status_code == again.status_code == 204
        assert c.delete("/v1/banks/notes/documents/a").status_code == 404  # without the key: gone is gone


@pytest.mark.parametrize("key", ["", "x" * 201])
def test_bad_keys_are_refused(live: Live, key: str) -> None:  # noqa: F811
    with httpx.Client(base_url=live.url, timeout=60) as c:
        c.post("/v1/banks", json={"name": "notes"})
        c.post("/v1/banks/notes/sessions", json={"session_id": "run"})
        r = c.post("/v1/banks/notes/sessions/run/append", headers={"Idempotency-Key": key},
                   json={"segments": [{"role": "tool", "text": "x"}]})
        assert r.status_code == 422 and r.json()["code"] == "validation_error"
        assert c.get("/v1/banks/notes/sessions/run").json()["segments"] == []
