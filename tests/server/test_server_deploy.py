"""docker-compose.yml: postgres with a pg_isready healthcheck, a one-shot migrate, and the api after both."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_compose_file_wires_postgres_migrate_and_api() -> None:
    spec = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = spec["services"]
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert services["migrate"]["command"] == ["kvrag", "db", "upgrade"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    api = services["api"]
    assert api["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert api["environment"]["KVRAG_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert "KVRAG_ADMIN_KEY" in api["environment"]
    cmd = next(line for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("CMD "))
    assert '"kvrag", "serve", "--host", "0.0.0.0"' in cmd


def test_docker_compose_config_accepts_it() -> None:
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("docker compose is not installed here")
    result = subprocess.run([docker, "compose", "config", "--quiet"], cwd=ROOT, capture_output=True, text=True,
                            env={"KVRAG_ADMIN_KEY": "x", "PATH": "/usr/bin:/bin:/usr/local/bin"}, timeout=60)
    assert result.returncode == 0, result.stderr


def test_compose_runs_two_replicas_on_one_catalog_and_object_store_behind_a_proxy() -> None:
    spec = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = spec["services"]
    api, api2 = services["api"], services["api2"]
    for replica in (api, api2):
        env = replica["environment"]
        assert env["KVRAG_BLOB_URL"].startswith("s3://") and env["AWS_ENDPOINT_URL"] == "http://seaweedfs:8333"
        assert env["KVRAG_DATABASE_URL"] == api["environment"]["KVRAG_DATABASE_URL"]
    # Shared: catalog, object store and converted weights; each replica's data volume is its own.
    data = {name: next(v for v in services[name]["volumes"] if v.endswith(":/data")) for name in ("api", "api2")}
    assert data["api"] != data["api2"]
    assert api2["depends_on"]["api"]["condition"] == "service_healthy"
    assert services["bucket"]["depends_on"]["seaweedfs"]["condition"] == "service_healthy"
    assert api["depends_on"]["bucket"]["condition"] == "service_completed_successfully"
    assert services["proxy"]["ports"] == ["8000:8000"] and "ports" not in api and "ports" not in api2
    caddy = (ROOT / "deploy" / "caddy" / "Caddyfile").read_text()
    assert "reverse_proxy api:8000 api2:8000" in caddy and "health_uri /readyz" in caddy
