"""Labelled Prometheus metrics on the request path: children looked up once, and
histogram observations added to the shared values in batches.

prometheus_client's ``labels()`` validates the values and takes a lock on every call,
about 3 µs; a recommendation touches a dozen labelled series (each candidate source's
latency, the HTTP route's, each Redis call's), so the lookups alone were a visible share
of a request's CPU (docs/serving-speed.md). Label values here come from fixed sets
(source names, route templates, command names), so the cache stays small.

With several API workers, prometheus_client keeps each value in a memory-mapped file
(multiprocess mode): every ``observe`` takes a lock, checks the process id and writes two
values, 7-8 µs, and a recommendation made ten of them. `observe` instead counts the
observation in a plain per-process tally (its bucket found by bisection, well under a
microsecond) and `flush` adds the tallies to the real children, at most once a
`FLUSH_EVERY_S` from `observe` itself and whenever the app serves /metrics or stops
(`flushing`), so a scrape sees every observation its own process made and the other
workers' at most a second late. Buckets and counts end up exactly what ``observe`` one
at a time gives, sums to the rounding of a float addition (tests/unit/test_prom.py).
"""

from __future__ import annotations

import contextlib
import time
from bisect import bisect_left
from collections.abc import AsyncIterator
from typing import Any, TypeVar

from prometheus_client import Histogram
from prometheus_client.metrics import MetricWrapperBase

from recstream.periodic import repeating

__all__ = ["FLUSH_EVERY_S", "child", "flush", "flushing", "observe"]

M = TypeVar("M", bound=MetricWrapperBase)

FLUSH_EVERY_S = 1.0

_CHILDREN: dict[tuple[MetricWrapperBase, tuple[str, ...]], Any] = {}
"""Keyed by the metric itself, not its ``id()``: the key keeps it alive, so a metric made
later (tests make one per registry) cannot take a freed one's address and be handed that
one's child or tally (it was: tests/unit/test_prom.py)."""


def child(metric: M, *values: str) -> M:
    """``metric.labels(*values)``, from a cache after the first call."""
    key = (metric, values)
    found: M | None = _CHILDREN.get(key)
    if found is None:
        found = _CHILDREN[key] = metric.labels(*values)
    return found


class _Tally:
    """Observations of one histogram child not yet added to it."""

    __slots__ = ("bounds", "counts", "histogram", "total")

    def __init__(self, histogram: Histogram) -> None:
        self.histogram = histogram
        # The child's own bucket bounds (the last is +Inf): `Histogram.observe` puts a
        # value in the first bucket whose bound is >= it, as `bisect_left` finds it.
        self.bounds: list[float] = list(histogram._upper_bounds)
        self.counts = [0] * len(self.bounds)
        self.total = 0.0

    def add_to_histogram(self) -> None:
        counts, total = self.counts, self.total
        self.counts, self.total = [0] * len(self.bounds), 0.0
        if not any(counts):
            return
        # What `observe` does for each value (its sum, then its bucket's count), added
        # once per bucket; prometheus_client has no public call for a batch of values.
        self.histogram._sum.inc(total)
        for bucket, count in zip(self.histogram._buckets, counts, strict=True):
            if count:
                bucket.inc(count)


_TALLIES: dict[tuple[Histogram, tuple[str, ...]], _Tally] = {}
"""Keyed by the histogram itself, as `_CHILDREN`."""
_next_flush = 0.0


def observe(metric: Histogram, value: float, *labels: str) -> None:
    """``metric.labels(*labels).observe(value)`` (or ``metric.observe`` with no labels),
    added to the shared value by the next `flush`."""
    global _next_flush
    key = (metric, labels)
    tally = _TALLIES.get(key)
    if tally is None:
        tally = _TALLIES[key] = _Tally(child(metric, *labels) if labels else metric)
    tally.counts[bisect_left(tally.bounds, value)] += 1
    tally.total += value
    now = time.monotonic()
    if now >= _next_flush:
        _next_flush = now + FLUSH_EVERY_S
        flush()


def flush() -> None:
    """Add every tally to its histogram (before a scrape, at exit, once a second)."""
    for tally in _TALLIES.values():
        tally.add_to_histogram()


@contextlib.asynccontextmanager
async def flushing(every_s: float = FLUSH_EVERY_S) -> AsyncIterator[None]:
    """Flush every ``every_s`` while the block runs (a worker that stops receiving
    requests still publishes its last second), and once more at its end."""

    async def flush_now() -> None:
        flush()

    try:
        async with repeating(every_s, flush_now, name="prom-flush"):
            yield
    finally:
        flush()
