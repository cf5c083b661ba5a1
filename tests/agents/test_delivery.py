"""Bad input and bad luck: poison and deterministically failing records are dead-lettered
with their shard and sequence number and the rest is processed; transient failures are
retried without limit; no durable item can outgrow DynamoDB; Redis memory stays bounded."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
from botocore.exceptions import ClientError

from agents.state import ApplyResult
from agents.trending import WINDOWS, materialize
from agents.windows import StreamRecord, deliver
from recstream.aws import sync_client, translate
from recstream.errors import RequestRefused, ThroughputExceeded
from recstream.keys import Keys
from recstream.settings import Settings
from streams.envelope import Message, encode
from streams.schema import MAX_CONTEXT, MAX_ID_LENGTH, MAX_IMPRESSION, Event
from tests.agents.streamdata import taobao, text
from tests.agents.test_features import agent_of, feed
from tests.conftest import LocalStack, make_settings


def dead_letters(settings: Settings) -> list[dict[str, Any]]:
    sqs = sync_client(settings, "sqs")
    url = sqs.get_queue_url(QueueName=settings.dlq_name)["QueueUrl"]
    bodies: list[dict[str, Any]] = []
    while True:
        messages = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10).get("Messages", [])
        if not messages:
            return bodies
        bodies += [orjson.loads(m["Body"]) for m in messages]
        for m in messages:
            sqs.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])


def event(n: int, user: str, ns: str) -> Event:
    return Event(
        event_id=f"d{n}",
        event_type="click",
        user_id=user,
        item_id=f"i{n % 7}",
        timestamp=1_700_000_000.0 + n,
        namespace=ns,
    )


async def test_poison_and_failing_records_are_set_aside_and_the_rest_applied(
    settings: Settings,
) -> None:
    ns = settings.namespace
    records = [
        StreamRecord(event(n, f"u{n}", ns).to_json(), "shardId-000000000001", f"4960{n:052d}")
        for n in range(12)
    ]
    records[3] = StreamRecord(b'{"event_type": ', "shardId-000000000001", "4960" + "3" * 52)
    records[7] = StreamRecord(
        event(7, "broken", ns).to_json(), "shardId-000000000001", "4960" + "7" * 52, 2
    )
    async with agent_of(settings) as (agent, redis):
        # A key of the wrong type (a bug elsewhere, a manual SET): every attempt at this
        # user's event fails the same way, in Redis, before any effect.
        await redis.set(Keys(ns).window("broken"), "not a list")
        stats = await deliver(agent, records, settings.stream_name, max_attempts=2, max_delay=0.01)
        # (the first attempt's pipeline applied the others; retries found them applied)
        assert (stats.received, stats.dead_lettered) == (12, 2)
        assert stats.applied + stats.duplicates == 10
        for n in range(12):
            if n not in (3, 7):  # everything around them was applied
                assert await redis.llen(Keys(ns).window(f"u{n}")) == 1
        # nothing of the failing event stayed behind: not seen, no features
        assert await redis.zscore(Keys(ns).seen("broken"), "d7") is None
        assert not await redis.exists(Keys(ns).features("broken"))
    letters = {b["sequence_number"]: b for b in dead_letters(settings)}
    assert set(letters) == {records[3].sequence_number, records[7].sequence_number}
    poison, failing = letters[records[3].sequence_number], letters[records[7].sequence_number]
    assert poison["error"] == "parse"
    assert poison["shard"] == "shardId-000000000001"
    assert base64.b64decode(poison["raw_base64"]) == records[3].value
    assert failing["error"] == "RequestRefused"
    assert failing["attempts"] == 2
    assert failing["sub_sequence"] == 2
    assert "WRONGTYPE" in failing["reason"]
    assert base64.b64decode(failing["raw_base64"]) == records[7].value


class Throttled:
    """A stage that is throttled a few times (as DynamoDB is under load), then works."""

    def __init__(self, times: int) -> None:
        self.left = times

    async def after(self, events: Sequence[Event], result: ApplyResult) -> None:
        if self.left:
            self.left -= 1
            raise ThroughputExceeded("throttled; retry with backoff")


async def test_transient_failures_are_retried_beyond_the_attempt_limit(
    settings: Settings,
) -> None:
    async with agent_of(settings) as (agent, redis):
        throttled = Throttled(6)
        agent.stages = (*agent.stages, throttled)
        batch = [event(n, f"u{n % 3}", settings.namespace).to_json() for n in range(9)]
        stats = await deliver(agent, batch, "stream", max_attempts=2, max_delay=0.01)
        assert throttled.left == 0
        # applied by the first attempt (the stage failed after it), found applied later
        assert (stats.applied, stats.duplicates, stats.dead_lettered) == (0, 9, 0)
        assert await redis.llen(Keys(settings.namespace).window("u0")) == 3
    assert dead_letters(settings) == []


async def test_no_window_or_feature_item_can_outgrow_dynamodb(local_stack: LocalStack) -> None:
    """The largest window (1000 entries) of the largest events (256-character ids, full
    context and impression) and 1000 long-named categories still fit one DynamoDB item."""
    settings = make_settings(local_stack, window_size=1000, feature_cap=1000)
    ns, user = settings.namespace, "u" * MAX_ID_LENGTH
    events = [
        Event(
            event_id=f"{n:06d}".ljust(MAX_ID_LENGTH, "e"),
            event_type="click",
            user_id=user,
            item_id=f"{n:06d}".ljust(MAX_ID_LENGTH, "i"),
            recommendation_id="r" * MAX_ID_LENGTH,
            impression=[f"{n}-{k}".ljust(MAX_ID_LENGTH, "m") for k in range(MAX_IMPRESSION)],
            context={f"k{k}": "c" * MAX_ID_LENGTH for k in range(MAX_CONTEXT)},
            properties={"category": f"{n:04d}".ljust(200, "c")},
            timestamp=1_700_000_000.0 + n,
            namespace=ns,
        )
        for n in range(1100)
    ]
    async with agent_of(settings) as (agent, _):
        await feed(agent, events, 250)
        assert agent.totals.applied == len(events)
        window = await agent.durable.get(ns, user)
        assert window is not None
        assert 100 < len(window) < 1000
        assert window[0].event_id == events[-1].event_id
    dynamodb = sync_client(settings, "dynamodb")
    for table in (settings.windows_table, settings.features_table):
        item = dynamodb.get_item(TableName=table, Key={"pk": {"S": f"{ns}#{user}"}})["Item"]
        assert sum(len(k) + len(str(v)) for k, v in item.items()) < 400 * 1024


def test_dynamodb_s_refusal_is_not_retried_forever(settings: Settings) -> None:
    """What DynamoDB refuses as invalid is deterministic: `RequestRefused`, not retriable."""
    dynamodb = sync_client(settings, "dynamodb")
    with pytest.raises(ClientError) as caught:
        dynamodb.put_item(
            TableName=settings.windows_table,
            Item={"pk": {"S": "x"}, "window": {"S": "w" * (401 * 1024)}},
        )
    error = translate(caught.value, "writing a window", settings)
    assert isinstance(error, RequestRefused)
    assert not error.retriable


async def test_redis_memory_stays_bounded_under_a_long_replay(
    local_stack: LocalStack, shared_data: Path
) -> None:
    """metarank#1543: every key has a cap or a TTL, whatever the replay's length."""
    caps = {
        "window_size": 10,
        "dedup_per_actor": 16,
        "feature_cap": 4,
        "popularity_cap": 50,
        "bucket_cap": 20,
        "category_cap": 5,
        "trend_cap": 10,
    }
    settings = make_settings(local_stack, **caps)  # type: ignore[arg-type]
    events, _ = taobao(shared_data, settings.namespace, 5000)
    async with agent_of(settings) as (agent, redis):
        await feed(agent, events, 500)
        await materialize(redis, settings, settings.namespace, lock=False)
        prefix = Keys(settings.namespace).prefix
        per_user: dict[str, int] = {}
        buckets = 0
        async for raw in redis.scan_iter(match=f"{prefix}*", count=1000):
            key = text(raw)
            name = key[len(prefix) :]
            kind = text(await redis.type(key))
            ttl = await redis.ttl(key)
            size = {
                "list": redis.llen,
                "zset": redis.zcard,
                "hash": redis.hlen,
                "string": redis.strlen,
            }[kind]
            count = await size(key)
            family = name.split(":")[0]
            if family in ("win", "seen", "feat", "emb"):
                assert ttl > 0, key
                actor = name.split(":", 1)[1]
                per_user[actor] = per_user.get(actor, 0) + int(await redis.memory_usage(key) or 0)
            bound = {
                "win": caps["window_size"],
                "seen": caps["dedup_per_actor"],
                # fixed fields, per-type counts, and capped values of 3 attributes
                "feat": 10 + (caps["feature_cap"] + 1) * 5,
                "cnt": caps["bucket_cap"],
                "cats": caps["category_cap"],
                "pop": caps["popularity_cap"],
                "trend": caps["trend_cap"],
            }.get(family)
            if name == "cnt:index" or name == "trend:clock":
                bound = None
                assert ttl > 0 or name == "trend:clock", key  # the clock: one small hash
            elif family == "cnt":
                assert ttl > 0, key
                buckets += 1
            assert bound is None or count <= bound, (key, count)
        # buckets alive: two windows' worth, globally and for each kept category
        alive = sum(2 * w.length_s // w.span_s + 1 for w in WINDOWS)
        assert 0 < buckets <= alive * (1 + caps["category_cap"])
        assert await redis.zcard(Keys(settings.namespace).categories) <= caps["category_cap"]
    actors = {e.actor for e in events}
    assert set(per_user) == actors
    mean = sum(per_user.values()) / len(per_user)
    print(f"\nbytes per active user (window + seen + features): {mean:.0f}")
    assert mean < 16 * 1024


async def test_a_worker_dead_letters_with_the_real_shard_and_sequence_number(
    kinesis_mock_settings: Settings, tmp_path: Path
) -> None:
    """Through Kinesis (kinesis-mock's real-style sequence numbers) and `recstream agents`."""
    from tests.integration.test_spine import agent_worker, tail

    settings = kinesis_mock_settings
    kinesis = sync_client(settings, "kinesis")
    poison = kinesis.put_record(
        StreamName=settings.stream_name,
        Data=encode(Message(key=b"x", value=b"not an event")),
        PartitionKey="x",
    )
    good = event(1, "after-poison", settings.namespace)
    kinesis.put_record(
        StreamName=settings.stream_name,
        Data=encode(Message(key=b"after-poison", value=good.to_json())),
        PartitionKey="x",  # same shard, after the poison
    )
    log = tmp_path / "agents.log"
    letters: list[dict[str, Any]] = []
    with agent_worker(settings, log):
        for _ in range(600):
            letters += dead_letters(settings)
            if letters:
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail(f"no dead letter within 60 s; agent log:\n{tail(log)}")
        import redis.asyncio as aioredis

        client = aioredis.from_url(settings.redis_url)
        try:
            for _ in range(600):
                if await client.llen(Keys(settings.namespace).window("after-poison")):
                    break
                await asyncio.sleep(0.1)
            else:
                pytest.fail(f"the record after the poison was not applied:\n{tail(log)}")
        finally:
            await client.aclose()
    [letter] = letters
    assert letter["shard"] == poison["ShardId"]
    assert letter["sequence_number"] == poison["SequenceNumber"]
    assert letter["error"] == "parse"
