"""Prometheus metrics of the HTTP ingress, served at ``GET /metrics``.

Each ingress replica owns one :class:`IngressMetrics` with its own registry (no process-global
collectors), so tests and several replicas in one process never collide. The same object keeps
the replica's last routing decisions for the catalogue page (``/ui``).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
RECENT_DECISIONS = 50
"""Routing decisions kept in memory for the catalogue's live panel."""


@dataclass(frozen=True)
class RoutedDecision:
    """One routing decision as the live panel shows it: never the query text (it is user data)."""

    at: float
    """Wall-clock time (``time.time()``)."""
    expert: str
    domain: str
    confidence: float
    abstained: bool


class IngressMetrics:
    """Counters and histograms for requests, routing, cross-checks and batching."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "mose_requests",
            "HTTP requests by endpoint, expert and status code.",
            ["endpoint", "expert", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "mose_request_latency_seconds",
            "Request latency by endpoint and expert.",
            ["endpoint", "expert"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.route_confidence = Histogram(
            "mose_route_confidence",
            "Calibrated confidence of routing decisions.",
            buckets=CONFIDENCE_BUCKETS,
            registry=self.registry,
        )
        self.abstentions = Counter(
            "mose_route_abstentions",
            "Queries the router sent to the fallback.",
            registry=self.registry,
        )
        self.crosschecks = Counter(
            "mose_crosschecks",
            "Cross-check verdicts by outcome.",
            ["flagged"],
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "mose_expert_batch_size",
            "Requests answered together in one expert-pool forward pass.",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.rejected = Counter(
            "mose_rejected",
            "Requests refused before any work, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.routed = Counter(
            "mose_routed",
            "Routing decisions of this ingress (POST /v1/route and model 'auto'), by chosen expert.",
            ["expert"],
            registry=self.registry,
        )
        self.recent: deque[RoutedDecision] = deque(maxlen=RECENT_DECISIONS)

    def observe_request(self, endpoint: str, expert: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, expert, str(status)).inc()
        self.latency.labels(endpoint, expert).observe(seconds)

    def observe_route(self, confidence: float, abstained: bool) -> None:
        self.route_confidence.observe(confidence)
        if abstained:
            self.abstentions.inc()

    def observe_decision(self, expert: str, domain: str, confidence: float, abstained: bool) -> None:
        """Count a routing decision by its expert and keep it among the recent ones."""
        self.routed.labels(expert).inc()
        self.recent.append(RoutedDecision(time.time(), expert, domain, confidence, abstained))

    def routed_counts(self) -> dict[str, int]:
        """Routing decisions so far, by chosen expert."""
        return {labels["expert"]: int(value) for labels, value in self._samples("mose_routed_total")}

    def crosscheck_counts(self) -> tuple[int, int]:
        """(flagged, all) cross-check verdicts so far."""
        counts = {labels["flagged"]: int(value) for labels, value in self._samples("mose_crosschecks_total")}
        return counts.get("true", 0), sum(counts.values())

    def _samples(self, name: str) -> list[tuple[dict[str, str], float]]:
        return [
            (sample.labels, sample.value)
            for metric in self.registry.collect()
            for sample in metric.samples
            if sample.name == name
        ]

    def render(self) -> bytes:
        return generate_latest(self.registry)
