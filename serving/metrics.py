"""Prometheus metrics of the API, served at ``GET /metrics``."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

__all__ = ["EVENTS", "RANK_DEGRADED", "RANK_LATENCY"]

EVENTS = Counter(
    "recstream_collector_events_total",
    "Events posted to the collector, by outcome (accepted, rejected, failed).",
    ["outcome"],
)
RANK_LATENCY = Histogram(
    "recstream_ranking_seconds",
    "Time to answer one recommendation request.",
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0),
)
RANK_DEGRADED = Counter(
    "recstream_ranking_degraded_total",
    "Recommendation requests answered without a store that missed its deadline.",
    ["store"],
)
