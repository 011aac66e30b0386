"""The console tests' browser: server.testing's chromium, skipped where the system has none."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from playwright.sync_api import Browser

from server.testing import CHROMIUM, MISSING_CHROMIUM
from server.testing import chromium as launch_chromium


@contextmanager
def chromium() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.skip(MISSING_CHROMIUM)
    with launch_chromium() as browser:
        yield browser
