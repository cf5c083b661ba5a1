"""Every agent under the one failure policy, on real Redis, moto (SQS, S3, DynamoDB) and the
PutEvents test server: a poison record and a deterministically failing record go to the
dead-letter queue, with kind, reason, shard and sequence number; the records after them
are processed; once the cause is fixed, `recstream dlq replay` re-drives the failed one
through its agent, once.

Each batch is also run through the windows agent, as a worker runs every agent on every
record: the poison record is dead-lettered once (kind ``parse``), by the windows agent,
and the side agents skip it.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import time
from collections.abc import Sequence
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from agents.archive import ArchiveBuffer, S3ArchiveSink, flush_until_done
from agents.attribution import AttributionAgent, DynamoCounters
from agents.deadletter import SqsDeadLetters
from agents.forwarder import Forwarder, open_personalize
from agents.retry import RetryPolicy
from agents.windows import StreamRecord, deliver
from recstream.archive import read_events
from recstream.aws import async_client, sync_client
from recstream.cli import main
from recstream.errors import RequestRefused
from recstream.keys import Keys
from recstream.served import log_served, served_record
from recstream.settings import Settings
from recstream.stores import open_stores
from streams.schema import Event
from tests.agents.personalize_server import TRACKING_ID, Tracker, running_tracker
from tests.agents.test_features import agent_of

SHARD = "shardId-000000000003"
NOW = time.time() - 600
POLICY = RetryPolicy(max_attempts=2, max_delay=0.01, base_delay=0.001)


def click(settings: Settings, n: int, user: str, **fields: Any) -> Event:
    values: dict[str, Any] = {
        "event_id": f"e{n}",
        "event_type": "click",
        "user_id": user,
        "item_id": f"i{n}",
        "timestamp": NOW + n,
        "namespace": settings.namespace,
        **fields,
    }
    return Event(**values)


def records(events: Sequence[Event | bytes]) -> list[StreamRecord]:
    """The batch as the Kinesis consumer hands it over: shard and sequence numbers."""
    return [
        StreamRecord(e if isinstance(e, bytes) else e.to_json(), SHARD, f"4959{n:052d}", 0)
        for n, e in enumerate(events)
    ]


def letters(settings: Settings) -> list[dict[str, Any]]:
    """The queue's letters, left in the queue."""
    sqs = sync_client(settings, "sqs")
    url = sqs.get_queue_url(QueueName=settings.dlq_name)["QueueUrl"]
    bodies: list[dict[str, Any]] = []
    while True:
        response = sqs.receive_message(
            QueueUrl=url, MaxNumberOfMessages=10, VisibilityTimeout=0, WaitTimeSeconds=0
        )
        new = [orjson.loads(m["Body"]) for m in response.get("Messages", [])]
        new = [b for b in new if b not in bodies]
        if not new:
            return bodies
        bodies += new


def by_kind(settings: Settings) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for body in letters(settings):
        out.setdefault(str(body["kind"]), []).append(body)
    return out


def check_letter(letter: dict[str, Any], record: StreamRecord, kind: str, reason: str) -> None:
    assert letter["kind"] == kind
    assert letter["shard"] == SHARD
    assert letter["sequence_number"] == record.sequence_number
    assert reason in letter["reason"]
    assert base64.b64decode(letter["raw_base64"]) == record.value
    if kind != "parse":
        assert letter["attempts"] >= POLICY.max_attempts


def replay(settings: Settings, monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    for name, value in settings.to_env().items():
        monkeypatch.setenv(name, value)
    return main(["dlq", "replay", *args])


async def windows_pass(settings: Settings, batch: Sequence[StreamRecord]) -> None:
    """What the worker's windows agent does with the same batch."""
    async with agent_of(settings) as (agent, _):
        await deliver(agent, batch, settings.stream_name, max_attempts=2, max_delay=0.01)


def test_windows_agent(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ns = settings.namespace
    events: list[Event | bytes] = [click(settings, n, f"u{n}") for n in range(9)]
    events[3] = click(settings, 3, "broken")
    events[4] = b'{"event_type": "click"'
    batch = records(events)

    async def run() -> None:
        async with agent_of(settings) as (agent, redis):
            # A key of the wrong type (a manual SET, a bug elsewhere): every attempt at
            # this user's event fails the same way.
            await redis.set(Keys(ns).window("broken"), "not a list")
            stats = await deliver(agent, batch, settings.stream_name, max_attempts=2)
            # (applied by the first attempt, which Redis refused one event of; found
            # applied when the rest was retried without it)
            assert (stats.dead_lettered, stats.applied + stats.duplicates) == (2, 7)
            for n in (0, 1, 2, 5, 6, 7, 8):  # before and after the two
                assert await redis.llen(Keys(ns).window(f"u{n}")) == 1
            assert await redis.zscore(Keys(ns).seen("broken"), "e3") is None

    asyncio.run(run())
    found = by_kind(settings)
    assert sorted(found) == ["parse", "windows"]
    check_letter(found["parse"][0], batch[4], "parse", "JSON")
    check_letter(found["windows"][0], batch[3], "windows", "WRONGTYPE")
    assert found["windows"][0]["error"] == "RequestRefused"

    # Re-driven before the fix: it fails again and stays.
    assert replay(settings, monkeypatch) == 1
    assert "failed again and kept 1" in capsys.readouterr().out

    async def redis_call(method: str, *args: Any) -> Any:
        redis = aioredis.from_url(settings.redis_url)
        try:
            return await getattr(redis, method)(*args)
        finally:
            await redis.aclose()

    asyncio.run(redis_call("delete", Keys(ns).window("broken")))  # the fix
    assert replay(settings, monkeypatch, "--kind", "windows") == 0
    window = asyncio.run(redis_call("lrange", Keys(ns).window("broken"), 0, -1))
    applied = asyncio.run(redis_call("hget", Keys(ns).features("broken"), "n"))
    out = capsys.readouterr().out
    assert "replayed and deleted 1" in out
    assert "kept 1 of kind 'parse'" in out
    assert [orjson.loads(e)["e"] for e in window] == ["e3"]
    assert applied == b"1"
    assert sorted(by_kind(settings)) == ["parse"]  # the poison stays: only its producer can fix it
    # The durable copy came with it.
    item = sync_client(settings, "dynamodb").get_item(
        TableName=settings.windows_table, Key={"pk": {"S": f"{ns}#broken"}}, ConsistentRead=True
    )
    assert "e3" in item["Item"]["window"]["S"]


def test_attribution_agent(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ns = settings.namespace
    users = ["u0", "u1", "broken", "u3", "u4"]
    events: list[Event | bytes] = [
        click(settings, n, user, recommendation_id=f"r{n}") for n, user in enumerate(users)
    ]
    events.insert(3, b"\xff not json")
    batch = records(events)
    seen_key = Keys(ns).attribution_seen("broken")

    async def run() -> dict[str, float]:
        async with open_stores(settings) as stores:
            for n, user in enumerate(users):
                served = served_record(user, "ranker", [f"i{n}"], ts=NOW)
                await log_served(stores.redis, settings, ns, f"r{n}", served)
            await stores.redis.set(seen_key, "not a sorted set")
            agent = AttributionAgent(
                stores.redis,
                DynamoCounters(stores.dynamodb, settings),
                settings,
                SqsDeadLetters(stores.sqs, settings),
                POLICY,
            )
            stats = await agent.process(batch, settings.stream_name)
            # (counted by the first attempt, found counted when retried without it)
            assert (stats.attributed + stats.duplicates, stats.dead_lettered) == (4, 1)
            return await agent.counters(ns, "ranker")

    counters = asyncio.run(run())
    assert (counters["impressions"], counters["clicks"]) == (5, 4)  # after the two, too
    asyncio.run(windows_pass(settings, batch))
    found = by_kind(settings)
    assert sorted(found) == ["attribution", "parse"]
    assert len(found["parse"]) == 1  # once, by the windows agent
    check_letter(found["parse"][0], batch[3], "parse", "JSON")
    check_letter(found["attribution"][0], batch[2], "attribution", "WRONGTYPE")

    async def fix() -> None:
        redis = aioredis.from_url(settings.redis_url)
        try:
            await redis.delete(seen_key)
        finally:
            await redis.aclose()

    asyncio.run(fix())
    assert replay(settings, monkeypatch) == 0
    assert "1 through attribution" in capsys.readouterr().out
    assert replay(settings, monkeypatch) == 0  # the parse letter stays; nothing else

    async def counted() -> tuple[dict[str, float], dict[str, Any]]:
        async with open_stores(settings) as stores:
            agent = AttributionAgent(
                stores.redis, DynamoCounters(stores.dynamodb, settings), settings
            )
            # and a replayed stream batch counts nothing twice
            await agent.process(batch, settings.stream_name)
            item = await stores.dynamodb.get_item(
                TableName=settings.attribution_table,
                Key={"pk": {"S": Keys(ns).attribution("ranker")}},
                ConsistentRead=True,
            )
            return await agent.counters(ns, "ranker"), dict(item["Item"])

    counters, durable = asyncio.run(counted())
    assert counters["clicks"] == 5
    assert durable["clicks"] == {"N": "5"}
    assert sorted(by_kind(settings)) == ["parse"]


@pytest.fixture
def tracker() -> Any:
    with running_tracker() as running:
        yield running


def test_personalize_forwarder(
    settings: Settings,
    tracker: tuple[Tracker, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    server, url = tracker
    settings = settings.model_copy(
        update={
            "personalize_tracking_id": TRACKING_ID,
            "personalize_endpoint_url": url,
            "personalize_retry_base_s": 0.001,
            "personalize_retry_max_s": 0.01,
        }
    )
    events: list[Event | bytes] = [click(settings, n, f"u{n % 2}") for n in range(7)]
    events.insert(2, b"[]")
    batch = records(events)
    server.refuse({"e4"})  # refused as invalid whatever call carries it

    async def run() -> None:
        async with open_personalize(settings) as client, async_client(settings, "sqs") as sqs:
            forwarder = Forwarder(client, settings, SqsDeadLetters(sqs, settings), policy=POLICY)
            result = await forwarder.process(batch, settings.stream_name)
            assert (result.sent, result.dead_lettered) == (6, 1)

    asyncio.run(run())
    assert server.event_ids() == {f"e{n}": 1 for n in range(7) if n != 4}
    asyncio.run(windows_pass(settings, batch))
    found = by_kind(settings)
    assert sorted(found) == ["parse", "personalize"]
    check_letter(found["parse"][0], batch[2], "parse", "body")
    [letter] = found["personalize"]
    assert letter["kind"] == "personalize"
    assert (letter["shard"], letter["sequence_number"]) == (SHARD, batch[5].sequence_number)
    assert "InvalidInputException" in letter["reason"]

    assert replay(settings, monkeypatch) == 1  # still refused: kept
    assert server.event_ids()["e4"] == 0
    server.refuse(set())
    assert replay(settings, monkeypatch) == 0
    assert "1 through personalize" in capsys.readouterr().out
    assert server.event_ids() == {f"e{n}": 1 for n in range(7)}  # each once
    assert sorted(by_kind(settings)) == ["parse"]


class RefusingSink:
    """The real S3 sink, except that it refuses any object holding a given event, as S3
    refuses a request it finds invalid (`RequestRefused`, as `recstream.aws.translate`
    makes of one) every time. Fault injection at the sink's boundary: nothing a record
    can carry makes moto's S3 refuse a PutObject."""

    def __init__(self, real: S3ArchiveSink, event_id: str) -> None:
        self.real = real
        self.marker = f'"event_id":"{event_id}"'.encode()

    async def put(self, key: str, body: bytes) -> None:
        if self.marker in gzip.decompress(body):
            raise RequestRefused(f"archive write to {key} was refused as invalid")
        await self.real.put(key, body)


def test_archive_agent(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    events: list[Event | bytes] = [click(settings, n, f"u{n % 3}") for n in range(8)]
    events.insert(5, b'{"event_type": 7}')
    batch = records(events)

    async def run() -> list[int]:
        async with async_client(settings, "s3") as s3, async_client(settings, "sqs") as sqs:
            sink = RefusingSink(S3ArchiveSink(s3, settings), "e3")
            buffer: ArchiveBuffer[int] = ArchiveBuffer.of(sink, settings)
            buffer.add(zip(batch, range(len(batch)), strict=True))
            dead_letters = SqsDeadLetters(sqs, settings)
            acks = await flush_until_done(
                buffer, policy=POLICY, dead_letters=dead_letters, source=settings.stream_name
            )
            assert not buffer.pending
            return acks

    # Everything is acked (the checkpoint moves on): archived, or dead-lettered.
    assert asyncio.run(run()) == list(range(len(batch)))

    def archived() -> list[str]:
        found = read_events(settings, NOW - 60, NOW + 60, namespace=settings.namespace)
        return sorted(e.event_id for e in found)

    assert archived() == [f"e{n}" for n in range(8) if n != 3]
    asyncio.run(windows_pass(settings, batch))
    found = by_kind(settings)
    assert sorted(found) == ["archive", "parse"]
    check_letter(found["parse"][0], batch[5], "parse", "event_type")
    check_letter(found["archive"][0], batch[3], "archive", "refused")

    assert replay(settings, monkeypatch, "--kind", "archive") == 0  # the real sink: fixed
    assert "1 through archive" in capsys.readouterr().out
    assert archived() == [f"e{n}" for n in range(8)]  # each event once
    assert sorted(by_kind(settings)) == ["parse"]
