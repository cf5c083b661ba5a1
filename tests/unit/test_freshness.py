"""The freshness tracker: each click counted once, by the first response that reflects
it, from its acceptance by the stream; and the recent p50/p95 gauges over the newest
observations."""

from __future__ import annotations

import time

import pytest
from prometheus_client import REGISTRY

from recstream.windows import WindowEntry
from serving.pipeline.freshness import RECENT_S, FreshnessTracker
from streams.schema import Event


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def gauge(quantile: str) -> float | None:
    return REGISTRY.get_sample_value("recstream_freshness_recent_seconds", {"quantile": quantile})


def clicks(ages: list[float], prefix: str) -> list[WindowEntry]:
    """Entries this many seconds old, newest first."""
    now = time.time()
    return [
        WindowEntry(
            item_id=f"i{n}", event_type="click", timestamp=now - age, event_id=f"{prefix}{n}"
        )
        for n, age in sorted(enumerate(ages), key=lambda pair: pair[1])
    ]


def test_each_click_is_counted_once_and_the_recent_quantiles_published() -> None:
    clock = Clock()
    tracker = FreshnessTracker(100, clock=clock)
    # twenty clicks, 0.1 s to 2.0 s old, reflected by one response
    ages = [round(0.1 * n, 1) for n in range(1, 21)]
    window = clicks(ages, "a")
    seen = tracker.observe("ns", "alice", window)
    assert sorted(round(a, 1) for a in seen) == ages
    assert tracker.observe("ns", "alice", window) == []  # already reflected
    assert gauge("0.5") is not None
    assert round(gauge("0.5") or 0, 1) == 1.0  # the 10th of 20
    assert round(gauge("0.95") or 0, 1) == 1.9  # the 19th of 20
    # gauges move at most once a second, and forget what is older than RECENT_S
    clock.t += RECENT_S + 1
    tracker.observe("ns", "bob", clicks([5.0], "b"))
    assert round(gauge("0.5") or 0, 1) == 5.0
    assert round(gauge("0.95") or 0, 1) == 5.0
    clock.t += 0.5
    tracker.observe("ns", "carol", clicks([0.2], "c"))
    assert round(gauge("0.95") or 0, 1) == 5.0  # not yet republished
    recent = tracker.quantiles(clock.t)
    assert (round(recent[0.5], 1), round(recent[0.95], 1)) == (0.2, 5.0)


def test_an_entry_keeps_its_acceptance_when_it_is_a_second_or_more_from_its_event_time() -> None:
    now = time.time()
    late = Event(
        event_id="late", event_type="click", user_id="u", item_id="i", timestamp=now - 3600
    )
    late.mark_accepted(now)
    on_time = Event(event_id="ok", event_type="click", user_id="u", item_id="i", timestamp=now)
    on_time.mark_accepted(now + 0.4)
    unread = Event(event_id="new", event_type="click", user_id="u", item_id="i", timestamp=now)
    assert "accepted" not in late.to_json().decode()
    for event, lag in ((late, 3600.0), (on_time, None), (unread, None)):
        raw = WindowEntry.encode(event)
        assert raw == WindowEntry.of(event).dumps()
        entry = WindowEntry.loads(raw)
        assert entry.lag_s == (pytest.approx(lag, abs=0.001) if lag is not None else None)
        assert entry.accepted_at == pytest.approx(now if event is late else event.timestamp)


def test_freshness_counts_from_the_acceptance() -> None:
    """A click stamped an hour ago by its client but accepted 0.3 s ago is 0.3 s old:
    the pipeline's delay, not the client's."""
    now = time.time()
    entry = WindowEntry("i", "click", now - 3600, "late", lag_s=3600 - 0.3)
    (age,) = FreshnessTracker(10).observe("ns", "dave", [entry])
    assert age == pytest.approx(0.3, abs=0.05)
