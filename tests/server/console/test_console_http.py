"""The console over HTTP on a real server: scope, login and logout, CSRF, the pages' content, the query log."""

from __future__ import annotations

import re
from contextlib import closing

import httpx
from fastapi.routing import APIRoute

from server.console import login, pages
from tests.server.console.conftest import (
    ALPHA,
    ALPHA_DOCS,
    ASKED,
    BETA,
    BETA_SECRET,
    World,
    alpha_pages,
    beta_pages,
)
from tests.server_harness import ADMIN_KEY


def _login(world: World, key: str, next_path: str = "/console") -> tuple[httpx.Client, httpx.Response]:
    """A browser-like client logged in through the form: the form's token, then the POST."""
    client = world.client()
    form = client.get("/console/login", params={"next": next_path})
    assert form.status_code == 200
    token = re.search(r'name="csrf" value="([^"]+)"', form.text)
    assert token is not None
    answer = client.post("/console/login", data={"key": key, "csrf": token.group(1), "next": next_path})
    return client, answer


def test_every_page_of_a_key_shows_its_bank_and_nothing_of_another(world: World) -> None:
    with world.client(world.key_a) as c:
        for path in alpha_pages():
            r = c.get(path)
            assert r.status_code == 200, (path, r.text[:500])
            assert r.headers["content-type"].startswith("text/html")
            assert BETA not in r.text and BETA_SECRET not in r.text, path
        assert ALPHA in c.get("/console").text
        for path in beta_pages():
            r = c.get(path)
            assert r.status_code == 404, path
            assert BETA_SECRET not in r.text and "beta-doc" not in r.text and "beta-session" not in r.text


def test_out_of_scope_bank_answers_exactly_like_a_missing_one(world: World) -> None:
    with world.client(world.key_a) as c:
        outside = c.get(f"/console/banks/{BETA}/documents")
        missing = c.get("/console/banks/zz-missing/documents")
    assert outside.status_code == missing.status_code == 404

    def strip(text: str, bank: str) -> str:
        return re.sub(r"request <span class=\"mono\">[0-9a-f]+", "", text).replace(bank, "<bank>")

    assert strip(outside.text, BETA) == strip(missing.text, "zz-missing")


def test_root_sees_every_bank_and_the_other_key_only_its_own(world: World) -> None:
    with world.client(ADMIN_KEY) as c:
        page = c.get("/console").text
        assert ALPHA in page and BETA in page
    with world.client(world.key_b) as c:
        page = c.get("/console").text
        assert BETA in page and ALPHA not in page
        assert c.get(f"/console/banks/{ALPHA}/documents/alpha-doc-00").status_code == 404


def test_without_a_key_pages_redirect_to_the_login_and_a_bad_key_is_401(world: World) -> None:
    with world.client() as c:
        r = c.get(f"/console/banks/{ALPHA}/documents?limit=5")
        assert r.status_code == 303
        assert r.headers["location"] == "/console/login?next=%2Fconsole%2Fbanks%2Falpha-bank%2Fdocuments%3Flimit%3D5"
        bad = c.get("/console", headers={"Authorization": "Bearer kvr_not-a-real-key-000000000"})
        assert bad.status_code == 401 and "invalid or revoked API key" in bad.text
        assert c.get("/console", headers={"X-API-Key": world.key_a}).status_code == 200


def test_pages_carry_a_no_script_policy_and_no_foreign_urls(world: World) -> None:
    with world.client(world.key_a) as c:
        for path in alpha_pages():
            r = c.get(path)
            assert "script-src" not in r.headers["content-security-policy"]
            assert "default-src 'none'" in r.headers["content-security-policy"]
            assert r.headers["x-frame-options"] == "DENY" and r.headers["cache-control"] == "no-store"
            assert "<script" not in r.text
            assert not re.search(r"(?:src|href|action)=\"(?:https?:)?//", r.text), path
        for asset in ("/console/static/console.css", "/console/static/favicon.svg"):
            assert c.get(asset).status_code == 200


def test_console_routes_are_get_only_but_login_and_logout(world: World) -> None:
    pairs = {(route.path, method) for router in (login.router, pages.router) for route in router.routes
             if isinstance(route, APIRoute) for method in route.methods}
    assert {path for path, method in pairs if method != "GET"} == {"/console/login", "/console/logout"}
    assert {method for path, method in pairs if path == "/console/logout"} == {"POST"}
    assert len({path for path, method in pairs if method == "GET"}) >= 10
    with world.client(world.key_a) as c:
        for path in alpha_pages():
            for method in ("POST", "PUT", "PATCH", "DELETE"):
                assert c.request(method, path).status_code == 405, (method, path)


def test_login_sets_a_strict_httponly_session_cookie_and_never_the_key(world: World) -> None:
    client, answer = _login(world, world.key_a, f"/console/banks/{ALPHA}/blocks")
    with closing(client):
        assert answer.status_code == 303 and answer.headers["location"] == f"/console/banks/{ALPHA}/blocks"
        cookie = answer.headers["set-cookie"]
        assert "kvrag_console=" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
        assert "Path=/console" in cookie and "Secure" not in cookie  # plain http here; https adds Secure
        assert world.key_a not in cookie and world.key_a not in answer.headers["location"]
        page = client.get(f"/console/banks/{ALPHA}/blocks")
        assert page.status_code == 200 and "key-a" in page.text and world.key_a not in page.text
        assert client.get(f"/console/banks/{BETA}").status_code == 404
        # The API never reads the console's cookie.
        assert client.get("/v1/banks").status_code == 401


def test_login_refuses_a_missing_token_a_foreign_origin_and_a_wrong_key(world: World) -> None:
    with world.client() as c:
        no_token = c.post("/console/login", data={"key": world.key_a, "csrf": "x"})
        assert no_token.status_code == 403 and "kvrag_console=" not in no_token.headers.get("set-cookie", "")
    with world.client() as c:
        form = c.get("/console/login")
        token = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)  # type: ignore[union-attr]
        foreign = c.post("/console/login", data={"key": world.key_a, "csrf": token},
                         headers={"Origin": "http://evil.example"})
        assert foreign.status_code == 403
        cross = c.post("/console/login", data={"key": world.key_a, "csrf": token},
                       headers={"Sec-Fetch-Site": "cross-site"})
        assert cross.status_code == 403
        wrong = c.post("/console/login", data={"key": "kvr_wrong-key-0000000000000", "csrf": token})
        assert wrong.status_code == 401 and "invalid or revoked" in wrong.text
        assert "kvrag_console=" not in wrong.headers.get("set-cookie", "")


def test_login_goes_back_only_to_console_paths(world: World) -> None:
    for target in ("//evil.example/x", "https://evil.example/", "/v1/banks", "/console\\@evil", "/consolex"):
        client, answer = _login(world, world.key_a, target)
        with closing(client):
            assert answer.status_code == 303 and answer.headers["location"] == "/console", target


def test_logout_needs_the_login_token_and_ends_the_login(world: World) -> None:
    client, _ = _login(world, world.key_a)
    with closing(client):
        page = client.get("/console").text
        token = re.search(r'name="csrf" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
        assert client.post("/console/logout", data={"csrf": "forged"}).status_code == 403
        assert client.get("/console").status_code == 200  # a forged logout changed nothing
        cookie = client.cookies.get("kvrag_console")
        out = client.post("/console/logout", data={"csrf": token})
        assert out.status_code == 303 and out.headers["location"] == "/console/login"
        assert 'kvrag_console=""' in out.headers["set-cookie"] or "Max-Age=0" in out.headers["set-cookie"]
    with world.client() as replay:  # the old session id is dead on the server, not only in this browser
        r = replay.get("/console", cookies={"kvrag_console": cookie or ""})
        assert r.status_code == 303 and r.headers["location"].startswith("/console/login")


def test_a_revoked_key_loses_its_console_login_at_once(world: World) -> None:
    from tests.server_harness import make_key

    temp = make_key(world.live, role="read", banks=[ALPHA], agent="agent-t", name="temp")
    client, _ = _login(world, temp["key"])
    with closing(client):
        assert client.get("/console").status_code == 200
        with world.client(ADMIN_KEY) as admin:
            assert admin.delete(f"/v1/keys/{temp['id']}").status_code == 204
        r = client.get("/console")
        assert r.status_code == 303 and r.headers["location"].startswith("/console/login")


def test_documents_page_pages_through_the_bank_by_cursor(world: World) -> None:
    seen: list[str] = []
    url: str | None = f"/console/banks/{ALPHA}/documents?limit=5"
    with world.client(world.key_a) as c:
        while url:
            page = c.get(url)
            assert page.status_code == 200
            seen += re.findall(r">(alpha-doc-\d\d)</a>", page.text)
            nxt = re.search(r'<a href="([^"]+)" class="next" rel="next">', page.text)
            url = nxt.group(1).replace("&amp;", "&") if nxt else None
    assert seen == ALPHA_DOCS


def test_block_document_map_and_session_pages_show_their_data(world: World) -> None:
    with world.client(world.key_a) as c:
        blocks = c.get(f"/console/banks/{ALPHA}/blocks").text
        assert len(re.findall(r'<span class="badge (?:hot|warm|cold)">', blocks)) == len(ALPHA_DOCS)
        assert "int8" in blocks or "tklt" in blocks
        doc = c.get(f"/console/banks/{ALPHA}/documents/alpha-doc-03").text
        assert "Alpha note alpha-doc-03: the Normans" in doc and "history" in doc
        current = c.get(f"/v1/banks/{ALPHA}/context-map").json()["version"]  # ingest bootstraps the roadmap
        cmap = c.get(f"/console/banks/{ALPHA}/context-map").text
        assert "never by year" in cmap and "cr-1" in cmap and f"version {current}" in cmap
        assert f'<a href="?version={current - 1}">{current - 1}</a>' in cmap
        old = c.get(f"/console/banks/{ALPHA}/context-map?version={current - 1}").text
        assert "never by year" not in old and "dates are given by century" in old
        diff = c.get(f"/console/banks/{ALPHA}/context-map/diff?a={current - 1}&b={current}").text
        assert "Added" in diff and "Normandy: settled in the 10th century" in diff
        assert "Rewritten" in diff and "dates are given by century</div>" in diff and "never by year" in diff
        assert "Feedback" in diff  # cr-1 was marked helpful
        assert c.get(f"/console/banks/{ALPHA}/context-map/diff?a=0&b={current + 1}").status_code == 404
        session = c.get(f"/console/banks/{ALPHA}/sessions/trip-1").text
        assert session.count('<span class="badge kept">') == 2 and session.count('<span class="badge pruned">') == 1
        assert "weather report: rain all week" in session  # a pruned segment keeps its text
        listing = c.get(f"/console/banks/{ALPHA}/sessions").text
        assert "trip-1" in listing and re.search(r'<td class="num">3</td>\s*<td class="num">2</td>\s*'
                                                 r'<td class="num">1</td>', listing)


def test_queries_page_charts_both_modes_and_hides_questions_from_other_agents(world: World) -> None:
    with world.client(world.key_a) as c:
        own = c.get(f"/console/banks/{ALPHA}/queries").text
    assert own.count('<circle class="point kv"') >= 2 + 1 and own.count('<circle class="point text"') >= 2 + 1
    assert '<polyline class="series kv"' in own and '<polyline class="series text"' in own
    assert ASKED in own and "median TTFT, text ÷ kv" in own
    with world.client(world.reader_c) as c:
        other = c.get(f"/console/banks/{ALPHA}/queries").text
    assert ASKED not in other and "(hidden · " in other and "agent-a" in other
    with world.client(ADMIN_KEY) as c:
        assert ASKED in c.get(f"/console/banks/{ALPHA}/queries").text


def test_query_log_records_streamed_answers_and_the_openai_door(world: World) -> None:
    store = world.live.store
    before = len(store.recent_queries(ALPHA, limit=1000))
    with world.client(world.key_a) as c:
        r = c.post("/v1/chat/completions", json={"model": f"kvrag:{ALPHA}", "max_tokens": 2,
                                                 "messages": [{"role": "user", "content": "who were the Normans"}]})
        assert r.status_code == 200, r.text
    entries = store.recent_queries(ALPHA, limit=1000)
    assert len(entries) == before + 1
    last = entries[-1]
    assert last.door == "openai" and last.mode == "kv" and last.agent == "agent-a" and last.ttft_ms > 0
    assert last.question_preview == "who were the Normans" and last.generated_tokens <= 2
    with world.client(world.key_a) as c:
        streamed = c.post(f"/v1/banks/{ALPHA}/query", json={"question": "streamed question", "stream": True,
                                                             "mode": "text", "max_new_tokens": 2})
        assert streamed.status_code == 200 and "event: done" in streamed.text
    last = store.recent_queries(ALPHA, limit=1)[-1]
    assert last.question_preview == "streamed question" and last.mode == "text" and last.door == "rest"
