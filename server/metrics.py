"""Prometheus metrics, in a registry of their own per app (several apps can live in one process)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from kvstore.memory.budget import KINDS
from kvstore.memory.hot import HotCache
from kvstore.model.batching import BatchStats


class _HotTierCollector(Collector):
    """Hot-tier hits, misses, bytes held and byte budget, read from the cache itself at scrape time."""

    def __init__(self, hot: Callable[[], HotCache | None]) -> None:
        self._hot = hot

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        hot = self._hot()
        hits = CounterMetricFamily("kvrag_hot_tier_hits", "Decoded blocks served from the hot tier.")
        misses = CounterMetricFamily("kvrag_hot_tier_misses", "Block loads that missed the hot tier.")
        hits.add_metric([], float(hot.hits if hot else 0))
        misses.add_metric([], float(hot.misses if hot else 0))
        yield hits
        yield misses
        held = GaugeMetricFamily("kvrag_hot_tier_bytes", "Bytes of decoded blocks held in the hot tier.")
        budget = GaugeMetricFamily("kvrag_hot_tier_budget_bytes", "The hot tier's byte budget.")
        held.add_metric([], float(hot.nbytes if hot else 0))
        budget.add_metric([], float(hot.budget_bytes if hot else 0))
        yield held
        yield budget
        # The hot tier is one kind of the process's KV budget (kvstore.memory.budget): every kind, and the cap.
        kinds = GaugeMetricFamily("kvrag_kv_memory_bytes", "Bytes of KV kept in memory, per kind.", labels=["kind"])
        for kind in KINDS:
            kinds.add_metric([kind], float(hot.kv.kind_nbytes(kind) if hot else 0))
        cap = GaugeMetricFamily("kvrag_kv_memory_budget_bytes", "The byte budget of all KV kept in memory.")
        cap.add_metric([], float(hot.kv.total_bytes if hot else 0))
        yield kinds
        yield cap


class _BatchCollector(Collector):
    """Question batches run, the kv queries they answered and the largest batch, read at scrape time."""

    def __init__(self, stats: Callable[[], BatchStats | None]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        stats = self._stats() or BatchStats()
        batches = CounterMetricFamily("kvrag_question_batches", "Model runs of kv questions (a lone one included).")
        requests = CounterMetricFamily("kvrag_question_batch_requests", "kv queries answered by those runs.")
        largest = GaugeMetricFamily("kvrag_question_batch_largest", "The most kv queries one run answered.")
        batches.add_metric([], float(stats.batches))
        requests.add_metric([], float(stats.requests))
        largest.add_metric([], float(stats.largest))
        yield batches
        yield requests
        yield largest


class _ReplicaCollector(Collector):
    """A replica's op-log follower (PostgreSQL catalog) and its blob store's object fetches and cache, read at
    scrape time. Nothing is exported for what this process does not have (SQLite, local files)."""

    def __init__(self, store: Callable[[], Any]) -> None:
        self._store = store

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        store = self._store()
        replication = getattr(store, "replication", None) if store is not None else None
        if replication is not None:
            follower = replication.follower
            through = GaugeMetricFamily("kvrag_replica_oplog_through", "Op-log seq up to which every change is in "
                                                                       "this replica's indexes.")
            through.add_metric([], float(follower.through))
            age = GaugeMetricFamily("kvrag_replica_catchup_age_seconds", "Seconds since this replica last caught "
                                                                         "up with the op log (alert above the "
                                                                         "staleness bound).")
            age.add_metric([], time.monotonic() - follower.last_caught_up)
            applied = CounterMetricFamily("kvrag_replica_ops_applied", "Other replicas' op-log entries applied here.")
            applied.add_metric([], float(follower.ops_applied))
            yield through
            yield age
            yield applied
        stats = getattr(getattr(store, "blobs", None), "stats", None)
        if callable(stats):  # an object store: fetches (cache misses) and the cache in front of it
            for name, value in stats().items():
                kind = GaugeMetricFamily if name == "cache_bytes" else CounterMetricFamily
                family = kind(f"kvrag_blob_{name}", f"Object store blob {name.replace('_', ' ')}.")
                family.add_metric([], float(value))
                yield family


class Metrics:
    """Request counts and latency per route, model queue depth, hot-tier hits, misses and bytes, question
    batches (their mean size is requests / batches)."""

    def __init__(self, queue_depth: Callable[[], float], hot: Callable[[], HotCache | None],
                 batches: Callable[[], BatchStats | None] = lambda: None,
                 store: Callable[[], Any] = lambda: None) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("kvrag_requests", "HTTP requests answered.", ["method", "route", "status"],
                                registry=self.registry)
        self.latency = Histogram("kvrag_request_seconds", "HTTP request latency.", ["method", "route"],
                                 registry=self.registry)
        self.queue_depth = Gauge("kvrag_model_queue_depth", "Model work waiting or running.", registry=self.registry)
        self.queue_depth.set_function(queue_depth)
        self.registry.register(_HotTierCollector(hot))
        self.registry.register(_BatchCollector(batches))
        self.registry.register(_ReplicaCollector(store))

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one answered request."""
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)

    def render(self) -> bytes:
        """The exposition text."""
        return generate_latest(self.registry)
