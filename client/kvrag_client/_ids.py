"""Ids checked before they are sent: the SDK refuses, without a request, any id the server would refuse.

An id becomes a URL path segment. Percent-encoding keeps ``/`` and ``?`` out of the route, but ``.`` and
``..`` are unreserved characters that HTTP clients (httpx included) resolve as dot segments: a document
id ``..`` would turn ``DELETE /v1/banks/notes/documents/..`` into ``DELETE /v1/banks/notes``. Every
pattern below starts with a letter or digit, so no dot segment can pass.
"""

from __future__ import annotations

import re
from urllib.parse import quote

from ._exceptions import InvalidId

__all__ = ["BANK_NAME", "DOC_ID", "SESSION_ID", "OPAQUE_ID", "bank_name", "doc_id", "session_id", "opaque_id"]

# The server's own patterns (kvstore.banks.service.BANK_NAME, kvstore.banks.documents.DOC_ID,
# kvstore.sessions.values.SESSION_ID), matched whole (fullmatch: no trailing newline slips through).
BANK_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
DOC_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
SESSION_ID = DOC_ID
# Ids the server makes (API key ids, job ids: hex uuids); anything that could not be one is refused.
OPAQUE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")


def _checked(kind: str, pattern: re.Pattern[str], value: object) -> str:
    if not isinstance(value, str) or pattern.fullmatch(value) is None:
        raise InvalidId(f"{kind} {value!r} is not valid: it must match {pattern.pattern}")
    return value


def bank_name(value: object) -> str:
    """``value`` if it is a valid bank name, else ``InvalidId``."""
    return _checked("bank name", BANK_NAME, value)


def doc_id(value: object) -> str:
    return _checked("document id", DOC_ID, value)


def session_id(value: object) -> str:
    return _checked("session id", SESSION_ID, value)


def opaque_id(kind: str, value: object) -> str:
    return _checked(kind, OPAQUE_ID, value)


# Context-map item ids: cr-N, cu-N, rr-N.
MAP_ITEM_ID = re.compile(r"(cr|cu|rr)-[1-9][0-9]{0,8}")


def map_item_id(value: object) -> str:
    return _checked("context-map item id", MAP_ITEM_ID, value)


def segment(value: str) -> str:
    """A checked id as one path segment (percent-encoded all the same: the check is the guard, this the habit)."""
    return quote(value, safe="")
