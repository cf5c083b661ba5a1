"""The attribution agent on real Redis and DynamoDB (moto): what counts, and only once."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from agents.attribution import CLOCK_SKEW_S, AttributionAgent, DynamoCounters
from recstream.aws import sync_client
from recstream.keys import Keys
from recstream.served import ServedLog, log_served, served_record
from recstream.settings import Settings
from recstream.stores import open_stores
from streams.schema import Event

NOW = time.time()


@pytest.fixture
async def agent(settings: Settings) -> AsyncIterator[AttributionAgent]:
    async with open_stores(settings) as stores:
        yield AttributionAgent(stores.redis, DynamoCounters(stores.dynamodb, settings), settings)


def event(settings: Settings, n: int | str, kind: str = "click", **fields: Any) -> bytes:
    values: dict[str, Any] = {
        "event_id": f"e{n}",
        "event_type": kind,
        "user_id": "u1",
        "timestamp": NOW,
        "namespace": settings.namespace,
        **fields,
    }
    return Event(**values).to_json()


async def serve(
    agent: AttributionAgent, rid: str, items: list[str], actor: str = "u1", **kw: Any
) -> bool:
    strategy = kw.pop("strategy", "ranker")
    record = served_record(actor, strategy, items, ts=kw.pop("ts", NOW), **kw)
    return await log_served(agent.redis, agent.settings, agent.settings.namespace, rid, record)


def durable_item(settings: Settings, key: str) -> dict[str, Any]:
    found = sync_client(settings, "dynamodb").get_item(
        TableName=settings.attribution_table, Key={"pk": {"S": key}}, ConsistentRead=True
    )
    return dict(found.get("Item", {}))


async def test_events_naming_a_recommendation_count_for_its_strategy(
    agent: AttributionAgent, settings: Settings
) -> None:
    ns = settings.namespace
    assert await serve(agent, "r1", ["a", "b", "c"])
    stats = await agent.process(
        [
            event(settings, 1, "click", item_id="b", recommendation_id="r1"),
            event(settings, 2, "add_to_cart", item_id="b", recommendation_id="r1"),
            event(settings, 3, "purchase", item_id="b", recommendation_id="r1", event_value=19.5),
            event(settings, 4, "purchase", item_id="c", recommendation_id="r1"),  # no value
            event(settings, 5, "view", item_id="a", recommendation_id="r1"),  # not counted
        ]
    )
    assert (stats.candidates, stats.attributed) == (4, 4)
    expected = {
        "impressions": 3.0,
        "clicks": 1.0,
        "add_to_carts": 1.0,
        "purchases": 2.0,
        "revenue": 19.5,
    }
    assert await agent.counters(ns, "ranker") == expected
    # The day bucket (UTC day of the event) holds the same, and DynamoDB a copy of both.
    day = time.strftime("%Y%m%d", time.gmtime(NOW))
    daily = await agent.redis.hgetall(Keys(ns).attribution_day("ranker", day))
    assert {
        (k.decode() if isinstance(k, bytes) else k): float(v) for k, v in daily.items()
    } == expected
    assert await agent.redis.ttl(Keys(ns).attribution_day("ranker", day)) > 0
    total = durable_item(settings, Keys(ns).attribution("ranker"))
    assert {k: float(total[k]["N"]) for k in expected} == expected
    assert total["strategy"]["S"] == "ranker"
    assert total["kind"]["S"] == "total"
    assert durable_item(settings, Keys(ns).attribution_day("ranker", day))["day"]["S"] == day
    assert await agent.redis.hlen(Keys(ns).attribution_dirty) == 0


async def test_a_click_on_a_served_item_counts_without_a_recommendation_id(
    agent: AttributionAgent, settings: Settings
) -> None:
    await serve(agent, "r1", ["a", "b"], strategy="popular")
    await serve(agent, "r2", ["x"], actor="u2", strategy="popular")
    stats = await agent.process(
        [
            event(settings, 1, item_id="b"),  # served to u1: counts
            event(settings, 2, item_id="z"),  # never served: no
            event(settings, 3, item_id="x"),  # served, but to u2: no
            event(settings, 4, item_id="a", user_id="u3"),  # another user: no
        ]
    )
    assert stats.attributed == 1
    counters = await agent.counters(settings.namespace, "popular")
    assert (counters["impressions"], counters["clicks"]) == (3, 1)


async def test_the_newest_recommendation_that_served_the_item_wins(
    agent: AttributionAgent, settings: Settings
) -> None:
    await serve(agent, "old", ["a", "b"], strategy="popular", ts=NOW - 100)
    await serve(agent, "new", ["b"], strategy="item2item", ts=NOW - 10)
    await serve(agent, "later", ["b"], strategy="trending", ts=NOW + 600)  # after the click
    await agent.process([event(settings, 1, item_id="b", timestamp=NOW)])
    ns = settings.namespace
    assert (await agent.counters(ns, "item2item"))["clicks"] == 1
    assert (await agent.counters(ns, "popular"))["clicks"] == 0
    assert (await agent.counters(ns, "trending"))["clicks"] == 0


async def test_nothing_is_attributed_outside_the_window(
    agent: AttributionAgent, settings: Settings
) -> None:
    window = settings.attribution_window_s
    await serve(agent, "stale", ["a"], ts=NOW - window - 1)
    await serve(agent, "future", ["b"], ts=NOW + CLOCK_SKEW_S + 1)
    await serve(agent, "edge", ["c"], ts=NOW - window + 1)
    stats = await agent.process(
        [
            event(settings, 1, item_id="a", recommendation_id="stale"),
            event(settings, 2, item_id="a"),
            event(settings, 3, item_id="b", recommendation_id="future"),
            event(settings, 4, item_id="b"),
            event(settings, 5, item_id="c"),  # just inside: counts
        ]
    )
    assert stats.attributed == 1
    assert (await agent.counters(settings.namespace, "ranker"))["clicks"] == 1


async def test_a_replayed_batch_counts_nothing_twice(
    agent: AttributionAgent, settings: Settings
) -> None:
    await serve(agent, "r1", ["a", "b"])
    batch = [
        event(settings, 1, item_id="a", recommendation_id="r1"),
        event(settings, 2, "purchase", item_id="b", event_value=5.25),
    ]
    first = await agent.process(batch)
    second = await agent.process(batch)
    third = await agent.process(batch[1:] + batch[:1])
    assert (first.attributed, second.attributed, third.attributed) == (2, 0, 0)
    assert (second.duplicates, third.duplicates) == (2, 2)
    counters = await agent.counters(settings.namespace, "ranker")
    assert (counters["clicks"], counters["purchases"], counters["revenue"]) == (1, 1, 5.25)
    item = durable_item(settings, Keys(settings.namespace).attribution("ranker"))
    assert (item["clicks"]["N"], item["revenue"]["N"]) == ("1", "5.25")


async def test_a_recommendation_counts_its_impressions_once(
    agent: AttributionAgent, settings: Settings
) -> None:
    assert await serve(agent, "r1", ["a", "b", "c"])
    assert not await serve(agent, "r1", ["a", "b", "c"])  # serving retried the write
    assert not await serve(agent, "r1", ["d"], strategy="other")  # the first record stays
    assert await serve(agent, "r2", ["a"])
    counters = await agent.counters(settings.namespace, "ranker")
    assert counters["impressions"] == 4
    assert (await agent.counters(settings.namespace, "other"))["impressions"] == 0
    stored = await ServedLog(agent.redis, settings).get(settings.namespace, "r1")
    assert stored is not None
    assert stored.items == ("a", "b", "c")
    # The served log and the actor's index expire with the attribution window.
    keys = Keys(settings.namespace)
    assert 0 < await agent.redis.ttl(keys.served("r1")) <= settings.attribution_window_s
    assert 0 < await agent.redis.ttl(keys.served_to("u1")) <= settings.attribution_window_s
    # Impressions logged by serving reach DynamoDB with the agent's next batch.
    await agent.process([])
    item = durable_item(settings, keys.attribution("ranker"))
    assert item["impressions"]["N"] == "4"


async def test_variants_are_counted_apart(agent: AttributionAgent, settings: Settings) -> None:
    await serve(agent, "r1", ["a"], variant="A")
    await serve(agent, "r2", ["b"], variant="B")
    await agent.process([event(settings, 1, item_id="a", recommendation_id="r1")])
    keys = Keys(settings.namespace)
    a = await agent.redis.hgetall(keys.attribution_variant("ranker", "A"))
    b = await agent.redis.hgetall(keys.attribution_variant("ranker", "B"))
    assert (a[b"impressions"], a[b"clicks"]) == (b"1", b"1")
    assert b"clicks" not in b
    assert durable_item(settings, keys.attribution_variant("ranker", "A"))["variant"]["S"] == "A"


async def test_served_to_a_session_counts_after_the_visitor_logs_in(
    agent: AttributionAgent, settings: Settings
) -> None:
    await serve(agent, "r1", ["a"], actor="session:s1")
    await serve(agent, "r2", ["b"], actor="u9")
    await agent.redis.set(Keys(settings.namespace).alias("s2"), "u9")
    stats = await agent.process(
        [
            # The login event carries both ids: the session's recommendations count.
            event(settings, 1, item_id="a", user_id="u1", session_id="s1"),
            # An anonymous event of a session that logged in as u9: u9's count.
            event(settings, 2, item_id="b", user_id=None, session_id="s2"),
        ]
    )
    assert stats.attributed == 2


async def test_counters_redis_lost_are_restored_from_dynamodb(
    agent: AttributionAgent, settings: Settings
) -> None:
    keys = Keys(settings.namespace)
    await serve(agent, "r1", ["a", "b"])
    await agent.process([event(settings, 1, "purchase", item_id="a", event_value=10.0)])
    # Redis lost everything of this namespace (FLUSHALL would hit other tests' keys).
    lost = [key async for key in agent.redis.scan_iter(match=f"{keys.prefix}*")]
    assert keys.attribution("ranker").encode() in lost
    await agent.redis.delete(*lost)
    await serve(agent, "r2", ["c"])
    await agent.process([event(settings, 2, "purchase", item_id="c", event_value=2.5)])
    expected = {
        "impressions": 3.0,
        "clicks": 0.0,
        "add_to_carts": 0.0,
        "purchases": 2.0,
        "revenue": 12.5,
    }
    assert await agent.counters(settings.namespace, "ranker") == expected
    assert not await agent.redis.hexists(keys.attribution("ranker"), "restore_pending")
    item = durable_item(settings, keys.attribution("ranker"))
    assert {k: float(item[k]["N"]) for k in expected if k in item} == {
        k: v for k, v in expected.items() if v
    }


async def test_a_malformed_served_record_is_skipped_not_fatal(
    agent: AttributionAgent, settings: Settings
) -> None:
    await agent.redis.set(Keys(settings.namespace).served("bad"), b'{"items": "oops"}')
    await serve(agent, "r1", ["a"])
    stats = await agent.process(
        [
            event(settings, 1, item_id="a", recommendation_id="bad"),  # falls back to item
            b"not json",  # the windows agent dead-letters it
        ]
    )
    assert stats.attributed == 1


def test_served_record_refuses_what_it_cannot_count() -> None:
    with pytest.raises(ValueError, match="strategy"):
        served_record("u1", "", ["a"])
    with pytest.raises(ValueError, match="at most"):
        served_record("u1", "ranker", [str(n) for n in range(501)])
