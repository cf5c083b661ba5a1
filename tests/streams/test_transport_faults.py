"""The transport under transient faults: a failed checkpoint write, a failed rebalance.

Each fault is injected into one call of a real store or the real transport (a subclass or
a wrapper), everything else runs against kinesis-mock or moto.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import faust
import pytest

from recstream.errors import StoreUnavailable
from recstream.settings import Settings
from streams.kinesis import consumer_of, make_app, running
from streams.kinesis.transport import Transport
from streams.leases import SHARD_END, DynamoDBLeaseStore
from tests.conftest import LocalStack, make_settings
from tests.streams.kinesis_helpers import make_events, put_events, wait_until
from tests.streams.test_reshard import _reshard


class FlakyCheckpoints(DynamoDBLeaseStore):
    """The real lease store, whose checkpoint writes fail while ``failing`` is set."""

    failing = False
    failures = 0

    async def update_checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        if self.failing:
            self.failures += 1
            raise StoreUnavailable("injected DynamoDB outage")
        return await super().update_checkpoint(*args, **kwargs)


def collecting_app(settings: Settings, app_id: str, **kwargs: Any) -> tuple[faust.App, list[bytes]]:
    app = make_app(settings, app_id, **kwargs)
    seen: list[bytes] = []

    @app.agent(app.topic(settings.stream_name, value_serializer="raw"))
    async def collect(stream: Any) -> None:
        async for value in stream:
            seen.append(value)

    return app, seen


async def test_a_failed_checkpoint_is_retried_and_a_closed_shard_still_ends(
    local_stack: LocalStack,
) -> None:
    settings = make_settings(local_stack, kinesis_mock=True, stream_shards=1).model_copy(
        update={"poll_interval_s": 0.05, "lease_duration_s": 3.0}
    )
    store = FlakyCheckpoints(settings)
    async with store:
        await _checkpoint_fault(settings, store)


async def _checkpoint_fault(settings: Settings, store: FlakyCheckpoints) -> None:
    app, seen = collecting_app(settings, "t-ckpt", lease_store=store)
    async with running(app):
        consumer = consumer_of(app)
        await put_events(settings, make_events(20, prefix="a"))
        await wait_until(
            lambda: (
                len(seen) >= 20
                and all(p.committed_offset >= 20 for p in consumer._partitions.values())
            ),
            what="the first 20 committed",
        )
        store.failing = True  # the parent's last commits fail
        await put_events(settings, make_events(10, prefix="b"))
        await asyncio.to_thread(_reshard, settings, 2)
        await wait_until(lambda: len(seen) >= 30, what="the events before the split")
        await wait_until(lambda: store.failures > 0, what="a failed checkpoint")
        store.failing = False  # DynamoDB is back; nothing else will trigger a commit
        await put_events(settings, make_events(10, prefix="c"))  # go to the children
        await wait_until(lambda: len(seen) >= 40, timeout=60, what="the children's events")
        scope = f"t-ckpt#{settings.stream_name}"

        async def parent_ended() -> bool:
            leases = await store.list_leases(scope)
            return any(lease.checkpoint.sequence_number == SHARD_END for lease in leases)

        deadline = time.monotonic() + 30
        while not await parent_ended():
            if time.monotonic() > deadline:
                pytest.fail("the parent never reached SHARD_END after a failed checkpoint")
            await asyncio.sleep(0.2)
    assert len(seen) == 40


async def test_a_rebalance_that_fails_midway_is_redone(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings.model_copy(
        update={"lease_duration_s": 3.0, "poll_interval_s": 0.05, "worker_id": "w"}
    )
    armed = {"on": False, "fired": 0}
    original = Transport.load_shard_map

    async def flaky(self: Transport, client: Any, stream: str) -> Any:
        if armed["on"]:
            armed["on"] = False
            armed["fired"] += 1
            raise StoreUnavailable("injected: ListShards timed out")
        return await original(self, client, stream)

    app, seen = collecting_app(settings, "t-rec")
    scope = f"t-rec#{settings.stream_name}"
    async with DynamoDBLeaseStore(settings) as store, running(app):
        consumer = consumer_of(app)
        await wait_until(lambda: len(consumer.assignment()) == 2, what="both shards")
        await put_events(settings, make_events(20, prefix="a"))
        await wait_until(lambda: len(seen) >= 20, what="the first events")
        # Another worker takes shard 0 for a moment, then hands it back.
        [lease] = [x for x in await store.list_leases(scope) if x.shard_id.endswith("0")]
        now = time.time()
        taken = await store.take_lease(
            scope, lease.shard_id, owner="other", expected_owner=lease.owner,
            expected_counter=lease.counter, now=now, expires_at=now + 3,
        )  # fmt: skip
        assert taken is not None
        await wait_until(lambda: len(consumer.assignment()) == 1, what="shard 0 let go")
        monkeypatch.setattr(Transport, "load_shard_map", flaky)
        armed["on"] = True  # the rebalance that takes shard 0 back fails once
        await store.release_lease(
            scope, lease.shard_id, owner="other", expected_counter=taken.counter, now=time.time()
        )
        await wait_until(lambda: armed["fired"] == 1, what="the injected failure")
        await put_events(settings, make_events(40, prefix="b"))
        await wait_until(lambda: len(seen) >= 60, timeout=60, what="processing after the failure")
        assert consumer.flow_active


async def test_a_revoked_shard_is_not_read_while_faust_revokes(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """faust's revoke waits for in-flight messages; the revoked shard's reader must not go
    on polling GetRecords meanwhile (each shard allows 5 calls/s, shared with its new
    holder)."""
    settings = settings.model_copy(
        update={"lease_duration_s": 3.0, "poll_interval_s": 0.05, "worker_id": "w"}
    )
    app, seen = collecting_app(settings, "t-revoke")
    scope = f"t-revoke#{settings.stream_name}"
    calls_during: list[tuple[int, int]] = []
    async with DynamoDBLeaseStore(settings) as store, running(app):
        consumer = consumer_of(app)
        await wait_until(lambda: len(consumer.assignment()) == 2, what="both shards")
        await put_events(settings, make_events(20, prefix="a"))
        await wait_until(lambda: len(seen) >= 20, what="the first events")
        # Everything committed: the revoke's own commit then finds nothing to write, so no
        # LeaseLost stops the reader early, and only the transport can.
        await wait_until(
            lambda: sum(p.committed_offset for p in consumer._partitions.values()) >= 20,
            what="the first events committed",
        )
        [lease] = [x for x in await store.list_leases(scope) if x.shard_id.endswith("0")]
        [tp] = [tp for tp in consumer.assignment() if tp.partition == 0]
        reader = consumer.readers()[tp]
        original = consumer.on_partitions_revoked

        async def slow_revoke(revoked: set[Any]) -> None:
            if tp in revoked:
                before = reader.stats.calls
                await asyncio.sleep(1.5)  # as while a slow agent finishes its batch
                calls_during.append((before, reader.stats.calls))
            await original(revoked)

        monkeypatch.setattr(consumer, "on_partitions_revoked", slow_revoke)
        now = time.time()
        taken = await store.take_lease(
            scope, lease.shard_id, owner="other", expected_owner=lease.owner,
            expected_counter=lease.counter, now=now, expires_at=now + 30,
        )  # fmt: skip
        assert taken is not None
        await wait_until(lambda: bool(calls_during), timeout=30, what="the revoke")
    [(before, after)] = calls_during
    assert after == before, f"the revoked reader made {after - before} GetRecords calls"
