"""The live lists' cache (serving/pipeline/live.py) on real Redis: fresh lists from
memory, expired ones served while one background read refreshes them, one read per list
however many requests want it, and the last lists kept when Redis stops answering."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from recstream.decay import ForwardDecay
from recstream.errors import StoreUnavailable
from recstream.keys import Keys
from serving.pipeline.candidates import Sources
from serving.pipeline.detach import Reads, cancel_detached
from serving.pipeline.live import LiveLists
from serving.pipeline.ranker import Ranker
from serving.pipeline.shortlist import shortlist
from tests.conftest import LocalStack
from tests.serving.helpers import roomy

EPOCH = 1_000_000_020.0
"""The decay's epoch and the requests' clock: the live scores as they are."""


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
async def redis(local_stack: LocalStack) -> AsyncIterator[tuple[str, aioredis.Redis, Reads]]:
    """A fresh namespace (each test's keys are its own), a client and the set of reads
    started, which are ended after the test."""
    settings = roomy(local_stack)
    client = aioredis.from_url(settings.redis_url)
    reads: Reads = set()
    try:
        yield settings.namespace, client, reads
    finally:
        await cancel_detached(reads)
        await client.aclose()


def counting(lists: LiveLists) -> list[list[str]]:
    """The keys of every read ``lists`` makes from now on."""
    made: list[list[str]] = []
    fetch = lists._fetch

    async def wrapper(keys: list[str], n: int) -> Any:
        made.append(list(keys))
        return await fetch(keys, n)

    lists._fetch = wrapper  # type: ignore[method-assign]
    return made


async def test_expired_lists_are_served_while_one_read_refreshes_them(
    redis: tuple[str, aioredis.Redis, Reads],
) -> None:
    namespace, client, reads = redis
    clock = Clock()
    lists = LiveLists(client, reads, ttl=1.0, max_stale=30.0, clock=clock)
    made = counting(lists)
    key = f"{namespace}:test:pop"
    await client.zadd(key, {"a": 3, "b": 2, "c": 1})
    assert lists.now([key], 2) is None  # never read: the request must wait
    assert await lists.get([key], 2) == [[("a", 3.0), ("b", 2.0)]]
    assert made == [[key]]
    await client.zadd(key, {"d": 9})
    clock.t += 0.5
    assert lists.now([key], 2) == [[("a", 3.0), ("b", 2.0)]]  # fresh: no read
    assert made == [[key]]
    clock.t += 0.6
    # expired: served at once, and one read (not one per caller) refreshes it
    assert lists.now([key], 2) == [[("a", 3.0), ("b", 2.0)]]
    assert lists.now([key], 2) == [[("a", 3.0), ("b", 2.0)]]
    assert len(reads) == 1
    await asyncio.gather(*reads)
    assert made == [[key], [key]]
    assert lists.now([key], 2) == [[("d", 9.0), ("a", 3.0)]]
    # too old to serve: read while the request waits
    clock.t += 31
    assert lists.now([key], 2) is None


async def test_concurrent_requests_for_an_unread_list_share_one_read(
    redis: tuple[str, aioredis.Redis, Reads],
) -> None:
    namespace, client, reads = redis
    lists = LiveLists(client, reads)
    made = counting(lists)
    one, two = f"{namespace}:test:one", f"{namespace}:test:two"
    await client.zadd(one, {"a": 1})
    await client.zadd(two, {"b": 2})
    answers = await asyncio.gather(
        *(lists.get([one], 5) for _ in range(20)), lists.get([one, two], 5)
    )
    assert answers[0] == [[("a", 1.0)]]
    assert answers[-1] == [[("a", 1.0)], [("b", 2.0)]]
    # the first caller reads `one`; the last joins that read and reads only `two`
    assert made == [[one], [two]]


async def test_the_last_lists_keep_serving_when_redis_stops_answering(
    redis: tuple[str, aioredis.Redis, Reads],
) -> None:
    namespace, client, reads = redis
    clock = Clock()
    lists = LiveLists(client, reads, ttl=1.0, max_stale=30.0, clock=clock)
    key = f"{namespace}:test:pop"
    await client.zadd(key, {"a": 1})
    assert await lists.get([key], 5) == [[("a", 1.0)]]
    # the same cache over a Redis that does not answer
    lists.redis = aioredis.from_url("redis://127.0.0.1:1", socket_connect_timeout=1)
    try:
        clock.t += 5
        assert lists.now([key], 5) == [[("a", 1.0)]]
        await asyncio.gather(*reads, return_exceptions=True)
        assert lists.now([key], 5) == [[("a", 1.0)]]  # the failed refresh kept it
        with pytest.raises(StoreUnavailable, match="reading"):
            await lists.get([f"{key}:other"], 5)
    finally:
        await lists.redis.aclose()


async def test_a_live_lists_cut_is_made_once_per_read_and_not_changed_by_requests(
    redis: tuple[str, aioredis.Redis, Reads],
) -> None:
    """Popularity and trending hand every request the same dict of a list's cut until
    the list is read again (it was rebuilt per request); a request's later stages only
    read it, so the next request gets what Redis held."""
    namespace, client, reads = redis
    clock = Clock()
    sources = Sources(client, 60.0, reads, decay=ForwardDecay(EPOCH, 86400.0))
    sources.lists = LiveLists(client, reads, ttl=1.0, max_stale=30.0, clock=clock)
    key = Keys(namespace).popularity_decayed
    await client.zadd(key, {"a": 3, "b": 2, "c": 1.5, "d": 1})
    first = await sources.popular(namespace, None, None, 3, EPOCH)
    second = sources.popular_now(namespace, None, None, 3, EPOCH)
    assert second is not None
    assert second.scores is first.scores  # one dict for both requests
    assert list(first.scores.items()) == [("a", 3.0), ("b", 2.0), ("c", 1.5)]
    other = await sources.popular(namespace, None, None, 2, EPOCH)  # another cut: its own
    assert list(other.scores) == ["a", "b"]
    restricted = sources.popular_now(namespace, None, {"c", "d"}, 3, EPOCH)
    assert restricted is not None
    assert restricted.scores == {"c": 1.5}
    # a whole pipeline pass over the shared dict leaves it as it was
    shortlisted = shortlist([first], {"popularity": 1.0}, 1, {"b"}, "exclude")
    Ranker._merge(shortlisted)
    assert list(first.scores.items()) == [("a", 3.0), ("b", 2.0), ("c", 1.5)]
    await client.zadd(key, {"e": 9})
    clock.t += 31  # too old: read again, cut again
    fresh = await sources.popular(namespace, None, None, 3, EPOCH)
    assert fresh.scores is not first.scores
    assert list(fresh.scores.items()) == [("e", 9.0), ("a", 3.0), ("b", 2.0)]


async def test_an_expired_empty_list_is_read_while_the_request_waits(
    redis: tuple[str, aioredis.Redis, Reads],
) -> None:
    """Stale emptiness is not served: the lists read before the first events (a start-up
    warm-up) would otherwise answer a new visitor with nothing for ``max_stale``."""
    namespace, client, reads = redis
    clock = Clock()
    lists = LiveLists(client, reads, ttl=1.0, max_stale=30.0, clock=clock)
    made = counting(lists)
    key = f"{namespace}:test:empty-at-first"
    assert await lists.get([key], 2) == [[]]
    await client.zadd(key, {"a": 1})
    clock.t += 0.5
    assert lists.now([key], 2) == [[]]  # fresh: served from memory, empty
    clock.t += 0.6
    assert lists.now([key], 2) is None  # expired and empty: the request must wait
    assert await lists.get([key], 2) == [[("a", 1.0)]]
    assert made == [[key], [key]]


async def test_forget_empty_drops_only_the_empty_lists(
    redis: tuple[str, aioredis.Redis, Reads],
) -> None:
    """The start-up warm-up's answer reads the lists of a fresh install, empty: they are
    dropped after it, so the first events are served at once, not after ``ttl``."""
    namespace, client, reads = redis
    lists = LiveLists(client, reads, ttl=30.0, clock=Clock())
    full, empty = f"{namespace}:test:full", f"{namespace}:test:empty"
    await client.zadd(full, {"a": 1})
    assert await lists.get([full, empty], 2) == [[("a", 1.0)], []]
    assert lists.forget_empty() == 1
    await client.zadd(empty, {"b": 2})
    assert lists.now([full], 2) == [[("a", 1.0)]]  # kept
    assert lists.now([empty], 2) is None  # must be read: not served empty from memory
    assert await lists.get([empty], 2) == [[("b", 2.0)]]
