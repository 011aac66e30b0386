"""Write the synchronous SDK modules from their asynchronous sources (the async code is the one source).

    python client/scripts/unasync.py          # rewrite _client.py and _resources.py
    python client/scripts/unasync.py --check  # exit 1 if either is stale (tests/client/test_options.py runs it)

A few whole-word substitutions, as httpcore's scripts/unasync.py does, rather than the ``unasync`` package:
the sources are written for it (no ``yield from``, no async-only APIs beyond the ones below), and a
dependency-free script keeps the SDK's build free of a tool the project would have to pin.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "kvrag_client"
FILES = {"_async_client.py": "_client.py", "_async_resources.py": "_resources.py"}

# Applied in order to every line after the module docstring.
SUBS: list[tuple[str, str]] = [
    (r"^import asyncio\n", ""),
    (r"\basync def\b", "def"),
    (r"\basync with\b", "with"),
    (r"\basync for\b", "for"),
    (r"\bawait ", ""),
    (r"\basyncio\.sleep\b", "time.sleep"),
    (r"\basync_raw_wrapper\b", "raw_wrapper"),
    (r"\b_async_resources\b", "_resources"),
    (r"\b_async_client\b", "_client"),
    (r"\b__aiter__\b", "__iter__"),
    (r"\b__aenter__\b", "__enter__"),
    (r"\b__aexit__\b", "__exit__"),
    (r"\baiter_lines\b", "iter_lines"),
    (r"\baclose\b", "close"),
    (r"\baread\b", "read"),
    (r"Async(?=[A-Z_])", ""),
]
_DOCSTRING = re.compile(r'\A"""(.*?)"""\n', re.DOTALL)


def header(source: str, summary: str) -> str:
    first = summary.strip().splitlines()[0]
    return (f'"""{first}\n\nGENERATED from {source} by client/scripts/unasync.py: do not edit; edit {source}'
            ' and run\nthe script.\n"""\n')


def convert(source: str, text: str) -> str:
    match = _DOCSTRING.match(text)
    if match is None:
        raise SystemExit(f"{source}: must start with a module docstring")
    summary = match.group(1).replace("asynchronous", "synchronous")
    body = text[match.end():]
    out = []
    for line in body.splitlines(keepends=True):
        for pattern, repl in SUBS:
            line = re.sub(pattern, repl, line)
        out.append(line)
    return header(source, re.sub(r"Async(?=[A-Z])", "", summary)) + "".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="Only say whether the generated files are current.")
    args = parser.parse_args(argv)
    stale = []
    for source, target in FILES.items():
        expected = convert(source, (PACKAGE / source).read_text())
        path = PACKAGE / target
        if path.exists() and path.read_text() == expected:
            continue
        stale.append(target)
        if not args.check:
            path.write_text(expected)
    if args.check and stale:
        print(f"stale: {', '.join(stale)}; run python client/scripts/unasync.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
