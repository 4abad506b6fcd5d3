"""Prometheus metrics in a registry per app (tests can build many apps in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "metaembed_requests", "HTTP requests by route and status", ["route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "metaembed_request_seconds", "request latency", ["route"], buckets=LATENCY_BUCKETS, registry=self.registry
        )
        self.batch_items = Histogram(
            "metaembed_encode_batch_items", "items per encode batch", buckets=BATCH_BUCKETS, registry=self.registry
        )
        self.batch_seconds = Histogram(
            "metaembed_encode_batch_seconds", "time per encode batch", buckets=LATENCY_BUCKETS, registry=self.registry
        )
        self.queue_depth = Gauge("metaembed_encode_queue_depth", "encode jobs waiting", registry=self.registry)
        self.index_items = Gauge("metaembed_index_items", "items in the index", registry=self.registry)

    def observe_batch(self, items: int, seconds: float) -> None:
        self.batch_items.observe(items)
        self.batch_seconds.observe(seconds)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
