"""The Kinesis producer against real emulators: batching, retries, buffering, order."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from botocore.exceptions import ClientError

from recstream.aws import async_client
from recstream.settings import Settings
from streams.envelope import decode
from streams.producer import KinesisProducer
from streams.schema import Event
from tests.serving.test_collector import raw_records, read_stream


def events(n: int, users: int = 7) -> list[Event]:
    return [
        Event(event_id=f"e{i:05d}", event_type="view", user_id=f"u{i % users}", item_id=f"i{i}")
        for i in range(n)
    ]


class ThrottlingKinesis:
    """Wraps a real client; on each call, refuses every other record the way a hot shard
    does (ProvisionedThroughputExceededException inside a 200 response) and forwards the
    rest to the emulator for real."""

    def __init__(self, real: Any, throttled_calls: int) -> None:
        self.real = real
        self.throttled_calls = throttled_calls
        self.calls = 0

    async def put_records(
        self, *, StreamName: str, Records: list[dict[str, Any]]
    ) -> dict[str, Any]:
        self.calls += 1
        if self.calls > self.throttled_calls:
            return dict(await self.real.put_records(StreamName=StreamName, Records=Records))
        # Records fail independently, as on Kinesis: a later record of a key may land
        # while an earlier one is refused.
        forward = [index for index in range(len(Records)) if index % 2 == 0]
        response = await self.real.put_records(
            StreamName=StreamName, Records=[Records[i] for i in forward]
        )
        outcomes: list[dict[str, Any]] = [
            {"ErrorCode": "ProvisionedThroughputExceededException", "ErrorMessage": "Rate exceeded"}
        ] * len(Records)
        for index, outcome in zip(forward, response["Records"], strict=True):
            outcomes[index] = outcome
        return {"FailedRecordCount": len(Records) - len(forward), "Records": outcomes}


async def test_more_than_500_events_are_split_into_calls(kinesis_mock_settings: Settings) -> None:
    batch = events(1_234)
    async with KinesisProducer(kinesis_mock_settings) as producer:
        results = await producer.put_events(batch)
    assert [r.event_id for r in results] == [e.event_id for e in batch]
    assert all(r.ok for r in results)
    # kinesis-mock: real-style sequence numbers, far beyond a C ssize_t
    assert all(len(r.sequence_number or "") >= 50 for r in results)
    on_stream = read_stream(kinesis_mock_settings)
    assert sorted(e.event_id for _, e in on_stream) == sorted(e.event_id for e in batch)


async def test_partial_failures_are_retried_until_all_land_once(settings: Settings) -> None:
    batch = events(300)
    async with async_client(settings, "kinesis") as real:
        flaky = ThrottlingKinesis(real, throttled_calls=3)
        async with KinesisProducer(
            settings, client=cast(Any, flaky), base_backoff=0.001
        ) as producer:
            results = await producer.put_events(batch)
    assert all(r.ok for r in results)
    assert flaky.calls == 4
    on_stream = read_stream(settings)
    ids = [e.event_id for _, e in on_stream]
    assert sorted(ids) == sorted(e.event_id for e in batch)  # each exactly once


class FailingAfter:
    """Wraps a real client; PutRecords calls after the first ``ok_calls`` raise a
    non-retriable error, as when a stream is deleted mid-request."""

    def __init__(self, real: Any, ok_calls: int) -> None:
        self.real, self.ok_calls, self.calls = real, ok_calls, 0

    async def put_records(self, **kwargs: Any) -> dict[str, Any]:
        self.calls += 1
        if self.calls > self.ok_calls:
            error = {"Error": {"Code": "ResourceNotFoundException", "Message": "gone"}}
            raise ClientError(error, "PutRecords")  # type: ignore[arg-type]
        return dict(await self.real.put_records(**kwargs))


async def test_a_failure_midway_reports_every_event_and_raises_none(settings: Settings) -> None:
    batch = events(700)  # two PutRecords calls: 500 land, then the stream is "gone"
    async with async_client(settings, "kinesis") as real:
        producer = KinesisProducer(settings, client=cast(Any, FailingAfter(real, 1)))
        async with producer:
            results = await producer.put_events(batch)
    assert [r.event_id for r in results] == [e.event_id for e in batch]
    assert [r.ok for r in results] == [True] * 500 + [False] * 200
    assert "not found" in (results[-1].error or "")
    assert len(read_stream(settings)) == 500


async def test_events_that_never_land_are_reported_not_dropped(settings: Settings) -> None:
    async with async_client(settings, "kinesis") as real:
        flaky = ThrottlingKinesis(real, throttled_calls=100)
        async with KinesisProducer(
            settings, client=cast(Any, flaky), max_attempts=3, base_backoff=0.001
        ) as producer:
            results = await producer.put_events(events(10, users=10))
    # 10 sent, 5 refused; 5 retried, 2 refused; 2 retried, 1 refused: attempts exhausted.
    failed = [r for r in results if not r.ok]
    assert len(failed) == 1
    assert "resend" in (failed[0].error or "")
    assert failed[0].retriable
    landed = {e.event_id for _, e in read_stream(settings)}
    assert landed == {r.event_id for r in results if r.ok}
    assert failed[0].event_id not in landed


async def test_buffered_send_flushes_and_applies_backpressure(settings: Settings) -> None:
    batch = events(120)
    async with KinesisProducer(settings, linger=0.01, max_buffered=16) as producer:
        futures = [await producer.send(e) for e in batch]  # waits whenever 16 are queued
        results = await asyncio.gather(*futures)
    assert all(r.ok for r in results)
    assert len(read_stream(settings)) == 120


async def test_close_flushes_what_is_buffered(settings: Settings) -> None:
    producer = KinesisProducer(settings, linger=10.0)
    await producer.start()
    futures = [await producer.send(e) for e in events(5)]
    await producer.close()
    assert all(f.done() and f.result().ok for f in futures)
    assert len(read_stream(settings)) == 5


class CountingKinesis:
    """Wraps a real client and counts PutRecords calls and their sizes."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.sizes: list[int] = []

    async def put_records(self, **kwargs: Any) -> dict[str, Any]:
        self.sizes.append(len(kwargs["Records"]))
        await asyncio.sleep(0.02)  # a call takes time: callers arrive meanwhile
        return dict(await self.real.put_records(**kwargs))


async def test_concurrent_callers_share_calls_and_each_gets_its_own_outcomes(
    settings: Settings,
) -> None:
    batch = events(300, users=30)
    async with async_client(settings, "kinesis") as real:
        counting = CountingKinesis(real)
        async with KinesisProducer(
            settings, client=cast(Any, counting), max_in_flight=2
        ) as producer:
            # 300 requests of one event (and a few of three), all at once, as 64 clients
            # posting single events do
            calls = [producer.put_events([e]) for e in batch[:270]] + [
                producer.put_events(batch[i : i + 3]) for i in range(270, 300, 3)
            ]
            answers = await asyncio.gather(*calls)
    # every caller got exactly its own events back, in its order, all landed
    sent = [[e.event_id for e in batch[i : i + 1]] for i in range(270)] + [
        [e.event_id for e in batch[i : i + 3]] for i in range(270, 300, 3)
    ]
    assert [[r.event_id for r in answer] for answer in answers] == sent
    assert all(r.ok and r.sequence_number for answer in answers for r in answer)
    # far fewer calls than callers, none over Kinesis's 500 records
    assert len(counting.sizes) < 30
    assert sum(counting.sizes) == 300
    assert max(counting.sizes) <= 500
    on_stream = sorted(e.event_id for _, e in read_stream(settings))
    assert on_stream == sorted(e.event_id for e in batch)  # each exactly once


async def test_a_lone_caller_is_sent_at_once(settings: Settings) -> None:
    async with async_client(settings, "kinesis") as real:
        counting = CountingKinesis(real)
        async with KinesisProducer(settings, client=cast(Any, counting)) as producer:
            for e in events(3):
                assert (await producer.put_events([e]))[0].ok
    assert counting.sizes == [1, 1, 1]  # no lingering for company


class ConcurrencyKinesis(CountingKinesis):
    """Also records the most PutRecords calls it saw in flight at once."""

    def __init__(self, real: Any) -> None:
        super().__init__(real)
        self.in_flight = 0
        self.most_in_flight = 0

    async def put_records(self, **kwargs: Any) -> dict[str, Any]:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            return await super().put_records(**kwargs)
        finally:
            self.in_flight -= 1


async def test_by_default_two_calls_at_most_carry_concurrent_callers(settings: Settings) -> None:
    # Every PutRecords call costs about the same whatever it carries (in the API and in
    # the emulator), so fewer calls in flight means fewer, fuller calls (session 7).
    async with async_client(settings, "kinesis") as real:
        counting = ConcurrencyKinesis(real)
        async with KinesisProducer(settings, client=cast(Any, counting)) as producer:
            answers = await asyncio.gather(*(producer.put_events([e]) for e in events(200)))
    assert all(answer[0].ok for answer in answers)
    assert counting.most_in_flight == 2
    assert sum(counting.sizes) == 200


async def test_a_calls_events_go_as_one_record_per_shard(settings: Settings) -> None:
    """A call's events bound for one shard travel as one aggregated record; each event
    is answered with its record's shard and sequence number, and every key's events keep
    their order inside the records."""
    batch = events(300, users=40)
    async with KinesisProducer(settings) as producer:
        results = await producer.put_events(batch)
    assert all(r.ok for r in results)
    records = raw_records(settings)
    assert 1 <= len(records) <= settings.stream_shards  # 300 events, one record per shard
    where = {}
    for record in records:
        for message in decode(record["Data"]):
            event = Event.from_json(message.value)
            where[event.event_id] = (record["ShardId"], record["SequenceNumber"])
            assert message.key == event.partition_key.encode()
    assert {r.event_id: (r.shard_id, r.sequence_number) for r in results} == where
    for user in {e.user_id for e in batch}:
        sent = [e.event_id for e in batch if e.user_id == user]
        got = [e.event_id for k, e in read_stream(settings) if k == user]
        assert got == sent


async def test_without_aggregation_each_event_is_its_own_record(settings: Settings) -> None:
    plain = settings.model_copy(update={"event_aggregation": False})
    async with KinesisProducer(plain) as producer:
        results = await producer.put_events(events(30))
    assert all(r.ok for r in results)
    assert len(raw_records(settings)) == 30


class ThrottledShards(ThrottlingKinesis):
    """`ThrottlingKinesis` that lists the real shards, so the producer aggregates."""

    async def list_shards(self, **kwargs: Any) -> dict[str, Any]:
        return dict(await self.real.list_shards(**kwargs))


async def test_an_aggregated_record_refused_is_resent_whole_and_lands_once(
    settings: Settings,
) -> None:
    batch = events(200, users=30)
    async with async_client(settings, "kinesis") as real:
        flaky = ThrottledShards(real, throttled_calls=2)
        async with KinesisProducer(
            settings, client=cast(Any, flaky), base_backoff=0.001
        ) as producer:
            results = await producer.put_events(batch)
    assert all(r.ok for r in results)
    assert flaky.calls >= 2
    on_stream = read_stream(settings)
    assert sorted(e.event_id for _, e in on_stream) == sorted(e.event_id for e in batch)
    for user in {e.user_id for e in batch}:
        sent = [e.event_id for e in batch if e.user_id == user]
        assert [e.event_id for k, e in on_stream if k == user] == sent
