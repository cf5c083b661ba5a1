"""Freshness: the time from a click's acceptance to the first response that reflects it.

The acceptance is the stream's arrival time of the event's record, which the agents keep
in the window entry when it is a second or more from the event time (`WindowEntry.lag_s`:
a client's own timestamp, a replay of old events); otherwise the event time stands for
it.

For each actor the tracker remembers the newest window entry (event time and id) that a
response was already computed from, in a bounded LRU (``Settings.freshness_actors``).
When a response is computed from a window holding newer entries, each of them is seen
for the first time: ``now - acceptance`` goes into the ``recstream_freshness_seconds``
histogram on ``/metrics``, and into a ring of the newest observations whose p50 and p95
the ``recstream_freshness_recent_seconds{quantile}`` gauges show (a histogram's quantiles
need a query; these are readable on the page itself).

An actor the tracker does not know (first request, or evicted) has no "previous
response": only entries accepted within ``HORIZON_S`` are counted then, so a returning
visitor's hours-old clicks are not reported as slow.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence

from recstream.windows import WindowEntry
from serving.metrics import FRESHNESS, FRESHNESS_RECENT

__all__ = ["FreshnessTracker"]

HORIZON_S = 300.0
RECENT = 1024
"""How many of the newest observations the quantile gauges are computed over..."""
RECENT_S = 300.0
"""...and how old they may be."""
QUANTILES = (0.5, 0.95)


class FreshnessTracker:
    def __init__(self, size: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.size = size
        self.clock = clock
        self._newest: OrderedDict[tuple[str, str], tuple[float, str]] = OrderedDict()
        self._recent: deque[tuple[float, float]] = deque(maxlen=RECENT)
        self._published = float("-inf")

    def observe(self, namespace: str, actor: str, window: Sequence[WindowEntry]) -> list[float]:
        """Record the entries ``window`` (newest first) reflects for the first time and
        return their ages in seconds."""
        if not window:
            return []
        key = (namespace, actor)
        now = time.time()
        previous = self._newest.get(key)
        ages: list[float] = []
        for entry in window:
            # (the window is in event-time order; ages count from the acceptance)
            if previous is not None:
                if (entry.timestamp, entry.event_id) <= previous:
                    break
            elif now - entry.accepted_at > HORIZON_S:
                continue
            ages.append(max(0.0, now - entry.accepted_at))
        head = window[0]
        newest = (head.timestamp, head.event_id)
        if previous is None or newest > previous:
            self._newest[key] = newest
        self._newest.move_to_end(key)
        while len(self._newest) > self.size:
            self._newest.popitem(last=False)
        if ages:
            at = self.clock()
            for age in ages:
                FRESHNESS.observe(age)
                self._recent.append((at, age))
            if at - self._published >= 1.0:
                self._published = at
                for quantile, value in self.quantiles(at).items():
                    FRESHNESS_RECENT.labels(str(quantile)).set(value)
        return ages

    def quantiles(self, at: float) -> dict[float, float]:
        """p50 and p95 of the observations of the last `RECENT_S` (nearest rank)."""
        ages = sorted(age for when, age in self._recent if at - when <= RECENT_S)
        if not ages:
            return {}
        return {q: ages[max(0, math.ceil(q * len(ages)) - 1)] for q in QUANTILES}
