"""The Grafana dashboard reads metrics a live server exports; Prometheus and Grafana are wired as an optional
compose profile that scrapes /metrics with the admin key."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.server_harness import LiveServer, live_server

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "kvrag.json"
# PromQL words that are not metric names (functions, aggregations, operators).
PROMQL_WORDS = {"sum", "rate", "irate", "increase", "histogram_quantile", "clamp_min", "vector", "or", "and",
                "unless", "avg", "max", "min", "count", "label_values"}


def exprs(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression of the dashboard: panel targets and template-variable queries."""
    found = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    found += [v["query"]["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return found


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (strings, label matchers, ranges, grouping and numbers removed)."""
    e = re.sub(r'"[^"]*"', "", expr)
    e = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", e)
    e = re.sub(r"\b(?:by|without)\s*\([^)]*\)", "", e)
    e = re.sub(r"\b\d+(?:\.\d+)?(?:e[-+]?\d+)?\b", "", e)
    e = re.sub(r",\s*[a-z_]+\s*\)", ")", e) if "label_values" in e else e  # label_values(metric, label)
    return {n for n in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", e) if n not in PROMQL_WORDS}


def label_names(expr: str) -> set[str]:
    """Labels an expression matches on or groups by."""
    names = {m for block in re.findall(r"\{([^}]*)\}", expr) for m in re.findall(r"([a-z_]+)\s*[=!]~?", block)}
    names |= {n.strip() for block in re.findall(r"\bby\s*\(([^)]*)\)", expr) for n in block.split(",")}
    return names


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, tiny_llm, embedder) -> Iterator[LiveServer]:
    with live_server("sqlite", tmp_path_factory.mktemp("mon"), tiny_llm, embedder) as server:
        yield server


def test_every_metric_the_dashboard_queries_is_exported(live: LiveServer) -> None:
    with live.admin() as c:  # traffic that moves every metric: requests, a kv query (batches, hot tier), errors
        assert c.post("/v1/banks", json={"name": "mon"}).status_code == 201
        c.put("/v1/banks/mon/documents/a", json={"text": "The Normans settled in Normandy."})
        assert c.post("/v1/banks/mon/query", json={"question": "Normans?", "max_new_tokens": 2}).status_code == 200
        c.get("/v1/banks/missing")
        text = c.get("/metrics").text
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    exported = {s.name for s in samples}
    labels = {name for s in samples for name in s.labels}
    dashboard = json.loads(DASHBOARD.read_text())
    used = set()
    for expr in exprs(dashboard):
        names = metric_names(expr)
        assert names, expr
        used |= names
        assert names <= exported, (expr, names - exported)
        assert label_names(expr) <= labels | {"le"}, expr
    # Every family server/metrics.py exports is on the dashboard.
    assert {"kvrag_requests_total", "kvrag_request_seconds_bucket", "kvrag_model_queue_depth",
            "kvrag_hot_tier_hits_total", "kvrag_hot_tier_misses_total", "kvrag_hot_tier_bytes",
            "kvrag_question_batches_total"} <= used
    assert all(p.get("datasource", {}).get("uid", "kvrag-prometheus") == "kvrag-prometheus"
               for p in dashboard["panels"] if p["type"] != "row")


def test_metric_names_parser_sees_through_promql() -> None:
    expr = ('histogram_quantile(0.95, sum by (le, route) (rate(kvrag_request_seconds_bucket{route=~"$route"}'
            '[$__rate_interval]))) / clamp_min(sum(rate(kvrag_x_total[5m])), 1e-9) or vector(0)')
    assert metric_names(expr) == {"kvrag_request_seconds_bucket", "kvrag_x_total"}
    assert label_names(expr) == {"le", "route"}
    assert metric_names("label_values(kvrag_requests_total, route)") == {"kvrag_requests_total"}


def test_compose_monitoring_profile_scrapes_with_the_admin_key() -> None:
    spec = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = spec["services"]
    assert "profiles" not in services["api"]
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"]
    prometheus = services["prometheus"]
    assert "kvrag_admin_key" in prometheus["secrets"]
    assert spec["secrets"]["kvrag_admin_key"] == {"environment": "KVRAG_ADMIN_KEY"}
    mounts = {m.split(":")[1]: m.split(":")[0] for m in prometheus["volumes"] if m.startswith("./")}
    config = yaml.safe_load((ROOT / mounts["/etc/prometheus/prometheus.yml"]).read_text())
    job = config["scrape_configs"][0]
    # Every replica is scraped itself (not through the proxy): lag and hot tier are per replica.
    assert job["metrics_path"] == "/metrics" and job["static_configs"][0]["targets"] == ["api:8000", "api2:8000"]
    assert job["authorization"] == {"type": "Bearer", "credentials_file": "/run/secrets/kvrag_admin_key"}
    grafana = services["grafana"]
    gmounts = {m.split(":")[1]: ROOT / m.split(":")[0] for m in grafana["volumes"] if m.startswith("./")}
    assert (gmounts["/var/lib/grafana/dashboards"] / "kvrag.json").is_file()
    provisioning = gmounts["/etc/grafana/provisioning"]
    source = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert source["uid"] == "kvrag-prometheus" and source["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((provisioning / "dashboards" / "kvrag.yml").read_text())["providers"][0]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    assert all(port.startswith("127.0.0.1:") for s in (prometheus, grafana) for port in s["ports"])
