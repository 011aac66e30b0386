"""The docs stay navigable: README.md is the entry point and every page it leads to resolves.

- every relative link (``[text](path)`` and ``![alt](path)``, outside code blocks) in README.md and
  docs/**/*.md points to a file or folder that exists;
- docs/DESIGN.md stays a map a newcomer reads in one sitting (at most 320 lines);
- the result tables the benchmarks rewrite keep their ``<!-- NAME:table -->`` spans in docs/BENCHMARKS.md,
  the file ``bench/squad.py`` writes them to, so a run updates the page instead of printing "paste this".
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
MAX_DESIGN_LINES = 320

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^\s*(```|~~~)")
EXTERNAL = ("http://", "https://", "mailto:", "#")


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


def relative_links(page: Path) -> list[tuple[int, str]]:
    """(line number, target) of every relative link on ``page``, code blocks and inline code left out."""
    found: list[tuple[int, str]] = []
    in_code = False
    for number, line in enumerate(page.read_text().splitlines(), 1):
        if FENCE.match(line):
            in_code = not in_code
            continue
        if in_code:
            continue
        for target in LINK.findall(re.sub(r"`[^`]*`", "", line)):
            if not target.startswith(EXTERNAL):
                found.append((number, target))
    return found


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    broken = [f"{page.relative_to(ROOT)}:{n}: {target}" for n, target in relative_links(page)
              if not (page.parent / target.split("#", 1)[0]).exists()]
    assert broken == []


def test_readme_links_the_docs() -> None:
    targets = {target.split("#", 1)[0] for _, target in relative_links(ROOT / "README.md")}
    assert {"docs/DESIGN.md", "docs/RESULTS.md", "docs/BENCHMARKS.md"} <= targets


def test_design_is_a_short_map() -> None:
    lines = len((DOCS / "DESIGN.md").read_text().splitlines())
    assert lines <= MAX_DESIGN_LINES, f"docs/DESIGN.md has {lines} lines; move detail to the code or docs/research"


def test_benchmark_tables_keep_their_markers() -> None:
    text = (DOCS / "BENCHMARKS.md").read_text()
    opened = re.findall(r"<!-- ([a-z_]+):table -->", text)
    closed = re.findall(r"<!-- /([a-z_]+):table -->", text)
    assert opened == closed and len(set(opened)) == len(opened)
    named = set()
    for script in (ROOT / "bench").glob("*.py"):
        named |= set(re.findall(r"publish_doc_table\(\"([a-z_]+)\"", script.read_text()))
    assert named and named <= set(opened), f"no markers in docs/BENCHMARKS.md for {sorted(named - set(opened))}"
    assert re.search(r"^## Codec: compression vs fidelity per preset", text, re.M), "bench/codec.py's section"
