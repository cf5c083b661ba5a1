"""The windows agent: parse, dead-letter, apply idempotently, persist durably."""

from __future__ import annotations

import base64
from collections.abc import Sequence

import orjson
import redis.asyncio as aioredis

from agents.deadletter import MemoryDeadLetters, SqsDeadLetters
from agents.state import DynamoWindows, MemoryDurableWindows, MemoryHotStore, RedisHotStore
from agents.windows import WindowAgent
from recstream.aws import async_client, sync_client
from recstream.settings import Settings
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
    from agents.app import until_done
    from recstream.errors import StoreUnavailable

    hot, durable = MemoryHotStore(settings), MemoryDurableWindows()
    agent = WindowAgent(hot, durable, MemoryDeadLetters())
    failures = [StoreUnavailable("redis is restarting"), RuntimeError("bug")]

    async def flaky(values: Sequence[bytes], source: str) -> object:
        if failures:
            raise failures.pop(0)
        return await agent.process(values, source)

    batch = [raw(n, "u1", settings.namespace) for n in range(3)]
    await until_done(flaky, batch, "stream", max_delay=0.01)
    assert failures == []
    assert len(await hot.window(settings.namespace, "u1")) == 3
