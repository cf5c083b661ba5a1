"""Prometheus metrics of the API, served at ``GET /metrics``."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

__all__ = [
    "EVENTS",
    "FRESHNESS",
    "RANK_DEGRADED",
    "RANK_LATENCY",
    "SERVED_LOG_DROPPED",
    "SOURCE_LATENCY",
]

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

SERVED_LOG_DROPPED = Counter(
    "recstream_served_log_dropped_total",
    "Served lists not recorded for attribution (too many writes pending, or Redis failed).",
)
FRESHNESS = Histogram(
    "recstream_freshness_seconds",
    "Time from a click's event time to the first recommendation response that reflects it.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0),
)
SOURCE_LATENCY = Histogram(
    "recstream_candidate_source_seconds",
    "Time one candidate source took (including the ones that missed their deadline).",
    ["source"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1),
)
