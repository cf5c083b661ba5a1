"""Freshness: the time from a click's event time to the first response that reflects it.

For each actor the tracker remembers the newest window entry (event time and id) that a
response was already computed from, in a bounded LRU (``Settings.freshness_actors``).
When a response is computed from a window holding newer entries, each of them is seen
for the first time: ``now - event time`` goes into the ``recstream_freshness_seconds``
histogram on ``/metrics``.

An actor the tracker does not know (first request, or evicted) has no "previous
response": only entries younger than ``HORIZON_S`` are counted then, so a returning
visitor's hours-old clicks are not reported as slow.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence

from recstream.windows import WindowEntry
from serving.metrics import FRESHNESS

__all__ = ["FreshnessTracker"]

HORIZON_S = 300.0


class FreshnessTracker:
    def __init__(self, size: int) -> None:
        self.size = size
        self._newest: OrderedDict[tuple[str, str], tuple[float, str]] = OrderedDict()

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
            if previous is not None:
                if (entry.timestamp, entry.event_id) <= previous:
                    break
            elif now - entry.timestamp > HORIZON_S:
                break
            ages.append(max(0.0, now - entry.timestamp))
        head = window[0]
        newest = (head.timestamp, head.event_id)
        if previous is None or newest > previous:
            self._newest[key] = newest
        self._newest.move_to_end(key)
        while len(self._newest) > self.size:
            self._newest.popitem(last=False)
        for age in ages:
            FRESHNESS.observe(age)
        return ages
