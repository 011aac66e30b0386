"""The engine's ``Settings`` holds only what the engine reads; the server's own knobs are ``ServerSettings``,
still read from the same ``KVRAG_*`` environment variables."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvstore.config import Settings
from server.settings import ServerSettings

ROOT = Path(__file__).resolve().parents[2]

# Every server-only knob, an environment value for it and the value it must parse to.
SERVER_ENV: dict[str, tuple[str, object]] = {
    "admin_key": ("root-from-env", "root-from-env"),
    "cors_origins": ("https://a.example, http://b.example:8080/", ["https://a.example", "http://b.example:8080"]),
    "max_body_bytes": ("4096", 4096),
    "oversize_drain_bytes": ("1024", 1024),
    "oversize_drain_s": ("2.5", 2.5),
    "max_json_depth": ("7", 7),
    "queue_size": ("3", 3),
    "batch_job_threshold": ("5", 5),
    "job_lease_s": ("12.5", 12.5),
    "job_poll_s": ("0.25", 0.25),
    "job_max_attempts": ("4", 4),
    "jobs_per_key": ("6", 6),
    "job_retention_s": ("3600", 3600.0),
    "job_stop_grace_s": ("1.5", 1.5),
    "idempotency_ttl_s": ("60", 60.0),
    "retry_after_s": ("9", 9),
    "mcp_sessions_per_key": ("11", 11),
    "mcp_session_idle_s": ("90", 90.0),
    "openai_default_bank": ("notes", "notes"),
    "console_session_idle_s": ("120", 120),
}


def _engine_sources() -> str:
    return "\n".join(path.read_text() for path in sorted((ROOT / "kvstore").rglob("*.py"))
                     if path != ROOT / "kvstore" / "config.py")


def test_the_engine_settings_have_no_server_only_field() -> None:
    server_only = set(ServerSettings.model_fields) - set(Settings.model_fields)
    assert server_only == set(SERVER_ENV)
    assert not server_only & set(Settings.model_fields)
    assert issubclass(ServerSettings, Settings)  # one object configures a server process, engine included
    engine = _engine_sources()
    read_by_engine = sorted(name for name in server_only if f".{name}" in engine or f'"{name}"' in engine)
    assert read_by_engine == [], f"the engine reads server-only settings: {read_by_engine}"


def test_every_engine_setting_is_read_by_the_engine() -> None:
    """A field no kvstore module reads belongs to the server (or nowhere), not to the engine's Settings."""
    engine = _engine_sources()
    unread = sorted(name for name in Settings.model_fields if name not in engine)
    assert unread == [], f"engine Settings fields no kvstore module reads: {unread}"


def test_environment_variables_reach_server_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name, (raw, _) in SERVER_ENV.items():
        monkeypatch.setenv(f"KVRAG_{name.upper()}", raw)
    monkeypatch.setenv("KVRAG_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("KVRAG_BLOCK_TOKENS", "128")
    server = ServerSettings()
    for name, (_, expected) in SERVER_ENV.items():
        assert getattr(server, name) == expected, name
    assert (server.data_dir, server.block_tokens) == (tmp_path, 128)  # the engine's knobs come along
    engine = Settings()  # the same environment: the engine takes its own and ignores the server's
    assert (engine.data_dir, engine.block_tokens) == (tmp_path, 128)
    assert not any(hasattr(engine, name) for name in SERVER_ENV)


def test_server_settings_check_their_values(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not an origin"):
        ServerSettings(data_dir=tmp_path, cors_origins=["https://a.example/path"])
    with pytest.raises(ValueError):
        ServerSettings(data_dir=tmp_path, queue_size=0)
    assert ServerSettings(data_dir=tmp_path).cors_origins == [] and ServerSettings().admin_key is None
