"""Resharding 2 -> 4 while events flow: nothing lost, each user's events in order.

A closed parent is read to its end and checkpointed SHARD_END before its children are
leased, so a user's events, which move from a parent to a child with the reshard, are
processed in the order they were put.

This runs on kinesis-mock only: moto's SplitShard re-puts the parent's records into the
children, keeps routing new records to the closed parent by hash range, and never ends
a closed shard's iterator, so no consumer can observe a faithful reshard there.
"""

from __future__ import annotations

import asyncio

from recstream.aws import sync_client
from recstream.settings import Settings
from streams.kinesis import consumer_of, make_app, running
from streams.leases import SHARD_END, DynamoDBLeaseStore
from streams.schema import Event
from tests.streams.kinesis_helpers import make_events, put_events, wait_until

USERS = 40


async def test_reshard_two_to_four_while_events_flow(kinesis_mock_settings: Settings) -> None:
    settings = kinesis_mock_settings.model_copy(
        update={"poll_interval_s": 0.05, "lease_duration_s": 3.0}
    )
    app = make_app(settings, "test-reshard")
    seen: list[Event] = []

    @app.agent(app.topic(settings.stream_name, value_serializer="raw"))
    async def collect(stream):  # type: ignore[no-untyped-def]
        async for value in stream:
            seen.append(Event.from_json(value))

    # Each PutRecords call carries one event per user, so a partial-failure retry can
    # never reorder one user's events.
    events = make_events(40 * USERS, users=USERS)
    batches = [events[i : i + USERS] for i in range(0, len(events), USERS)]
    partitions_seen: set[int] = set()

    async with running(app):
        consumer = consumer_of(app)
        for index, batch in enumerate(batches):
            await put_events(settings, batch)
            partitions_seen |= {tp.partition for tp in consumer.assignment()}
            if index == len(batches) // 2:
                await asyncio.to_thread(_reshard, settings, 4)
            await asyncio.sleep(0.02)

        def all_seen() -> bool:
            partitions_seen.update(tp.partition for tp in consumer.assignment())
            return len({e.event_id for e in seen}) == len(events)

        await wait_until(all_seen, timeout=60, what="every event after the reshard")

    async with DynamoDBLeaseStore(settings) as store:
        leases = await store.list_leases(f"test-reshard#{settings.stream_name}")
    # Both parents were read to their end; their children were read too.
    parents = [lease for lease in leases if not lease.parent_shard_ids]
    assert len(parents) == 2
    assert all(lease.checkpoint.sequence_number == SHARD_END for lease in parents)
    assert len(leases) > 2
    assert max(partitions_seen) >= 2
    # Exactly once in effect (dedupe by event id), and in order per user.
    assert {e.event_id for e in seen} == {e.event_id for e in events}
    first_seen: dict[str, list[str]] = {}
    done: set[str] = set()
    for event in seen:
        if event.event_id not in done:
            done.add(event.event_id)
            first_seen.setdefault(event.actor, []).append(event.event_id)
    for user, ids in first_seen.items():
        assert ids == sorted(ids), f"{user}'s events out of order"


def _reshard(settings: Settings, target: int) -> None:
    kinesis = sync_client(settings, "kinesis")
    kinesis.update_shard_count(
        StreamName=settings.stream_name, TargetShardCount=target, ScalingType="UNIFORM_SCALING"
    )


async def test_a_new_app_at_latest_skips_what_reshard_children_already_hold(
    kinesis_mock_settings: Settings,
) -> None:
    """RECSTREAM_START_POSITION=latest on a stream that was resharded before the app first
    ran: the children are met together with their parents, so the start position applies
    to them too. Reading them from TRIM_HORIZON (as children of parents the app reads)
    would replay everything they received before the app started."""
    settings = kinesis_mock_settings.model_copy(
        update={"poll_interval_s": 0.05, "lease_duration_s": 3.0, "start_position": "latest"}
    )
    before = make_events(3 * USERS, users=USERS, prefix="old")
    await put_events(settings, before[:USERS])
    await asyncio.to_thread(_reshard, settings, 4)
    await asyncio.to_thread(_wait_active, settings)
    await put_events(settings, before[USERS:])  # lands in the open children
    await asyncio.sleep(1.5)  # AT_TIMESTAMP has millisecond precision; keep "old" clear

    app = make_app(settings, "test-reshard-latest")
    seen: list[Event] = []

    @app.agent(app.topic(settings.stream_name, value_serializer="raw"))
    async def collect(stream):  # type: ignore[no-untyped-def]
        async for value in stream:
            seen.append(Event.from_json(value))

    after = make_events(2 * USERS, users=USERS, prefix="new")
    async with running(app):
        consumer = consumer_of(app)
        # The closed parents are read (at LATEST: nothing) to SHARD_END, then the children.
        await wait_until(
            lambda: (
                len(consumer.assignment()) >= 2
                and all(tp.partition >= 2 for tp in consumer.assignment())
            ),
            timeout=60,
            what="the children to be leased after their parents ended",
        )
        await put_events(settings, after)
        await wait_until(
            lambda: {e.event_id for e in seen} >= {e.event_id for e in after},
            timeout=60,
            what="the events put after the start",
        )
    old = {e.event_id for e in before} & {e.event_id for e in seen}
    assert not old, f"{len(old)} events from before the start were replayed"


def _wait_active(settings: Settings) -> None:
    kinesis = sync_client(settings, "kinesis")
    waiter = kinesis.get_waiter("stream_exists")
    waiter.wait(StreamName=settings.stream_name, WaiterConfig={"Delay": 0.2, "MaxAttempts": 100})
