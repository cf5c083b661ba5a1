"""Labelled Prometheus metrics on the request path, their children looked up once.

prometheus_client's ``labels()`` validates the values and takes a lock on every call,
about 3 µs; a recommendation touches a dozen labelled series (each candidate source's
latency, the HTTP route's, each Redis call's), so the lookups alone were a visible share
of a request's CPU (docs/serving-speed.md). Label values here come from fixed sets
(source names, route templates, command names), so the cache stays small.
"""

from __future__ import annotations

from typing import Any, TypeVar

from prometheus_client.metrics import MetricWrapperBase

__all__ = ["child"]

M = TypeVar("M", bound=MetricWrapperBase)

_CHILDREN: dict[tuple[int, tuple[str, ...]], Any] = {}


def child(metric: M, *values: str) -> M:
    """``metric.labels(*values)``, from a cache after the first call."""
    key = (id(metric), values)
    found: M | None = _CHILDREN.get(key)
    if found is None:
        found = _CHILDREN[key] = metric.labels(*values)
    return found
