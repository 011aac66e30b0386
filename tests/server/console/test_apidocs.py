"""/docs is open without a key and names no other host: every asset it references is this server's."""

from __future__ import annotations

import re
from urllib.parse import urljoin

from tests.server.console.conftest import World

ASSET = re.compile(r"""(?:src|href)=["']([^"']+)["']|url:\s*["']([^"']+)["']""")


def test_docs_page_references_only_this_server_and_every_asset_answers(world: World) -> None:
    with world.client() as c:  # no key
        page = c.get("/docs")
        assert page.status_code == 200 and "swagger-ui" in page.text
        assert not re.search(r"https?://|//[a-z0-9]", page.text.replace(world.live.url, "")), page.text
        refs = [a or b for a, b in ASSET.findall(page.text)]
        assert {"/docs-assets/swagger-ui-bundle.js", "/docs-assets/swagger-ui.css", "/docs-assets/favicon.png",
                "/openapi.json"} <= set(refs)
        for ref in refs:
            r = c.get(urljoin(world.live.url + "/docs", ref))
            assert r.status_code == 200 and r.content, ref
        assert "'self'" in page.headers["content-security-policy"]
        assert c.get("/openapi.json").json()["info"]["title"] == "kvrag"
        assert c.get("/redoc").status_code == 404  # not served: its bundle fetches a logo from a CDN
        spec = c.get("/openapi.json").json()
        assert not [p for p in spec["paths"] if p.startswith(("/console", "/docs"))]
