"""The kinesis:// transport end to end: real faust agents on moto and on kinesis-mock."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter

import faust
import pytest
from faust.exceptions import ImproperlyConfigured, ProducerSendError
from prometheus_client import REGISTRY

from recstream.settings import Settings
from streams.kinesis import consumer_of, make_app, running, shard_id_of, unpack
from streams.leases import TRIM_HORIZON, DynamoDBLeaseStore
from streams.schema import Event
from tests.streams.kinesis_helpers import make_events, owner_name, put_events, wait_until


def ids_into(app: faust.App, settings: Settings, seen: list[str]) -> None:
    """An agent of ``app`` on the stream that appends each event's id to ``seen``."""

    @app.agent(app.topic(settings.stream_name, value_serializer="raw"))
    async def collect(stream):  # type: ignore[no-untyped-def]
        async for value in stream:
            seen.append(Event.from_json(value).event_id)


async def test_every_record_single_and_aggregated_reaches_an_agent(
    stream_settings: Settings,
) -> None:
    settings = stream_settings
    single = make_events(600, prefix="single")
    aggregated = make_events(400, prefix="agg")
    await put_events(settings, single)
    await put_events(settings, aggregated, aggregate=True)

    app = make_app(settings, "test-transport")
    seen: list[Event] = []

    @app.agent(app.topic(settings.stream_name, value_serializer="raw"))
    async def collect(stream):  # type: ignore[no-untyped-def]
        async for value in stream:
            seen.append(Event.from_json(value))

    async with running(app):
        await wait_until(lambda: len(seen) >= 1000, what="1,000 events at the agent")
        consumer = consumer_of(app)
        assert {tp.partition for tp in consumer.assignment()} == {0, 1}
        # Wait for the commit that follows the acks, then check the checkpoints.
        await wait_until(
            lambda: all(p.committed_offset > 0 for p in consumer._partitions.values()),
            what="a checkpoint on both shards",
        )

    ids = Counter(e.event_id for e in seen)
    assert len(ids) == 1000
    labels = {"stream": settings.stream_name}
    assert (REGISTRY.get_sample_value("recstream_stream_messages_total", labels) or 0) >= 1000
    written = {**labels, "outcome": "written"}
    assert (REGISTRY.get_sample_value("recstream_stream_checkpoints_total", written) or 0) >= 2
    assert set(ids) == {e.event_id for e in single + aggregated}
    # Per user, events arrive in the order they were put (single first, then aggregated).
    for user in {e.user_id for e in seen}:
        mine = [e.event_id for e in seen if e.user_id == user]
        assert mine == sorted(mine, key=lambda i: (i.startswith("single") is False, i))

    async with DynamoDBLeaseStore(settings) as store:
        leases = await store.list_leases(f"test-transport#{settings.stream_name}")
    assert len(leases) == 2
    assert all(lease.checkpoint.sequence_number.isdigit() for lease in leases)
    # The app stopped cleanly: it released its leases.
    assert all(lease.owner is None for lease in leases)


def test_unsupported_settings_are_refused(settings: Settings) -> None:
    with pytest.raises(ImproperlyConfigured, match="processing_guarantee"):
        make_app(settings, "bad", processing_guarantee="exactly_once")
    with pytest.raises(ImproperlyConfigured, match="table_standby_replicas"):
        make_app(settings, "bad", table_standby_replicas=1)
    with pytest.raises(ImproperlyConfigured, match="separator"):
        make_app(settings, "recs#v2")


@pytest.mark.parametrize("aggregate", [False, True], ids=["single", "aggregated"])
async def test_the_app_producer_round_trips_keys_values_and_headers(
    stream_settings: Settings, aggregate: bool
) -> None:
    settings = stream_settings
    app = make_app(settings, "test-producer", aggregate=aggregate)
    topic = app.topic(settings.stream_name, key_serializer="raw", value_serializer="raw")
    seen: list[tuple[bytes, bytes, dict[str, bytes]]] = []

    @app.agent(topic)
    async def collect(stream):  # type: ignore[no-untyped-def]
        async for event in stream.events():
            seen.append((event.key, event.value, dict(event.headers)))

    async with running(app):
        futures = [
            await topic.send(
                key=f"user-{i % 7}".encode(),
                value=f"{i:04d}".encode(),
                headers={"n": str(i).encode()},
            )
            for i in range(300)
        ]
        await app.producer.flush()
        metadata = [await f for f in futures]
        assert {m.partition for m in metadata} <= {0, 1}
        await wait_until(lambda: len(seen) >= 300, what="300 produced messages")

    assert sorted(v for _, v, _ in seen) == [f"{i:04d}".encode() for i in range(300)]
    for key in {k for k, _, _ in seen}:
        values = [v for k, v, _ in seen if k == key]
        assert values == sorted(values), f"{key!r} out of order"
    assert all(h["n"] == str(int(v)).encode() for _, v, h in seen)


async def test_a_worker_whose_lease_was_stolen_cannot_checkpoint(
    stream_settings: Settings,
) -> None:
    settings = stream_settings.model_copy(update={"worker_id": "victim"})
    # No periodic commits: the only checkpoint attempt is the one after the steal.
    app = make_app(settings, "test-stale", broker_commit_interval=3600.0)
    seen: list[bytes] = []

    @app.agent(app.topic(settings.stream_name, value_serializer="raw"))
    async def collect(stream):  # type: ignore[no-untyped-def]
        async for value in stream:
            seen.append(value)

    scope = f"test-stale#{settings.stream_name}"
    async with DynamoDBLeaseStore(settings) as store, running(app):
        consumer = consumer_of(app)
        await wait_until(lambda: len(consumer.assignment()) == 2, what="both shards leased")
        await put_events(settings, make_events(100))
        await wait_until(lambda: len(seen) >= 100, what="100 events processed")

        # Another worker takes one lease (as after a long GC pause of this one) and keeps
        # it renewed; one each is a fair share, so the victim does not steal it back.
        stolen: dict[str, int] = {}
        while not stolen:
            lease = (await store.list_leases(scope))[0]
            now = time.time()
            taken = await store.take_lease(
                scope, lease.shard_id, owner="thief", expected_owner=lease.owner,
                expected_counter=lease.counter, now=now, expires_at=now + 3,
            )  # fmt: skip
            if taken is not None:
                stolen[lease.shard_id] = taken.counter

        async def keep_renewing() -> None:
            while True:
                await asyncio.sleep(0.3)
                for shard_id, counter in stolen.items():
                    now = time.time()
                    renewed = await store.renew_lease(
                        scope, shard_id, owner="thief", expected_counter=counter,
                        now=now, expires_at=now + 3,
                    )  # fmt: skip
                    assert renewed is not None, "the victim took the lease back"
                    stolen[shard_id] = renewed.counter

        (stolen_shard,) = stolen
        renewer = asyncio.create_task(keep_renewing())
        try:
            await wait_until(
                lambda: (
                    {shard_id_of(tp.partition) for tp in consumer.assignment()}
                    == {"shardId-000000000000", "shardId-000000000001"} - {stolen_shard}
                ),
                what="the victim to let go of the stolen shard",
            )
            leases = {lease.shard_id: lease for lease in await store.list_leases(scope)}
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer

    assert consumer.refused_checkpoints >= 1
    assert leases[stolen_shard].owner == "thief"
    # The victim's acked-but-uncommitted work on the stolen shard was refused ...
    assert leases[stolen_shard].checkpoint.sequence_number == TRIM_HORIZON
    # ... while the shard it still holds was checkpointed when the rebalance committed.
    (kept,) = set(leases) - {stolen_shard}
    assert owner_name(leases[kept].owner) == "victim"
    assert leases[kept].checkpoint.sequence_number.isdigit()


@pytest.mark.parametrize("whole_records", [False, True], ids=["per-message", "whole-records"])
async def test_a_restarted_app_resumes_after_its_checkpoints(
    stream_settings: Settings, whole_records: bool
) -> None:
    settings = stream_settings
    seen: list[str] = []

    def build() -> faust.App:
        app = make_app(settings, "test-resume", whole_records=whole_records)

        @app.agent(app.topic(settings.stream_name, key_serializer="raw", value_serializer="raw"))
        async def collect(stream):  # type: ignore[no-untyped-def]
            async for event in stream.events():
                for message in unpack(event.key, event.value, event.headers):
                    seen.append(Event.from_json(message.value).event_id)

        return app

    first = make_events(300, prefix="a")
    await put_events(settings, first[:100])
    await put_events(settings, first[100:], aggregate=True)
    async with running(build()):
        await wait_until(lambda: len(seen) >= 300, what="the first 300 events")
    # Stopping committed everything; a new worker of the same app resumes after it.
    assert sorted(seen) == sorted(e.event_id for e in first)
    seen.clear()
    second = make_events(50, prefix="b")
    await put_events(settings, second, aggregate=True)
    async with running(build()) as app:
        readers = consumer_of(app).readers

        def caught_up() -> bool:
            current = readers()
            return (
                len(seen) >= 50
                and len(current) == 2
                and all(r.stats.millis_behind == 0 and not r.buffer for r in current.values())
            )

        # Read to the tip of both shards: a wrongly repeated record would be in `seen`.
        await wait_until(caught_up, what="the next 50 events and the tip of both shards")
    assert sorted(seen) == sorted(e.event_id for e in second)


@pytest.mark.parametrize("start", ["latest", "timestamp"])
async def test_start_position_latest_or_a_timestamp_skips_older_records(
    stream_settings: Settings, start: str
) -> None:
    await put_events(stream_settings, make_events(50, prefix="old"))
    if start == "timestamp":
        # Arrival timestamps have second precision in the emulators: keep clear of them.
        await asyncio.sleep(1.1)
        position = str(time.time())
        await asyncio.sleep(1.1)
    else:
        position = "latest"
    settings = stream_settings.model_copy(update={"start_position": position})
    app = make_app(settings, f"test-start-{start}")
    seen: list[str] = []

    ids_into(app, settings, seen)

    async with running(app):
        readers = consumer_of(app).readers
        # Once both readers have made a call, their iterators exist: LATEST is fixed.
        await wait_until(
            lambda: len(readers()) == 2 and all(r.stats.calls for r in readers().values()),
            what="both shards being read",
        )
        new = make_events(20, prefix="new")
        await put_events(settings, new)
        await wait_until(lambda: len(seen) >= 20, what="the new events")
    assert sorted(seen) == sorted(e.event_id for e in new)


async def test_batches_taken_with_stream_take_are_checkpointed(
    stream_settings: Settings,
) -> None:
    settings = stream_settings
    await put_events(settings, make_events(500), aggregate=True)
    app = make_app(settings, "test-take")
    batches: list[int] = []

    @app.agent(app.topic(settings.stream_name, value_serializer="raw"))
    async def collect(stream):  # type: ignore[no-untyped-def]
        async for values in stream.take(100, within=0.05):
            batches.append(len(values))

    async with running(app):
        consumer = consumer_of(app)
        await wait_until(lambda: sum(batches) >= 500, what="500 events in batches")
        await wait_until(
            lambda: sum(p.committed_offset for p in consumer._partitions.values()) == 500,
            what="every taken message checkpointed",
        )
    assert max(batches) > 1


async def test_a_graceful_stop_hands_the_shards_over_without_repeats(
    stream_settings: Settings,
) -> None:
    seen: list[bytes] = []

    def build(worker_id: str) -> faust.App:
        settings = stream_settings.model_copy(update={"worker_id": worker_id})
        app = make_app(settings, "test-graceful")

        @app.agent(app.topic(settings.stream_name, value_serializer="raw"))
        async def collect(stream):  # type: ignore[no-untyped-def]
            async for value in stream:
                seen.append(value)

        return app

    events = make_events(2000)
    await put_events(stream_settings, events)
    first = build("first")
    await first.start()
    try:
        await wait_until(lambda: len(seen) >= 500, what="the first worker to be busy")
    finally:
        await first.stop()  # commits what was acked and releases the leases
    async with running(build("second")):
        await wait_until(lambda: len(set(seen)) >= 2000, what="the rest by the second worker")
    # Only a message the first worker's agent was inside of when stopped (not yet acked)
    # may be processed again: at most one per agent.
    assert len(seen) - len(set(seen)) <= 1


async def test_sending_to_a_missing_stream_fails_the_send_not_the_producer(
    settings: Settings,
) -> None:
    app = make_app(settings, "test-missing")
    missing = f"{settings.stream_name}-missing"
    async with running(app):
        producer = app.producer
        with pytest.raises(ProducerSendError, match="not found"):
            await producer.send_and_wait(missing, None, b"x", None, None, None)
        # The producer lives on: the next send to an existing stream lands.
        metadata = await producer.send_and_wait(settings.stream_name, b"k", b"y", None, None, None)
        assert metadata.topic == settings.stream_name


async def test_acks_taken_before_a_seek_are_checkpointed_before_the_records_are_read_again(
    stream_settings: Settings,
) -> None:
    """After every rebalance faust seeks each partition back to its committed offset
    (`perform_seek`), which restarts the shard readers, while acks taken before it are
    still to be committed. The next commit must checkpoint them even when the restarted
    reader has not read that far again: on LocalStack, whose GetRecords is slower, it
    had not, the commit was skipped ("its sequence number is unknown") and faust,
    counting it as done, never offered those offsets again, so a restart read them again.
    """
    settings = stream_settings
    events = make_events(120)
    await put_events(settings, events[:60])
    await put_events(settings, events[60:], aggregate=True)
    # No timed commits: the test decides when faust commits.
    app = make_app(settings, "test-seek-acks", broker_commit_interval=3600.0)
    seen: list[str] = []

    ids_into(app, settings, seen)

    async with running(app):
        consumer = consumer_of(app)
        await wait_until(
            lambda: sum(len(offsets) for offsets in consumer._acked.values()) >= 120,
            what="all 120 events acked",
        )
        await consumer.perform_seek()
        # As if the restarted readers were still waiting for their first GetRecords.
        for partition in consumer._partitions.values():
            assert partition.reader is not None
            await partition.reader.stop()
        await consumer.commit()
        assert sum(p.committed_offset for p in consumer._partitions.values()) == 120
    # A new worker of the same app resumes after the checkpoints: nothing is read again.
    assert sorted(seen) == sorted(e.event_id for e in events)
    seen.clear()
    app = make_app(settings, "test-seek-acks")

    ids_into(app, settings, seen)

    async with running(app):
        readers = consumer_of(app).readers
        await wait_until(
            lambda: (
                len(readers()) == 2
                and all(r.stats.millis_behind == 0 and not r.buffer for r in readers().values())
            ),
            what="the tip of both shards",
        )
    assert seen == []


async def test_a_seek_before_the_first_checkpoint_reads_the_same_records_from_latest(
    stream_settings: Settings,
) -> None:
    """With start position LATEST and no checkpoint yet, a seek to the committed offset
    must read the records read before it again, at the same offsets: LATEST again would
    give the offsets faust acked to other records, and their commit would be lost."""
    settings = stream_settings.model_copy(update={"start_position": "latest"})
    app = make_app(settings, "test-seek-latest", broker_commit_interval=3600.0)
    seen: list[str] = []

    ids_into(app, settings, seen)

    async with running(app):
        consumer = consumer_of(app)
        readers = consumer.readers
        await wait_until(
            lambda: len(readers()) == 2 and all(r.stats.calls for r in readers().values()),
            what="both shards being read",
        )
        first = make_events(40, prefix="a")
        await put_events(settings, first)
        await wait_until(
            lambda: sum(len(offsets) for offsets in consumer._acked.values()) >= 40,
            what="the first 40 events acked",
        )
        await consumer.perform_seek()
        later = make_events(10, prefix="b")
        await put_events(settings, later)
        # The first 40 are read again (a seek repeats what was not committed), then the 10.
        await wait_until(
            lambda: set(seen) >= {e.event_id for e in later}, what="the 10 later events"
        )
        # Read again at the same offsets, the 10 are acked after the 40 (at LATEST again
        # they would be offsets 0 to 9, acked already).
        await wait_until(
            lambda: sum(len(offsets) for offsets in consumer._acked.values()) >= 50,
            what="the 10 later events acked at offsets after the first 40",
        )
        await consumer.commit()
        assert sum(p.committed_offset for p in consumer._partitions.values()) == 50
