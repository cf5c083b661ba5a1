"""The worker's delivery (`agents.windows.Pipeline`), on real Redis and DynamoDB (moto):
durable copies written a group of batches at a time, each actor's once, while the next
batches are applied, and a batch acknowledged only once its copies are written."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import pytest

from agents import windows
from agents.features import read_user_state
from agents.state import ApplyResult
from agents.windows import Pipeline, deliver
from recstream.errors import ThroughputExceeded
from recstream.features import DynamoFeatures
from recstream.keys import Keys
from recstream.settings import Settings
from recstream.stores import open_stores
from recstream.windows import DynamoWindows
from streams.schema import Event
from tests.agents.streamdata import snapshot, taobao, write_catalog
from tests.agents.test_features import agent_of
from tests.conftest import LocalStack, make_settings


def interleaved(shared_data: Path, namespace: str, limit: int) -> list[Event]:
    """Taobao events in time order: a shard's users interleaved, most in many batches."""
    events, _ = taobao(shared_data, namespace, limit)
    return sorted(events, key=lambda e: (e.timestamp, e.event_id))


async def durable_ids(settings: Settings, actors: Sequence[tuple[str, str]]) -> dict[str, set[str]]:
    """The event ids in each actor's durable window (DynamoDB)."""
    async with open_stores(settings) as stores:
        found = await DynamoWindows(stores.dynamodb, settings).get_many(actors)
    return {actor: {e.event_id for e in window} for (_, actor), window in found.items()}


async def test_a_batch_is_acknowledged_only_once_its_copies_are_written(
    settings: Settings, shared_data: Path
) -> None:
    ns = settings.namespace
    events = interleaved(shared_data, ns, 600)
    batches = [events[start : start + 100] for start in range(0, len(events), 100)]
    acked: list[int] = []
    missing: list[str] = []
    async with agent_of(settings) as (agent, redis):
        _, catalog = taobao(shared_data, ns, 600)
        await write_catalog(redis, ns, catalog)
        pipeline = Pipeline(agent, "stream")

        def done(n: int) -> Callable[[], Awaitable[None]]:
            async def acknowledge() -> None:
                # At acknowledgement, every event of the batch is in its actor's copy.
                batch = batches[n]
                actors = sorted({(e.namespace, e.actor) for e in batch})
                copies = await durable_ids(settings, actors)
                windows = {a: await agent.hot.window(*a) for a in actors}
                for e in batch:
                    kept = {x.event_id for x in windows[(e.namespace, e.actor)]}
                    if e.event_id in kept and e.event_id not in copies.get(e.actor, set()):
                        missing.append(e.event_id)
                acked.append(n)

            return acknowledge

        for n, batch in enumerate(batches):
            await pipeline.submit([e.to_json() for e in batch], done(n))
        await pipeline.drain()
    assert acked == list(range(len(batches)))
    assert missing == []
    # Full batches joined groups: an actor of several batches was written once per group.
    per_batch = sum(len({e.actor for e in b if e.item_id}) for b in batches)
    assert pipeline.groups_written < len(batches)
    assert agent.totals.windows_persisted < per_batch


async def test_the_pipeline_leaves_what_deliver_leaves(
    local_stack: LocalStack, shared_data: Path
) -> None:
    """The same events, batch by batch with `deliver` and through the pipeline (each
    batch applied before the next is taken, and fed: the next parsed and prepared while
    one is applied): the same Redis state, and the same durable windows and feature
    vectors."""
    states, copies = [], []
    for way in ("deliver", "submit", "feed"):
        settings = make_settings(local_stack)
        ns = settings.namespace
        events = interleaved(shared_data, ns, 500)
        _, catalog = taobao(shared_data, ns, 500)
        async with agent_of(settings) as (agent, redis):
            await write_catalog(redis, ns, catalog)
            pipeline = Pipeline(agent, "stream", max_actors=40)
            for start in range(0, len(events), 50):
                batch = [e.to_json() for e in events[start : start + 50]]
                if way == "feed":
                    await pipeline.feed(batch)
                elif way == "submit":
                    await pipeline.submit(batch)
                else:
                    await deliver(agent, batch, "stream")
            await pipeline.drain()
            state = await snapshot(redis, ns)
            state.pop("pop:touched")  # eviction bookkeeping by wall-clock time
            states.append(state)
            actors = sorted({(ns, e.actor) for e in events})
            windows = await durable_ids(settings, actors)
            async with open_stores(settings) as stores:
                features = await DynamoFeatures(stores.dynamodb, settings).get_many(actors)
            copies.append(
                (
                    {a: sorted(ids) for a, ids in windows.items()},
                    {a[1]: c.features for a, c in features.items()},
                )
            )
            # the copies are Redis's state, not an older one
            for (_, actor), copy in features.items():
                hot = await read_user_state(redis, settings, ns, actor)
                assert int(copy.features["n"]) == hot.events
    assert states[0] == states[1] == states[2]
    assert copies[0] == copies[1] == copies[2]


async def test_fed_batches_are_applied_in_order_and_acknowledged_in_order(
    settings: Settings, shared_data: Path
) -> None:
    """`feed` returns before its batch is in Redis; the batches are still acknowledged in
    order, after their copies, and every event is applied once."""
    ns = settings.namespace
    events = interleaved(shared_data, ns, 400)
    batches = [events[start : start + 50] for start in range(0, len(events), 50)]
    acked: list[int] = []
    async with agent_of(settings) as (agent, redis):
        _, catalog = taobao(shared_data, ns, 400)
        await write_catalog(redis, ns, catalog)
        pipeline = Pipeline(agent, "stream", max_actors=30)

        def done(n: int) -> Callable[[], Awaitable[None]]:
            async def acknowledge() -> None:
                acked.append(n)

            return acknowledge

        for n, batch in enumerate(batches):
            await pipeline.feed([e.to_json() for e in batch], done(n))
            assert pipeline.pending
        await pipeline.drain()
        assert not pipeline.pending
    # (the order of each actor's events: `test_the_pipeline_leaves_what_deliver_leaves`)
    assert acked == list(range(len(batches)))
    assert agent.totals.applied == len(events)


async def test_the_next_batch_runs_in_redis_while_the_one_before_finishes(
    settings: Settings, shared_data: Path
) -> None:
    """A fed batch's script calls start once the batch before has run its own, without
    waiting for what follows them (recovery reads, stitching); the batches still join
    their groups and are acknowledged in order."""
    ns = settings.namespace
    events = interleaved(shared_data, ns, 200)
    first, second = events[:100], events[100:]
    acked: list[int] = []
    async with agent_of(settings) as (agent, redis):
        pipeline = Pipeline(agent, "stream")
        release = asyncio.Event()
        stage = agent.stages[0]
        recover = stage.recover  # type: ignore[attr-defined]
        held: list[int] = []

        async def slow_recover(result: ApplyResult) -> None:
            held.append(1)
            if len(held) == 1:
                await release.wait()  # the first batch's follow-up, held
            await recover(result)

        stage.recover = slow_recover  # type: ignore[attr-defined]

        def done(n: int) -> Callable[[], Awaitable[None]]:
            async def acknowledge() -> None:
                acked.append(n)

            return acknowledge

        await pipeline.feed([e.to_json() for e in first], done(0))
        async with asyncio.timeout(10):  # (not held up by the first's follow-up)
            await pipeline.feed([e.to_json() for e in second], done(1))
        seen = Keys(ns).seen(second[-1].actor)
        for _ in range(200):  # the second batch reaches Redis while the first is held
            if await redis.zscore(seen, second[-1].event_id) is not None:
                break
            await asyncio.sleep(0.02)
        assert await redis.zscore(seen, second[-1].event_id) is not None
        assert held  # (the second's follow-up may have begun too; it waits to join)
        assert acked == []
        release.set()
        await pipeline.drain()
    assert acked == [0, 1]
    assert agent.totals.applied == len(events)


async def test_a_batch_prepared_before_the_login_before_it_still_reaches_the_user(
    settings: Settings,
) -> None:
    """A batch is prepared (its sessions' logins resolved) while the batch before it is
    applied: a login in that batch is not seen yet, and its session's later anonymous
    events are applied to the session, then moved to the user by the stitch's re-check,
    as for a login read from another shard."""
    from tests.agents.test_identity import anon, login

    async with agent_of(settings) as (agent, _):
        pipeline = Pipeline(agent, "stream")
        await pipeline.feed([login(settings, 1)])
        await pipeline.feed([anon(settings, n) for n in range(200, 203)])
        await pipeline.drain()
        ns = settings.namespace
        assert [e.item_id for e in await agent.hot.window(ns, "alice")] == [
            "anon202",
            "anon201",
            "anon200",
        ]
        assert await agent.hot.window(ns, "session:s1") == []
        assert agent.totals.applied == 4


async def test_a_batch_whose_preparation_fails_is_still_applied(
    settings: Settings, shared_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Preparing is a head start: when it fails (Redis away for a moment), the batch is
    applied as `submit` applies it, under the failure policy."""
    ns = settings.namespace
    events = interleaved(shared_data, ns, 60)
    async with agent_of(settings) as (agent, _):
        pipeline = Pipeline(agent, "stream")

        async def fails(events: Sequence[Event]) -> object:
            raise ThroughputExceeded("Redis is away for a moment")

        monkeypatch.setattr(agent, "prepare", fails)
        await pipeline.feed([e.to_json() for e in events])
        await pipeline.drain()
        assert agent.totals.applied == len(events)


class Throttled:
    """A stage that is throttled a few times (as DynamoDB is under load), then works."""

    def __init__(self, times: int) -> None:
        self.left = times

    async def after(self, events: Sequence[Event], result: ApplyResult) -> None:
        if self.left:
            self.left -= 1
            raise ThroughputExceeded("throttled; retry with backoff")


async def test_throttled_copies_hold_the_acknowledgement_back(settings: Settings) -> None:
    ns = settings.namespace
    batch = [
        Event(
            event_id=f"t{n}",
            event_type="click",
            user_id=f"u{n % 3}",
            item_id=f"i{n}",
            timestamp=1_700_000_000.0 + n,
            namespace=ns,
        ).to_json()
        for n in range(9)
    ]
    async with agent_of(settings) as (agent, redis):
        throttled = Throttled(4)
        agent.stages = (*agent.stages, throttled)
        pipeline = Pipeline(agent, "stream", max_delay=0.01)
        seen_left: list[int] = []

        async def acknowledge() -> None:
            seen_left.append(throttled.left)

        stats = await pipeline.submit(batch, acknowledge)
        # in Redis at once, applied once; the copies (and the acknowledgement) follow
        assert (stats.applied, stats.duplicates) == (9, 0)
        assert await redis.llen(Keys(ns).window("u0")) == 3
        await pipeline.drain()
    assert seen_left == [0]
    copies = await durable_ids(settings, [(ns, "u0"), (ns, "u1"), (ns, "u2")])
    assert copies["u0"] == {"t0", "t3", "t6"}


async def test_live_batches_copy_an_actor_once_per_interval(settings: Settings) -> None:
    """Small (caught-up) batches join one group until the interval ends: an actor with an
    event in each is written once, and no batch is acknowledged before that write. (Each
    small batch's actors used to be written at once: two DynamoDB items per event.)"""
    ns = settings.namespace
    batches = [
        [
            Event(
                event_id=f"l{n}-{u}", event_type="view", user_id=f"live{u}", item_id=f"i{n}",
                namespace=ns,
            ).to_json()
            for u in range(3)
        ]
        for n in range(5)
    ]  # fmt: skip
    async with agent_of(settings) as (agent, _):
        pipeline = Pipeline(agent, "stream", interval_s=3600)
        acked: list[int] = []

        def done(n: int) -> Callable[[], Awaitable[None]]:
            async def acknowledge() -> None:
                acked.append(n)

            return acknowledge

        for n, batch in enumerate(batches):
            await pipeline.submit(batch, done(n))
            await asyncio.sleep(0.05)  # as a live stream's batches come, apart
        assert pipeline.pending
        assert (acked, pipeline.groups_written, agent.totals.windows_persisted) == ([], 0, 0)
        copies = await durable_ids(settings, [(ns, f"live{u}") for u in range(3)])
        assert copies == {}  # nothing written, nothing acknowledged, until the interval ends
        await pipeline.drain()
    assert acked == list(range(len(batches)))
    assert (pipeline.groups_written, agent.totals.windows_persisted) == (1, 3)
    copies = await durable_ids(settings, [(ns, f"live{u}") for u in range(3)])
    assert copies == {f"live{u}": {f"l{n}-{u}" for n in range(5)} for u in range(3)}


async def test_a_large_group_is_written_in_chunks_of_actors(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every actor of a group larger than a chunk is written, before any acknowledgement."""
    monkeypatch.setattr(windows, "COPY_CHUNK_ACTORS", 2)
    ns = settings.namespace
    batch = [
        Event(
            event_id=f"k{n}", event_type="view", user_id=f"chunk{n % 5}", item_id=f"i{n}",
            namespace=ns,
        ).to_json()
        for n in range(10)
    ]  # fmt: skip
    actors = [(ns, f"chunk{u}") for u in range(5)]
    async with agent_of(settings) as (agent, _):
        pipeline = Pipeline(agent, "stream", interval_s=3600)
        copied: list[dict[str, set[str]]] = []

        async def acknowledge() -> None:
            copied.append(await durable_ids(settings, actors))

        await pipeline.submit(batch, acknowledge)
        await pipeline.drain()
    assert agent.totals.windows_persisted == 5
    assert copied == [{f"chunk{u}": {f"k{n}" for n in range(u, 10, 5)} for u in range(5)}]


async def test_a_full_batch_on_a_quiet_stream_is_written_by_age(settings: Settings) -> None:
    """A batch waits for its group's interval, but not for ever."""
    ns = settings.namespace
    batch = [
        Event(
            event_id=f"q{n}", event_type="view", user_id="quiet", item_id=f"i{n}", namespace=ns
        ).to_json()
        for n in range(5)
    ]
    async with agent_of(settings) as (agent, _):
        pipeline = Pipeline(agent, "stream", interval_s=0.05)
        acked = asyncio.Event()

        async def acknowledge() -> None:
            acked.set()

        await pipeline.submit(batch, acknowledge)
        # nothing else comes: the age limit writes the group (a generous wait, no timing)
        await asyncio.wait_for(acked.wait(), 60)
        await pipeline.aclose()
    assert (await durable_ids(settings, [(ns, "quiet")]))["quiet"] == {f"q{n}" for n in range(5)}


async def test_closing_gives_up_on_copies_that_cannot_be_written(settings: Settings) -> None:
    """DynamoDB unreachable while a worker stops: the copies are abandoned after the bound
    and their batch stays unacknowledged (read again later), so the worker can exit."""
    ns = settings.namespace
    batch = [
        Event(
            event_id=f"s{n}", event_type="view", user_id="stuck", item_id=f"i{n}", namespace=ns
        ).to_json()
        for n in range(3)
    ]
    async with agent_of(settings) as (agent, _):
        agent.stages = (*agent.stages, Throttled(10**9))  # never written
        pipeline = Pipeline(agent, "stream", max_delay=0.01)
        acked: list[bool] = []

        async def acknowledge() -> None:
            acked.append(True)

        await pipeline.submit(batch, acknowledge)
        # a generous bound on the test (a hang is what it catches), not a timing assertion
        await asyncio.wait_for(pipeline.aclose(within=0.5), 60)
    assert acked == []
