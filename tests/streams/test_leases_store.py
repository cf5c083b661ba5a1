"""One contract for every LeaseStore: the in-memory one and DynamoDB on a real moto server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from recstream.settings import Settings
from streams.leases import (
    SHARD_END,
    TRIM_HORIZON,
    Checkpoint,
    DynamoDBLeaseStore,
    InMemoryLeaseStore,
    LeaseStore,
)

SCOPE = "app#stream"
# kinesis-mock and real Kinesis issue 56-digit sequence numbers; they must round-trip as text
SEQ = "49655183945633283464536789012345678901234567890123456789"


@pytest.fixture(params=["memory", "dynamodb"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[LeaseStore]:
    if request.param == "memory":
        yield InMemoryLeaseStore()
        return
    settings: Settings = request.getfixturevalue("settings")
    async with DynamoDBLeaseStore(settings) as dynamodb:
        yield dynamodb


async def test_create_is_unowned_at_trim_horizon_and_only_once(store: LeaseStore) -> None:
    assert await store.create_lease(SCOPE, "shard-1", parent_shard_ids=("p0", "p1"), now=10.0)
    assert not await store.create_lease(SCOPE, "shard-1", parent_shard_ids=(), now=11.0)
    lease = await store.get_lease(SCOPE, "shard-1")
    assert lease is not None
    assert lease.shard_id == "shard-1"
    assert lease.owner is None
    assert lease.counter == 0
    assert lease.checkpoint == Checkpoint(TRIM_HORIZON)
    assert lease.parent_shard_ids == ("p0", "p1")
    assert lease.last_renewed == 10.0
    assert lease.created_at == 10.0
    assert lease.start_here is False


async def test_start_here_round_trips_and_survives_writes(store: LeaseStore) -> None:
    assert await store.create_lease(SCOPE, "c", parent_shard_ids=("p",), now=5.0, start_here=True)
    taken = await store.take_lease(
        SCOPE, "c", owner="w", expected_owner=None, expected_counter=0, now=6.0, expires_at=9.0
    )
    assert taken is not None
    lease = await store.get_lease(SCOPE, "c")
    assert lease is not None
    assert lease.start_here is True
    assert lease.created_at == 5.0


async def test_list_is_scoped_and_sorted(store: LeaseStore) -> None:
    for shard in ("s-2", "s-1"):
        await store.create_lease(SCOPE, shard, parent_shard_ids=(), now=1.0)
    await store.create_lease("other#stream", "s-3", parent_shard_ids=(), now=1.0)
    assert [lease.shard_id for lease in await store.list_leases(SCOPE)] == ["s-1", "s-2"]
    assert [lease.shard_id for lease in await store.list_leases("other#stream")] == ["s-3"]
    assert await store.get_lease(SCOPE, "s-3") is None


async def test_take_is_conditional_on_counter_and_owner(store: LeaseStore) -> None:
    await store.create_lease(SCOPE, "s", parent_shard_ids=(), now=1.0)
    taken = await store.take_lease(
        SCOPE, "s", owner="a", expected_owner=None, expected_counter=0, now=2.0, expires_at=5.0
    )
    assert taken is not None
    assert (taken.owner, taken.counter, taken.expires_at) == ("a", 1, 5.0)
    # b read the lease before a took it: its take must fail
    assert (
        await store.take_lease(
            SCOPE, "s", owner="b", expected_owner=None, expected_counter=0, now=2.0, expires_at=5.0
        )
        is None
    )
    # right counter, wrong idea of the owner
    assert (
        await store.take_lease(
            SCOPE, "s", owner="b", expected_owner="c", expected_counter=1, now=2.0, expires_at=5.0
        )
        is None
    )
    stolen = await store.take_lease(
        SCOPE, "s", owner="b", expected_owner="a", expected_counter=1, now=3.0, expires_at=6.0
    )
    assert stolen is not None
    assert (stolen.owner, stolen.counter) == ("b", 2)
    assert (
        await store.take_lease(
            SCOPE,
            "missing",
            owner="b",
            expected_owner=None,
            expected_counter=0,
            now=3.0,
            expires_at=6.0,
        )
        is None
    )


async def test_renew_only_by_the_holder_at_its_counter(store: LeaseStore) -> None:
    await store.create_lease(SCOPE, "s", parent_shard_ids=(), now=1.0)
    await store.take_lease(
        SCOPE, "s", owner="a", expected_owner=None, expected_counter=0, now=2.0, expires_at=5.0
    )
    renewed = await store.renew_lease(
        SCOPE, "s", owner="a", expected_counter=1, now=3.0, expires_at=6.0
    )
    assert renewed is not None
    assert (renewed.counter, renewed.last_renewed, renewed.expires_at) == (2, 3.0, 6.0)
    assert (
        await store.renew_lease(SCOPE, "s", owner="a", expected_counter=1, now=4.0, expires_at=7.0)
        is None
    )
    assert (
        await store.renew_lease(SCOPE, "s", owner="b", expected_counter=2, now=4.0, expires_at=7.0)
        is None
    )


async def test_release_keeps_the_checkpoint(store: LeaseStore) -> None:
    await store.create_lease(SCOPE, "s", parent_shard_ids=(), now=1.0)
    await store.take_lease(
        SCOPE, "s", owner="a", expected_owner=None, expected_counter=0, now=2.0, expires_at=5.0
    )
    await store.update_checkpoint(
        SCOPE, "s", Checkpoint(SEQ, 3), owner="a", expected_counter=1, now=2.5, expires_at=5.5
    )
    assert not await store.release_lease(SCOPE, "s", owner="b", expected_counter=2, now=3.0)
    assert not await store.release_lease(SCOPE, "s", owner="a", expected_counter=1, now=3.0)
    assert await store.release_lease(SCOPE, "s", owner="a", expected_counter=2, now=3.0)
    lease = await store.get_lease(SCOPE, "s")
    assert lease is not None
    assert (lease.owner, lease.counter, lease.checkpoint) == (None, 3, Checkpoint(SEQ, 3))
    # unowned again: anyone may take it at the new counter
    assert await store.take_lease(
        SCOPE, "s", owner="b", expected_owner=None, expected_counter=3, now=4.0, expires_at=7.0
    )


async def test_checkpoint_is_refused_to_a_stale_owner(store: LeaseStore) -> None:
    await store.create_lease(SCOPE, "s", parent_shard_ids=(), now=1.0)
    await store.take_lease(
        SCOPE, "s", owner="a", expected_owner=None, expected_counter=0, now=2.0, expires_at=5.0
    )
    written = await store.update_checkpoint(
        SCOPE, "s", Checkpoint(SEQ, 7), owner="a", expected_counter=1, now=3.0, expires_at=6.0
    )
    assert written is not None
    assert (written.checkpoint, written.counter) == (Checkpoint(SEQ, 7), 2)
    await store.take_lease(
        SCOPE, "s", owner="b", expected_owner="a", expected_counter=2, now=4.0, expires_at=7.0
    )
    assert (
        await store.update_checkpoint(
            SCOPE, "s", Checkpoint("1"), owner="a", expected_counter=2, now=5.0, expires_at=8.0
        )
        is None
    )
    lease = await store.get_lease(SCOPE, "s")
    assert lease is not None
    assert (lease.owner, lease.checkpoint) == ("b", Checkpoint(SEQ, 7))


async def test_delete_only_finished_leases(store: LeaseStore) -> None:
    await store.create_lease(SCOPE, "s", parent_shard_ids=(), now=1.0)
    assert not await store.delete_lease(SCOPE, "s")
    await store.take_lease(
        SCOPE, "s", owner="a", expected_owner=None, expected_counter=0, now=2.0, expires_at=5.0
    )
    await store.update_checkpoint(
        SCOPE, "s", Checkpoint(SHARD_END), owner="a", expected_counter=1, now=3.0, expires_at=6.0
    )
    assert await store.delete_lease(SCOPE, "s")
    assert await store.get_lease(SCOPE, "s") is None
    assert not await store.delete_lease(SCOPE, "s")
