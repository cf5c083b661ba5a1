"""Leases on the real thing: DynamoDB on moto server, Kinesis on moto and on kinesis-mock.

Coordinators here run their own task (`start()`/`stop()`) with lease durations of about a
second, or are stepped with a settable clock where expiry is the point of the test. Waits
are bounded only to stop a hung test; nothing asserts on how long anything took.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator

import pytest

from recstream.aws import async_client, sync_client
from recstream.errors import ResourceNotFound
from recstream.settings import Settings
from streams.leases import (
    SHARD_END,
    TRIM_HORIZON,
    Checkpoint,
    DynamoDBLeaseStore,
    KinesisShardSource,
    LeaseCoordinator,
    LeaseLost,
    read_leases,
)
from tests.conftest import REPO, LocalStack, make_settings, unique
from tests.streams.leases_helpers import FakeClock, Recorder, eventually, stepped


@pytest.fixture
def four_shards(local_stack: LocalStack) -> Settings:
    return make_settings(local_stack, stream_shards=4, lease_duration_s=1.0)


@pytest.fixture
async def store(four_shards: Settings) -> AsyncIterator[DynamoDBLeaseStore]:
    async with DynamoDBLeaseStore(four_shards) as dynamodb:
        yield dynamodb


def coordinator(
    settings: Settings,
    worker: str,
    recorder: Recorder,
    *,
    renew_interval_s: float | None = None,
    take_interval_s: float | None = None,
) -> LeaseCoordinator:
    """A coordinator with the default store (DynamoDB) and shard source (ListShards)."""
    return LeaseCoordinator(
        settings,
        app_id="app",
        stream_name=settings.stream_name,
        worker_id=worker,
        on_change=recorder,
        renew_interval_s=renew_interval_s,
        take_interval_s=take_interval_s,
    )


async def owners(store: DynamoDBLeaseStore, settings: Settings) -> list[str | None]:
    leases = await store.list_leases(f"app#{settings.stream_name}")
    return [lease.owner for lease in leases]


async def test_two_workers_split_four_shards_and_a_graceful_stop_hands_over(
    four_shards: Settings, store: DynamoDBLeaseStore
) -> None:
    # Leases last 30 s but both workers cycle every 0.2 s: any takeover seen within the
    # 20 s wait below must come from a release, never from an expiry.
    settings = four_shards.model_copy(update={"lease_duration_s": 30.0})
    rec_a, rec_b = Recorder(), Recorder()
    a = coordinator(settings, "a", rec_a, renew_interval_s=0.2, take_interval_s=0.2)
    b = coordinator(settings, "b", rec_b, renew_interval_s=0.2, take_interval_s=0.2)
    await a.start()
    assert len(a.owned()) == 4
    await b.start()
    try:
        await eventually(lambda: len(a.owned()) == len(b.owned()) == 2, "a 2+2 split")
        await eventually(lambda: rec_a.current == a.owned(), "a's on_change to catch up")
        await eventually(lambda: rec_b.current == b.owned(), "b's on_change to catch up")
        assert a.owned().isdisjoint(b.owned())
        assert sorted(map(str, await owners(store, settings))) == ["a", "a", "b", "b"]
        assert not rec_a.problems
        assert not rec_b.problems
        assert any(revoked for _, revoked in rec_a.calls)  # a was told what b stole

        await a.stop()
        assert a.owned() == frozenset()
        assert "a" not in await owners(store, settings)  # released, not abandoned
        await eventually(lambda: len(b.owned()) == 4, "b to take a's released leases", 20)
        assert await owners(store, settings) == ["b"] * 4
    finally:
        await a.stop()
        await b.stop()
    assert await owners(store, settings) == [None] * 4


async def test_a_sigkilled_worker_loses_its_leases_after_expiry(
    four_shards: Settings, store: DynamoDBLeaseStore
) -> None:
    env = {
        **os.environ,
        "RECSTREAM_AWS_ENDPOINT_URL": str(four_shards.aws_endpoint_url),
        "RECSTREAM_STREAM_NAME": four_shards.stream_name,
        "RECSTREAM_TABLE_PREFIX": four_shards.table_prefix,
        "RECSTREAM_LEASE_DURATION_S": str(four_shards.lease_duration_s),
    }
    worker = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.streams.lease_worker",
        "app",
        "doomed",
        cwd=REPO,
        env=env,
        stdout=asyncio.subprocess.PIPE,
    )
    b: LeaseCoordinator | None = None
    try:
        assert worker.stdout is not None
        line = await asyncio.wait_for(worker.stdout.readline(), 60)
        assert len(json.loads(line)["owned"]) == 4
        rec_b = Recorder()
        b = taker = coordinator(four_shards, "b", rec_b)
        await taker.start()
        await eventually(lambda: len(taker.owned()) == 2, "b to steal up to its share")
        worker.send_signal(signal.SIGKILL)
        await asyncio.wait_for(worker.wait(), 10)
        await eventually(lambda: len(taker.owned()) == 4, "b to take the dead worker's leases")
        assert await owners(store, four_shards) == ["b"] * 4
        await eventually(lambda: rec_b.current == taker.owned(), "b's on_change")
    finally:
        if worker.returncode is None:
            worker.kill()
            await worker.wait()
        if b is not None:
            await b.stop()


async def test_expiry_and_a_stale_worker_on_dynamodb(
    four_shards: Settings, store: DynamoDBLeaseStore
) -> None:
    clock = FakeClock()
    a = stepped(four_shards, "a", store, clock, None)
    b = stepped(four_shards, "b", store, clock, None)
    await a.run_cycle()
    assert len(a.owned()) == 4
    shard = sorted(a.owned())[0]
    await a.checkpoint(shard, Checkpoint("41", 2))
    # a pauses (a long GC, a frozen VM). Within one lease duration b only steals.
    for _ in range(3):
        await b.run_cycle()
        clock.advance(four_shards.lease_duration_s / 4)
    assert len(b.owned()) == 2
    clock.advance(four_shards.lease_duration_s)
    await b.run_cycle()
    assert len(b.owned()) == 4
    await b.checkpoint(shard, Checkpoint("42"))
    # a wakes up still believing it holds its leases; DynamoDB refuses its checkpoint
    assert shard in a.owned()
    with pytest.raises(LeaseLost, match="lost the lease"):
        await a.checkpoint(shard, Checkpoint("41", 3))
    assert await b.get_checkpoint(shard) == Checkpoint("42")
    assert len(a.owned()) == 3  # the refused checkpoint dropped that lease at once
    await a.run_cycle()
    # its three renewals failed, so all were revoked; being alive again, it may have
    # stolen one lease back (b holds 4, a 0) with a fresh counter
    assert len(a.owned()) <= 1
    assert (await owners(store, four_shards)).count("b") >= 3


async def test_children_of_a_split_wait_for_the_parent(
    four_shards: Settings, store: DynamoDBLeaseStore
) -> None:
    kinesis = sync_client(four_shards, "kinesis")
    kinesis.split_shard(
        StreamName=four_shards.stream_name,
        ShardToSplit="shardId-000000000000",
        NewStartingHashKey=str(2**125),
    )
    clock = FakeClock()
    a = stepped(four_shards, "a", store, clock, None)
    b = stepped(four_shards, "b", store, clock, None)
    for _ in range(4):
        await a.run_cycle()
        await b.run_cycle()
    leases = {lease.shard_id: lease for lease in await a.snapshot()}
    children = {s for s, lease in leases.items() if lease.parent_shard_ids}
    assert len(children) == 2
    assert {leases[c].parent_shard_ids for c in children} == {("shardId-000000000000",)}
    assert all(leases[c].owner is None for c in children)
    assert not children & (a.owned() | b.owned())
    holder = a if "shardId-000000000000" in a.owned() else b
    await holder.checkpoint("shardId-000000000000", Checkpoint(SHARD_END))
    for _ in range(4):
        await a.run_cycle()
        await b.run_cycle()
    assert children <= a.owned() | b.owned()
    assert len(a.owned()) + len(b.owned()) == 5  # 3 untouched shards + 2 children
    assert await a.get_checkpoint("shardId-000000000000") == Checkpoint(SHARD_END)


async def test_discovery_on_kinesis_mock_after_a_reshard(kinesis_mock_settings: Settings) -> None:
    settings = kinesis_mock_settings
    app_id = unique("app")
    async with async_client(settings, "kinesis") as kinesis:
        put = await kinesis.put_record(
            StreamName=settings.stream_name, Data=b"x", PartitionKey="user-1"
        )
    sequence = put["SequenceNumber"]
    assert len(sequence) >= 50  # real-style sequence numbers, unlike moto's 1, 2, 3
    async with DynamoDBLeaseStore(settings) as store:
        clock = FakeClock()
        a = stepped(settings, "a", store, clock, None, app_id=app_id)
        await a.run_cycle()
        parents = sorted(a.owned())
        assert len(parents) == 2
        await a.checkpoint(put["ShardId"], Checkpoint(sequence, 4))
        assert await a.get_checkpoint(put["ShardId"]) == Checkpoint(sequence, 4)

        kinesis_sync = sync_client(settings, "kinesis")
        kinesis_sync.update_shard_count(
            StreamName=settings.stream_name, TargetShardCount=4, ScalingType="UNIFORM_SCALING"
        )
        deadline = time.monotonic() + 30
        while (
            kinesis_sync.describe_stream_summary(StreamName=settings.stream_name)[
                "StreamDescriptionSummary"
            ]["StreamStatus"]
            != "ACTIVE"
        ):
            assert time.monotonic() < deadline, "kinesis-mock did not finish resharding"
            await asyncio.sleep(0.1)
        await a.refresh_shards()
        await a.run_cycle()
        leases = {lease.shard_id: lease for lease in await a.snapshot()}
        assert len(leases) == 6
        children = {s: lease for s, lease in leases.items() if lease.parent_shard_ids}
        assert len(children) == 4
        assert {p for lease in children.values() for p in lease.parent_shard_ids} == set(parents)
        assert all(lease.checkpoint == Checkpoint(TRIM_HORIZON) for lease in children.values())
        assert a.owned() == set(parents)  # children wait for SHARD_END

        done = parents[0]
        await a.checkpoint(done, Checkpoint(SHARD_END))
        await a.run_cycle()
        ready = {s for s, lease in children.items() if lease.parent_shard_ids == (done,)}
        assert len(ready) == 2
        assert a.owned() == {parents[1]} | ready
        await a.stop()


async def test_missing_stream_or_table_fail_start_with_a_fix(four_shards: Settings) -> None:
    missing_stream = four_shards.model_copy(update={"stream_name": "no-such-stream"})
    a = coordinator(missing_stream, "a", Recorder())
    with pytest.raises(ResourceNotFound, match=r"no-such-stream.*recstream up"):
        await a.start()
    assert a.owned() == frozenset()

    missing_table = four_shards.model_copy(update={"table_prefix": unique("nope")})
    b = coordinator(missing_table, "b", Recorder())
    with pytest.raises(ResourceNotFound, match=r"lease table.*nope.*recstream up"):
        await b.start()
    await b.stop()  # idempotent after a failed start


async def test_three_workers_on_seven_shards_settle_at_3_2_2(local_stack: LocalStack) -> None:
    settings = make_settings(local_stack, stream_shards=7, lease_duration_s=1.0)
    recorders = [Recorder() for _ in range(3)]
    workers = [coordinator(settings, f"w{i}", recorders[i]) for i in range(3)]
    try:
        # all three start at once: they race for the same unowned leases
        await asyncio.gather(*(w.start() for w in workers))
        await eventually(
            lambda: sorted(len(w.owned()) for w in workers) == [2, 2, 3], "a 3+2+2 split"
        )
        held = [w.owned() for w in workers]
        assert len(set().union(*held)) == 7
        for worker, recorder in zip(workers, recorders, strict=True):
            await eventually(lambda: recorder.current == worker.owned(), "on_change")  # noqa: B023
            assert not recorder.problems
        leases = await read_leases(settings, app_id="app", stream_name=settings.stream_name)
        assert sorted(str(lease.owner) for lease in leases) == sorted(
            ["w0"] * len(held[0]) + ["w1"] * len(held[1]) + ["w2"] * len(held[2])
        )
        assert all(lease.expires_at > lease.last_renewed for lease in leases)
    finally:
        for worker in workers:
            await worker.stop()
    leases = await read_leases(settings, app_id="app", stream_name=settings.stream_name)
    assert [lease.owner for lease in leases] == [None] * 7


async def test_listing_follows_pages(
    four_shards: Settings, kinesis_mock_settings: Settings
) -> None:
    # ListShards one shard per call (on kinesis-mock, which pages like Kinesis does)
    source = KinesisShardSource(
        kinesis_mock_settings, kinesis_mock_settings.stream_name, page_size=1
    )
    shards = await source()
    assert [s.shard_id for s in shards] == [f"shardId-{i:012d}" for i in range(2)]
    assert shards[0].starting_hash_key == 0
    assert shards[-1].ending_hash_key == 2**128 - 1
    assert not any(s.closed for s in shards)
    # a Scan of ten items per page
    async with DynamoDBLeaseStore(four_shards, page_size=10) as store:
        for i in range(25):
            await store.create_lease("app#s", f"shard-{i:02d}", parent_shard_ids=(), now=1.0)
        await store.create_lease("other#s", "shard-x", parent_shard_ids=(), now=1.0)
        leases = await store.list_leases("app#s")
    assert [lease.shard_id for lease in leases] == [f"shard-{i:02d}" for i in range(25)]
