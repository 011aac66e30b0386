"""The console and the API docs in a real browser (Debian's chromium): login, scope, paging, open mode, offline."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page

from tests.server.console.browser import chromium
from tests.server.console.conftest import ALPHA, ALPHA_DOCS, BETA, BETA_SECRET, World, alpha_pages, beta_pages
from tests.server_harness import live_server


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as b:
        yield b


def _no_trace_of_beta(page: Page, asked_for_it: bool = False) -> None:
    """Nothing of bank BETA on the page; asked for by URL, only the 404's echo of the name typed."""
    html = page.content()
    assert BETA_SECRET not in html and "beta-doc" not in html and "beta-session" not in html
    assert html.count(BETA) == (html.count(f"bank '{BETA}' not found") if asked_for_it else 0)


def test_login_form_shows_the_keys_banks_and_nothing_of_another_keys(world: World, browser: Browser) -> None:
    context = browser.new_context(base_url=world.live.url)
    page = context.new_page()
    try:
        page.goto(f"/console/banks/{ALPHA}/blocks")
        assert page.url.startswith(f"{world.live.url}/console/login?next=")
        page.fill("#key", world.key_a)
        page.click("button[type=submit]")
        page.wait_for_url(f"{world.live.url}/console/banks/{ALPHA}/blocks")
        assert page.locator("span.badge.warm, span.badge.hot, span.badge.cold").count() == len(ALPHA_DOCS)
        cookie = next(c for c in context.cookies() if c["name"] == "kvrag_console")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/console"
        assert world.key_a not in cookie["value"]
        for path in alpha_pages():
            response = page.goto(path)
            assert response is not None and response.status == 200, path
            _no_trace_of_beta(page)
        assert page.locator("svg.chart circle.point.kv").count() >= 2  # the queries page was the last one
        for path in beta_pages():
            response = page.goto(path)
            assert response is not None and response.status == 404, path
            _no_trace_of_beta(page, asked_for_it=True)
        page.goto("/console")
        assert page.locator("a.bankname").all_inner_texts() == [ALPHA]
        page.click("form[action='/console/logout'] button")
        page.wait_for_url(f"{world.live.url}/console/login")
        page.goto("/console")
        assert page.url.startswith(f"{world.live.url}/console/login")
    finally:
        context.close()


def test_a_wrong_key_keeps_the_browser_on_the_login_form(world: World, browser: Browser) -> None:
    context = browser.new_context(base_url=world.live.url)
    page = context.new_page()
    try:
        page.goto("/console/login")
        page.fill("#key", "kvr_not-a-key-at-all-000000000000")
        page.click("button[type=submit]")
        page.wait_for_selector("p.alert")
        assert "invalid or revoked" in page.inner_text("p.alert")
        assert not [c for c in context.cookies() if c["name"] == "kvrag_console"]
    finally:
        context.close()


def test_bearer_header_reads_as_that_key(world: World, browser: Browser) -> None:
    context = browser.new_context(base_url=world.live.url,
                                  extra_http_headers={"Authorization": f"Bearer {world.key_b}"})
    page = context.new_page()
    try:
        page.goto("/console")
        assert page.locator("a.bankname").all_inner_texts() == [BETA]
        response = page.goto(f"/console/banks/{ALPHA}/documents")
        assert response is not None and response.status == 404 and "alpha-doc" not in page.content()
    finally:
        context.close()


def test_documents_page_pages_through_the_bank(world: World, browser: Browser) -> None:
    context = browser.new_context(base_url=world.live.url,
                                  extra_http_headers={"Authorization": f"Bearer {world.key_a}"})
    page = context.new_page()
    try:
        page.goto(f"/console/banks/{ALPHA}/documents?limit=5")
        seen: list[str] = []
        pages = 0
        while True:
            pages += 1
            seen += page.locator("table.docs tbody td.mono a").all_inner_texts()
            more = page.locator("a.next[rel=next]")
            if more.count() == 0:
                break
            more.click()
            page.wait_for_load_state()
        assert seen == ALPHA_DOCS and pages == 3
        page.click("text=alpha-doc-11")
        assert "Alpha note alpha-doc-11" in page.inner_text("pre.doctext")
    finally:
        context.close()


def test_open_mode_console_needs_no_login(tmp_path: Path, tiny_llm, embedder, browser: Browser) -> None:
    with live_server("sqlite", tmp_path, tiny_llm, embedder, admin_key=None) as live:
        with httpx.Client(base_url=live.url) as c:
            assert c.post("/v1/banks", json={"name": "open-bank"}).status_code == 201
            assert c.put("/v1/banks/open-bank/documents/n1", json={"text": "Open mode note."}).status_code == 201
        page = browser.new_page(base_url=live.url)
        try:
            page.goto("/console")
            assert page.url == f"{live.url}/console"
            assert page.locator("a.bankname").all_inner_texts() == ["open-bank"]
            assert "root" in page.inner_text("header .who")
            assert page.locator("form[action='/console/logout']").count() == 0  # nothing to log out of
            page.goto("/console/banks/open-bank/documents")
            assert page.locator("table.docs tbody td.mono a").all_inner_texts() == ["n1"]
            page.goto("/console/login")
            assert page.url == f"{live.url}/console"
        finally:
            page.close()


def test_api_docs_render_with_every_request_to_this_server(world: World, browser: Browser) -> None:
    page = browser.new_page(base_url=world.live.url)
    requested: list[str] = []
    failed: list[str] = []
    errors: list[str] = []  # a Content-Security-Policy violation is reported here
    page.on("request", lambda r: requested.append(r.url))
    page.on("requestfailed", lambda r: failed.append(r.url))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    try:
        response = page.goto("/docs")
        assert response is not None and response.status == 200
        page.wait_for_selector(".swagger-ui .info .title", timeout=20_000)
        assert "kvrag" in page.inner_text(".swagger-ui .info .title")
        assert page.locator(".opblock-tag").count() >= 5  # the spec loaded: operations grouped by tag
        page.wait_for_load_state("networkidle")
        assert requested and all(u.startswith(world.live.url + "/") for u in requested), requested
        assert not failed and not errors, (failed, errors)
    finally:
        page.close()
