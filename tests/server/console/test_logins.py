"""Console logins: idle expiry, a bounded table, fresh ids and tokens per login, safe redirects."""

from __future__ import annotations

import pytest

from server.console import logins as logins_module
from server.console.login import safe_next
from server.console.logins import Logins


def test_a_login_expires_after_its_idle_time_and_use_restarts_the_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(logins_module.time, "monotonic", lambda: now[0])
    table = Logins(idle_s=60)
    session_id, login = table.create("kvr_secret")
    now[0] += 50
    assert table.get(session_id) is login  # used: idle clock restarts
    now[0] += 50
    assert table.get(session_id) is login
    now[0] += 61
    assert table.get(session_id) is None and table.get(session_id) is None
    assert table.get("never-issued") is None


def test_the_table_is_bounded_and_every_login_is_fresh() -> None:
    table = Logins(idle_s=60, max_logins=3)
    ids = [table.create(f"kvr_{i}")[0] for i in range(5)]
    assert [table.get(i) is not None for i in ids] == [False, False, True, True, True]  # oldest went first
    a, b = table.create("kvr_x"), table.create("kvr_x")
    assert a[0] != b[0] and a[1].csrf != b[1].csrf  # every login gets fresh ids and tokens
    table.drop(a[0])
    assert table.get(a[0]) is None and table.get(b[0]) is not None


@pytest.mark.parametrize("target, expected", [
    ("/console/banks/x/blocks?cursor=5", "/console/banks/x/blocks?cursor=5"), ("/console", "/console"),
    ("/console?after=b", "/console?after=b"), ("//evil.example", "/console"), ("https://evil.example", "/console"),
    ("/consolex", "/console"), ("/console\\\\evil", "/console"), ("/v1/keys", "/console"), ("", "/console"),
    ("/console/ x", "/console")])
def test_login_returns_only_to_console_paths(target: str, expected: str) -> None:
    assert safe_next(target) == expected
