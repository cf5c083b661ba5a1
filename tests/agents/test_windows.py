"""The windows agent: parse, dead-letter, apply idempotently, persist durably."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Sequence
from typing import Any

import orjson
import redis.asyncio as aioredis

from agents.deadletter import MemoryDeadLetters, SqsDeadLetters
from agents.state import MemoryHotStore, RedisHotStore
from agents.windows import WindowAgent
from recstream.aws import async_client, sync_client
from recstream.keys import Keys
from recstream.settings import Settings
from recstream.windows import DynamoWindows, MemoryDurableWindows
from streams.schema import Event


def raw(n: int, user: str, namespace: str) -> bytes:
    return Event(
        event_id=f"e{n}", event_type="view", user_id=user, item_id=f"i{n}", namespace=namespace
    ).to_json()


async def test_replayed_batch_is_applied_once(settings: Settings) -> None:
    hot, durable, dlq = MemoryHotStore(settings), MemoryDurableWindows(), MemoryDeadLetters()
    agent = WindowAgent(hot, durable, dlq)
    batch = [raw(n, f"u{n % 2}", settings.namespace) for n in range(6)]
    first = await agent.process(batch)
    second = await agent.process(batch)
    assert (first.applied, first.duplicates) == (6, 0)
    assert (second.applied, second.duplicates) == (0, 6)
    window = await durable.get(settings.namespace, "u0")
    assert window is not None
    assert [e.item_id for e in window] == ["i4", "i2", "i0"]


async def test_durable_copy_catches_up_after_a_crash_between_stores(settings: Settings) -> None:
    hot, durable = MemoryHotStore(settings), MemoryDurableWindows()
    batch = [raw(n, "u1", settings.namespace) for n in range(3)]
    # The crash: the hot store applied the batch, the durable write never happened.
    await hot.apply([Event.from_json(r) for r in batch])
    stats = await WindowAgent(hot, durable, MemoryDeadLetters()).process(batch)
    assert stats.applied == 0
    window = await durable.get(settings.namespace, "u1")
    assert window is not None
    assert len(window) == 3


async def test_malformed_records_go_to_the_real_dead_letter_queue(settings: Settings) -> None:
    bad = [b"not json", orjson.dumps({"event_type": "click", "item_id": "x"})]
    good = [raw(1, "u1", settings.namespace)]
    async with (
        async_client(settings, "sqs") as sqs,
        async_client(settings, "dynamodb") as dynamodb,
    ):
        client = aioredis.from_url(settings.redis_url)
        try:
            agent = WindowAgent(
                RedisHotStore(client, settings),
                DynamoWindows(dynamodb, settings),
                SqsDeadLetters(sqs, settings),
            )
            stats = await agent.process(bad + good, source="stream/shardId-000000000000")
        finally:
            await client.aclose()
    assert (stats.received, stats.applied, stats.dead_lettered) == (3, 1, 2)
    queue = sync_client(settings, "sqs")
    url = queue.get_queue_url(QueueName=settings.dlq_name)["QueueUrl"]
    messages = queue.receive_message(QueueUrl=url, MaxNumberOfMessages=10)["Messages"]
    bodies = [orjson.loads(m["Body"]) for m in messages]
    assert sorted(base64.b64decode(b["raw_base64"]) for b in bodies) == sorted(bad)
    assert all(b["source"] == "stream/shardId-000000000000" for b in bodies)
    assert any("user_id" in b["reason"] for b in bodies)


async def test_a_failing_batch_is_retried_not_skipped(settings: Settings) -> None:
    from agents.windows import deliver
    from recstream.errors import StoreUnavailable

    hot, durable, dlq = MemoryHotStore(settings), MemoryDurableWindows(), MemoryDeadLetters()
    agent = WindowAgent(hot, durable, dlq)
    # transient failures beyond the attempt limit, then one unexpected failure
    failures: list[Exception] = [StoreUnavailable("redis is restarting")] * 5
    failures.append(RuntimeError("bug"))
    apply = agent.apply

    async def flaky(events: Sequence[Event], source: str = "stream", **options: Any) -> object:
        if failures:
            raise failures.pop(0)
        return await apply(events, source, **options)

    agent.apply = flaky  # type: ignore[method-assign,assignment]
    batch = [raw(n, "u1", settings.namespace) for n in range(3)]
    await deliver(agent, batch, "stream", max_attempts=2, max_delay=0.01)
    assert failures == []
    assert dlq.letters == []
    assert len(await hot.window(settings.namespace, "u1")) == 3


async def real_agent(settings: Settings) -> AsyncIterator[tuple[WindowAgent, aioredis.Redis]]:
    from recstream.stores import open_stores

    async with open_stores(settings) as stores:
        yield (
            WindowAgent(
                RedisHotStore(stores.redis, settings),
                DynamoWindows(stores.dynamodb, settings),
                SqsDeadLetters(stores.sqs, settings, stores.s3),
            ),
            stores.redis,
        )


async def test_a_batch_from_500_users_uses_one_round_trip_not_500(settings: Settings) -> None:
    # The production Redis pool (recstream.stores) has 200 connections and does not wait.
    batch = [raw(n, f"user{n}", settings.namespace) for n in range(500)]
    async for agent, _ in real_agent(settings):
        stats = await agent.process(batch)
        assert (stats.applied, stats.windows_persisted) == (500, 500)


async def test_a_window_redis_lost_is_merged_back_not_overwritten(settings: Settings) -> None:
    ns = settings.namespace
    async for agent, redis in real_agent(settings):
        await agent.process([raw(n, "veteran", ns) for n in range(10)])
        await redis.delete(Keys(ns).window("veteran"))  # TTL, eviction or FLUSHALL
        await agent.process([raw(10, "veteran", ns)])
        hot = await agent.hot.window(ns, "veteran")
        durable = await agent.durable.get(ns, "veteran")
    assert [e.item_id for e in hot] == [f"i{n}" for n in range(10, -1, -1)]
    assert durable == hot


async def test_windows_are_ordered_by_event_time_whatever_the_arrival(settings: Settings) -> None:
    ns = settings.namespace

    def at(n: int, ts: float) -> bytes:
        return Event(
            event_id=f"o{n}",
            event_type="view",
            user_id="u",
            item_id=f"i{n}",
            timestamp=ts,
            namespace=ns,
        ).to_json()

    arrivals = [
        at(1, 1_700_000_010),
        at(3, 1_700_000_030),
        at(2, 1_700_000_020),
        at(0, 1_700_000_000),
    ]
    for hot in (MemoryHotStore(settings), None):
        if hot is None:
            async for agent, _ in real_agent(settings):
                await agent.process(arrivals)
                window = await agent.hot.window(ns, "u")
        else:
            await WindowAgent(hot, MemoryDurableWindows(), MemoryDeadLetters()).process(arrivals)
            window = await hot.window(ns, "u")
        assert [e.item_id for e in window] == ["i3", "i2", "i1", "i0"]


async def test_a_record_too_large_for_sqs_is_dead_lettered_through_s3(settings: Settings) -> None:
    huge = b"x" * (600 * 1024)  # fits a Kinesis record, not an SQS message
    async for agent, _ in real_agent(settings):
        stats = await agent.process([huge, b"small and bad"], source="stream")
    assert stats.dead_lettered == 2
    queue = sync_client(settings, "sqs")
    url = queue.get_queue_url(QueueName=settings.dlq_name)["QueueUrl"]
    bodies = [
        orjson.loads(m["Body"])
        for m in queue.receive_message(QueueUrl=url, MaxNumberOfMessages=10)["Messages"]
    ]
    [offloaded] = [b for b in bodies if "raw_s3_uri" in b]
    bucket, key = offloaded["raw_s3_uri"].removeprefix("s3://").split("/", 1)
    assert sync_client(settings, "s3").get_object(Bucket=bucket, Key=key)["Body"].read() == huge
    assert any(b.get("raw_base64") for b in bodies)
