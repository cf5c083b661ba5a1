"""One contract for each store interface, run against the real store and the in-memory one."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from agents.retry import RecordsRefused
from agents.state import APPLY_CHUNK, HotStore, MemoryHotStore, RedisHotStore, by_actor
from recstream.aws import async_client
from recstream.keys import Keys
from recstream.settings import Settings
from recstream.windows import DurableWindows, DynamoWindows, MemoryDurableWindows, WindowEntry
from streams.schema import Event

T0 = 1_700_000_000.0


def ev(n: int, user: str = "u1", item: str | None = None, kind: str = "click", **kw: Any) -> Event:
    return Event(
        event_id=f"e{n}",
        event_type=kind,
        user_id=user,
        item_id=item or f"i{n}",
        timestamp=T0 + n,
        **kw,
    )


@pytest.fixture(params=["redis", "memory"])
async def hot(request: pytest.FixtureRequest, settings: Settings) -> AsyncIterator[HotStore]:
    small = settings.model_copy(update={"window_size": 5, "popularity_cap": 3})
    if request.param == "memory":
        yield MemoryHotStore(small)
        return
    client = aioredis.from_url(settings.redis_url)
    try:
        yield RedisHotStore(client, small)
    finally:
        await client.aclose()


async def test_window_is_newest_first_and_capped(hot: HotStore, settings: Settings) -> None:
    events = [ev(n, namespace=settings.namespace) for n in range(8)]
    await hot.apply(events)
    window = await hot.window(settings.namespace, "u1")
    assert [e.item_id for e in window] == ["i7", "i6", "i5", "i4", "i3"]
    assert window[0] == WindowEntry("i7", "click", T0 + 7, "e7")


async def test_replayed_events_change_nothing(hot: HotStore, settings: Settings) -> None:
    events = [ev(n, item="x" if n % 2 else "y", namespace=settings.namespace) for n in range(4)]
    first = await hot.apply(events)
    again = await hot.apply(events[1:])  # a crash mid-batch replays the tail
    assert (first.applied, first.duplicates) == (4, 0)
    assert (again.applied, again.duplicates) == (0, 3)
    assert len(await hot.window(settings.namespace, "u1")) == 4
    assert dict(await hot.popular(settings.namespace, 10)) == {"x": 2.0, "y": 2.0}


async def test_popularity_is_weighted_and_capped(hot: HotStore, settings: Settings) -> None:
    ns = settings.namespace
    events = [
        ev(1, item="a", kind="purchase", namespace=ns),  # 5
        ev(2, item="b", kind="add_to_cart", namespace=ns),  # 3
        ev(3, item="c", kind="view", namespace=ns),  # 1
        ev(4, item="c", kind="view", namespace=ns),  # 2
        ev(5, item="d", kind="like", namespace=ns),  # 2; cap 3 evicts the least recent, a
    ]
    await hot.apply(events)
    assert await hot.popular(ns, 10) == [("b", 3.0), ("d", 2.0), ("c", 2.0)]


async def test_a_new_item_can_enter_a_full_popularity_set(
    hot: HotStore, settings: Settings
) -> None:
    ns = settings.namespace
    await hot.apply([ev(n, item=f"old{n % 3}", kind="purchase", namespace=ns) for n in range(30)])
    await hot.apply([ev(100 + n, item="new-hit", namespace=ns) for n in range(3)])
    popular = dict(await hot.popular(ns, 10))
    assert popular["new-hit"] == 3.0
    assert len(popular) == 3


async def test_namespaces_are_isolated(hot: HotStore, settings: Settings) -> None:
    await hot.apply([ev(1, namespace=f"{settings.namespace}-a")])
    await hot.apply([ev(1, namespace=f"{settings.namespace}-b", item="other")])
    a = await hot.window(f"{settings.namespace}-a", "u1")
    b = await hot.window(f"{settings.namespace}-b", "u1")
    assert [e.item_id for e in a] == ["i1"]
    assert [e.item_id for e in b] == ["other"]


async def test_every_redis_key_has_a_ttl_or_a_cap(settings: Settings) -> None:
    client = aioredis.from_url(settings.redis_url)
    try:
        store = RedisHotStore(client, settings)
        await store.apply([ev(n, namespace=settings.namespace) for n in range(3)])
        keys = Keys(settings.namespace)
        found = [k.decode() async for k in client.scan_iter(match=f"{keys.prefix}*")]
        assert found
        for key in found:
            if key in (keys.popularity, keys.popularity_touched):
                continue  # capped at Settings.popularity_cap, checked above
            assert await client.ttl(key) > 0, key
    finally:
        await client.aclose()


@pytest.fixture(params=["dynamodb", "memory"])
async def durable(
    request: pytest.FixtureRequest, settings: Settings
) -> AsyncIterator[DurableWindows]:
    if request.param == "memory":
        yield MemoryDurableWindows()
        return
    async with async_client(settings, "dynamodb") as client:
        yield DynamoWindows(client, settings)


async def test_durable_windows_round_trip(durable: DurableWindows, settings: Settings) -> None:
    ns = settings.namespace
    entries = [WindowEntry(f"i{n}", "click", T0 + n, f"e{n}", 4.5, "rec-1") for n in range(30)]
    windows = {(ns, f"user{u}"): entries[u:] for u in range(30)}  # > 25: two BatchWrite calls
    await durable.put(windows)
    await durable.put(windows)  # idempotent
    assert await durable.get(ns, "user3") == entries[3:]
    assert await durable.get(ns, "nobody") is None
    assert await durable.get(f"{ns}-other", "user3") is None


async def test_dedup_memory_is_capped_per_actor(hot: HotStore, settings: Settings) -> None:
    ns = settings.namespace
    cap = settings.dedup_per_actor
    events = [ev(n, namespace=ns) for n in range(cap + 10)]
    await hot.apply(events)
    again = await hot.apply(events[-cap:])  # the latest `cap` ids are remembered
    assert again.applied == 0
    oldest = await hot.apply(events[:1])  # the oldest id was forgotten: bounded memory
    assert oldest.applied == 1


async def test_a_redis_that_lost_its_scripts_is_given_them_again(settings: Settings) -> None:
    """A restarted Redis (or SCRIPT FLUSH) answers NOSCRIPT to every chunk of a batch: the
    store loads its script and applies the batch again, each event once."""
    client = aioredis.from_url(settings.redis_url)
    try:
        store = RedisHotStore(client, settings)
        ns = settings.namespace
        first = await store.apply([ev(n, namespace=ns) for n in range(3)])
        await client.script_flush()
        again = await store.apply([ev(n, namespace=ns) for n in range(250)])  # 3 chunks
        assert (first.applied, again.applied, again.duplicates) == (3, 247, 3)
        assert len(await store.window(ns, "u1", 300)) == settings.window_size
        # the connection the failed chunks were read from is not handed out dirty
        assert await client.ping()
    finally:
        await client.aclose()


def test_a_batch_runs_each_actors_events_together_in_their_order() -> None:
    events = [ev(0, "a"), ev(1, "b"), ev(2, "a"), ev(3, "c"), ev(4, "b"), ev(5, "a")]
    events.append(ev(6, "a", namespace="other"))  # another namespace: another actor
    assert by_actor(events) == [0, 2, 5, 1, 4, 3, 6]


async def _calls(client: aioredis.Redis, command: str) -> int:
    stats: dict[str, Any] = await client.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


async def test_an_actor_spread_over_a_batch_is_read_once_per_batch(settings: Settings) -> None:
    """A shard interleaves its actors: two actors' events alternating over two chunks
    are run actor by actor, so each window's head is read once (one LINDEX per window
    and chunk), not once in each chunk; the outcomes keep the batch's positions."""
    client = aioredis.from_url(settings.redis_url)
    try:
        store = RedisHotStore(client, settings)
        ns = settings.namespace
        events = [ev(n, f"u{n % 2}", namespace=ns) for n in range(2 * APPLY_CHUNK)]
        await store.apply(events[:2])  # both windows exist: the batch reads their heads
        before = await _calls(client, "lindex")
        result = await store.apply(events)
        assert await _calls(client, "lindex") - before == 2
        assert (result.applied, result.duplicates) == (2 * APPLY_CHUNK - 2, 2)
        window = await store.window(ns, "u1", 3)
        assert [e.event_id for e in window] == [f"e{n}" for n in (199, 197, 195)]
    finally:
        await client.aclose()


async def test_refused_events_are_named_at_their_place_in_the_batch(settings: Settings) -> None:
    client = aioredis.from_url(settings.redis_url)
    try:
        store = RedisHotStore(client, settings)
        ns = settings.namespace
        await client.set(Keys(ns).window("bad"), "not a list")  # WRONGTYPE for its events
        events = [ev(n, "bad" if n % 3 == 1 else "good", namespace=ns) for n in range(7)]
        with pytest.raises(RecordsRefused) as refused:
            await store.apply(events)
        assert refused.value.items == (1, 4)
        assert len(await store.window(ns, "good")) == 5
    finally:
        await client.aclose()
