"""A producer that aggregates routes each record by its shard's hash key, from a shard
map it lists once. After a reshard that map is stale: a split parent's start hash key
belongs to one child only, which need not own every key inside the record. The producer
learns of the reshard from where its records land and lists the shards again, so only
the first call after a reshard can straddle the new ranges.

On kinesis-mock: moto keeps routing new records to a closed parent (see
tests/streams/test_reshard.py), so no producer could observe a reshard there."""

from __future__ import annotations

import asyncio
import time

from recstream.aws import async_client, sync_client
from recstream.settings import Settings
from streams.kinesis.shards import hash_key, list_shards
from streams.producer import KinesisProducer
from streams.schema import Event

USERS = 64


def batch(tag: str) -> list[Event]:
    return [
        Event(event_id=f"{tag}-{u}", event_type="view", user_id=f"u{u}", item_id=f"i{u}")
        for u in range(USERS)
    ]


def reshard(settings: Settings, target: int) -> None:
    kinesis = sync_client(settings, "kinesis")
    kinesis.update_shard_count(
        StreamName=settings.stream_name, TargetShardCount=target, ScalingType="UNIFORM_SCALING"
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        summary = kinesis.describe_stream_summary(StreamName=settings.stream_name)
        if summary["StreamDescriptionSummary"]["StreamStatus"] == "ACTIVE":
            return
        time.sleep(0.1)
    raise AssertionError("the stream did not become ACTIVE within 60 s of the reshard")


async def test_the_producer_lists_the_shards_again_after_a_reshard(
    kinesis_mock_settings: Settings,
) -> None:
    settings = kinesis_mock_settings
    assert settings.event_aggregation
    async with KinesisProducer(settings) as producer:
        before = await producer.put_events(batch("before"))
        assert all(r.ok for r in before)
        assert len({r.shard_id for r in before}) == settings.stream_shards
        await asyncio.to_thread(reshard, settings, 2 * settings.stream_shards)
        # the first call after the reshard lands where the old ranges send it...
        assert all(r.ok for r in await producer.put_events(batch("during")))
        # ...and tells the producer, whose next calls route by the new shards
        after = await producer.put_events(batch("after"))
    async with async_client(settings, "kinesis") as kinesis:
        shards = await list_shards(kinesis, settings.stream_name)
    assert len(shards.open) == 2 * settings.stream_shards
    for event, result in zip(batch("after"), after, strict=True):
        assert result.ok, result
        owner = shards.shard_for_key(event.partition_key)
        assert result.shard_id == owner.shard_id, (event.user_id, hash_key(event.partition_key))
