"""recstream.prom: batched histogram observations end up as one-at-a-time ones."""

from __future__ import annotations

import asyncio
import gc
import random
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Histogram

from recstream import prom


def samples(registry: CollectorRegistry, name: str) -> dict[tuple[str, Any], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for metric in registry.collect()
        if metric.name == name
        for s in metric.samples
        if not s.name.endswith("_created")
    }


def pair(labels: tuple[str, ...] = ("source",)) -> tuple[CollectorRegistry, Histogram, Histogram]:
    registry = CollectorRegistry()
    buckets = (0.001, 0.005, 0.01, 0.1, 1.0)
    batched = Histogram("batched_seconds", "x", labels, buckets=buckets, registry=registry)
    direct = Histogram("direct_seconds", "x", labels, buckets=buckets, registry=registry)
    return registry, batched, direct


def test_buckets_counts_and_sums_equal_one_at_a_time_observations() -> None:
    registry, batched, direct = pair()
    rng = random.Random(3)
    # values on the bounds too: a bound belongs to its own bucket (`amount <= bound`)
    values = [rng.choice([0.001, 0.005, 0.1, 1.0, 5.0]) for _ in range(50)]
    values += [rng.expovariate(50) for _ in range(500)]
    for i, value in enumerate(values):
        name = ("item2item", "popularity")[i % 2]
        prom.observe(batched, value, name)
        direct.labels(name).observe(value)
    prom.flush()
    got = {
        (n.replace("batched", "direct"), labels): v
        for (n, labels), v in samples(registry, "batched_seconds").items()
    }
    want = samples(registry, "direct_seconds")
    assert got.keys() == want.keys()
    for key, value in want.items():
        if key[0].endswith("_sum"):
            assert got[key] == pytest.approx(value, rel=1e-12)
        else:
            assert got[key] == value, key  # bucket and count: exactly
    # nothing is added twice by a second flush
    prom.flush()
    assert (
        samples(registry, "batched_seconds")[("batched_seconds_count", (("source", "item2item"),))]
        == want[("direct_seconds_count", (("source", "item2item"),))]
    )


def test_unlabelled_histogram_and_the_once_a_second_flush(monkeypatch: pytest.MonkeyPatch) -> None:
    registry, batched, _ = pair(labels=())
    clock = [1000.0]
    monkeypatch.setattr("recstream.prom.time.monotonic", lambda: clock[0])
    monkeypatch.setattr(prom, "_next_flush", 0.0)
    prom.observe(batched, 0.002)  # the first observation after start flushes at once
    prom.observe(batched, 0.003)
    count = ("batched_seconds_count", ())
    assert samples(registry, "batched_seconds")[count] == 1  # the second waits
    clock[0] += prom.FLUSH_EVERY_S
    prom.observe(batched, 0.004)
    assert samples(registry, "batched_seconds")[count] == 3


async def test_flushing_publishes_an_idle_process_and_flushes_at_the_end() -> None:
    registry, batched, _ = pair()
    count = ("batched_seconds_count", (("source", "als"),))
    async with prom.flushing(every_s=0.05):
        prom.flush()
        prom.observe(batched, 0.5, "als")  # within the second: kept in the tally
        assert samples(registry, "batched_seconds").get(count, 0) == 0
        await asyncio.sleep(0.2)  # the background flush
        assert samples(registry, "batched_seconds")[count] == 1
        prom.observe(batched, 0.5, "als")
    assert samples(registry, "batched_seconds")[count] == 2  # the last flush, at exit


def test_a_histogram_at_a_freed_ones_address_gets_its_own_child_and_tally() -> None:
    """Python reuses a freed object's address: when the caches were keyed by ``id()``, a
    histogram made after another was freed could be handed that one's child and tally,
    and its observations went to the dead registry (this test's registry saw none). So
    this file's tests could fail when other tests' metrics had been freed before them."""
    addresses: set[int] = set()
    reused = 0
    for _ in range(50):
        registry, batched, direct = pair()
        reused += id(batched) in addresses
        addresses.add(id(batched))
        prom.observe(batched, 0.002, "x")
        prom.child(direct, "x").observe(0.002)
        prom.flush()
        got = samples(registry, "batched_seconds")
        assert got[("batched_seconds_count", (("source", "x"),))] == 1
        assert (
            samples(registry, "direct_seconds")[("direct_seconds_count", (("source", "x"),))] == 1
        )
        del registry, batched, direct
        gc.collect()
    # (an address met twice: only then could the old keys collide; with the metric itself
    # as the key it stays alive and its address is never handed out again)
    assert reused == 0
