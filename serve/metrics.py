"""Prometheus metrics of the HTTP ingress, served at ``GET /metrics``.

Each ingress replica owns one :class:`IngressMetrics` with its own registry (no process-global
collectors), so tests and several replicas in one process never collide.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)


class IngressMetrics:
    """Counters and histograms for requests, routing, cross-checks and batching."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "mose_requests", "HTTP requests by endpoint, expert and status code.",
            ["endpoint", "expert", "status"], registry=self.registry,
        )
        self.latency = Histogram(
            "mose_request_latency_seconds", "Request latency by endpoint and expert.",
            ["endpoint", "expert"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.route_confidence = Histogram(
            "mose_route_confidence", "Calibrated confidence of routing decisions.",
            buckets=CONFIDENCE_BUCKETS, registry=self.registry,
        )
        self.abstentions = Counter(
            "mose_route_abstentions", "Queries the router sent to the fallback.", registry=self.registry,
        )
        self.crosschecks = Counter(
            "mose_crosschecks", "Cross-check verdicts by outcome.", ["flagged"], registry=self.registry,
        )
        self.batch_size = Histogram(
            "mose_expert_batch_size", "Requests answered together in one expert-pool forward pass.",
            buckets=BATCH_BUCKETS, registry=self.registry,
        )
        self.rejected = Counter(
            "mose_rejected", "Requests refused before any work, by reason.", ["reason"], registry=self.registry,
        )

    def observe_request(self, endpoint: str, expert: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, expert, str(status)).inc()
        self.latency.labels(endpoint, expert).observe(seconds)

    def observe_route(self, confidence: float, abstained: bool) -> None:
        self.route_confidence.observe(confidence)
        if abstained:
            self.abstentions.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
