"""Fixtures of the reliability suite: one fork server for the whole session (see ``serve_tiny``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.reliability.procs import ForkServer


@pytest.fixture(scope="session")
def fork_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ForkServer]:
    server = ForkServer(tmp_path_factory.mktemp("reliability-logs"))
    yield server
    server.close()
