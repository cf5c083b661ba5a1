"""LeaseCoordinator policy, stepped deterministically on the in-memory store.

The same behaviours are proven against DynamoDB on moto in test_leases_dynamodb.py; here
the clock and the order of cycles are under the test's control, and hypothesis explores
many worker and shard counts.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from recstream.settings import Settings
from streams.leases import (
    SHARD_END,
    Checkpoint,
    InMemoryLeaseStore,
    LeaseCoordinator,
    LeaseInfo,
    LeaseLost,
    ShardDescription,
)
from tests.streams.leases_helpers import FakeClock, Recorder, StaticShards, flat, stepped

DURATION = 10.0


def make_settings() -> Settings:
    return Settings(lease_duration_s=DURATION, stream_name="events")


async def owners(store: InMemoryLeaseStore, scope: str = "app#events") -> dict[str, str | None]:
    return {lease.shard_id: lease.owner for lease in await store.list_leases(scope)}


async def test_two_workers_converge_to_an_even_split() -> None:
    settings, store, clock, shards = (
        make_settings(),
        InMemoryLeaseStore(),
        FakeClock(),
        StaticShards(flat(4)),
    )
    rec_a, rec_b = Recorder(), Recorder()
    a = stepped(settings, "a", store, clock, shards, rec_a)
    b = stepped(settings, "b", store, clock, shards, rec_b)
    await a.run_cycle()
    assert len(a.owned()) == 4  # alone, its fair share is everything
    for _ in range(4):
        await b.run_cycle()
        await a.run_cycle()
        clock.advance(1.0)
    assert len(a.owned()) == len(b.owned()) == 2
    assert a.owned() | b.owned() == {s.shard_id for s in shards.shards}
    assert rec_a.current == a.owned()
    assert rec_b.current == b.owned()
    assert not rec_a.problems
    assert not rec_b.problems
    # a lost two shards: they were revoked, after having been assigned
    assert any(revoked for _, revoked in rec_a.calls)


async def test_a_stolen_lease_cannot_be_checkpointed_by_its_old_holder() -> None:
    settings, store, clock, shards = (
        make_settings(),
        InMemoryLeaseStore(),
        FakeClock(),
        StaticShards(flat(2)),
    )
    rec_a = Recorder()
    a = stepped(settings, "a", store, clock, shards, rec_a)
    b = stepped(settings, "b", store, clock, shards)
    await a.run_cycle()
    await b.run_cycle()  # steals one of a's two leases
    (stolen,) = b.owned()
    await b.checkpoint(stolen, Checkpoint("200"))
    # a has not noticed yet (it has not renewed): its checkpoint must still be refused
    assert stolen in a.owned()
    with pytest.raises(LeaseLost):
        await a.checkpoint(stolen, Checkpoint("100"))
    assert await a.get_checkpoint(stolen) == Checkpoint("200")
    assert stolen not in a.owned()
    await a.run_cycle()
    assert stolen not in rec_a.current
    with pytest.raises(LeaseLost):
        await a.checkpoint(stolen, Checkpoint("300"))


async def test_a_crashed_worker_loses_its_leases_only_after_expiry() -> None:
    settings, store, clock, shards = (
        make_settings(),
        InMemoryLeaseStore(),
        FakeClock(),
        StaticShards(flat(4)),
    )
    a = stepped(settings, "a", store, clock, shards)
    b = stepped(settings, "b", store, clock, shards)
    await a.run_cycle()
    # a "crashes": it never runs again. b sees a as alive until a's counters stop moving
    # for a whole lease duration, so it only steals, one lease per cycle, up to its share.
    for _ in range(4):  # at 0, 2.5, 5 and 7.5 s: within one lease duration
        await b.run_cycle()
        clock.advance(DURATION / 4)
    assert len(b.owned()) == 2
    clock.advance(DURATION)
    await b.run_cycle()
    assert len(b.owned()) == 4
    assert set((await owners(store)).values()) == {"b"}


async def test_graceful_stop_releases_for_an_immediate_takeover() -> None:
    settings, store, clock, shards = (
        make_settings(),
        InMemoryLeaseStore(),
        FakeClock(),
        StaticShards(flat(4)),
    )
    a = stepped(settings, "a", store, clock, shards)
    b = stepped(settings, "b", store, clock, shards)
    await a.start()
    for _ in range(3):
        await b.run_cycle()
        await a.run_cycle()
    assert len(b.owned()) == 2
    await a.stop()
    assert a.owned() == frozenset()
    assert list((await owners(store)).values()).count(None) == 2
    await b.run_cycle()  # no clock movement: released leases need no expiry
    assert len(b.owned()) == 4
    await a.stop()  # idempotent


class AnswerLost(InMemoryLeaseStore):
    """Writes a take, then never answers it: the request landed, its response did not."""

    def __init__(self) -> None:
        super().__init__()
        self.hang_takes = False
        self.written = asyncio.Event()

    async def take_lease(self, scope: str, shard_id: str, **kwargs: Any) -> LeaseInfo | None:
        new = await super().take_lease(scope, shard_id, **kwargs)
        if self.hang_takes:
            self.written.set()
            await asyncio.Event().wait()
        return new


async def test_stop_releases_a_take_it_cancelled_after_the_write_landed() -> None:
    # The flake once seen in test_three_workers_on_seven_shards_settle_at_3_2_2: a worker
    # stopped while its take of a just-released lease was in flight kept that lease, owned
    # by a stopped worker, until it expired.
    settings, store, clock = make_settings(), AnswerLost(), FakeClock()
    shards = StaticShards(flat(2))
    a = stepped(settings, "a", store, clock, shards)
    b = stepped(settings, "b", store, clock, shards)
    await a.run_cycle()
    await b.run_cycle()  # b steals one of a's two
    (stolen,) = b.owned()
    await b.stop()  # released
    store.hang_takes = True
    cycle = asyncio.create_task(a.run_cycle())  # a takes it back; the answer never comes
    await store.written.wait()
    assert (await owners(store))[stolen] == "a"
    assert stolen not in a.owned()
    cycle.cancel()
    await a.stop()
    assert set((await owners(store)).values()) == {None}


def split(parent: str, left: str, right: str) -> list[ShardDescription]:
    half = 2**127
    return [
        ShardDescription(parent, closed=True),
        ShardDescription(left, (parent,), 0, half - 1),
        ShardDescription(right, (parent,), half, 2**128 - 1),
    ]


async def test_children_wait_for_their_parent_to_reach_shard_end() -> None:
    settings, store, clock = make_settings(), InMemoryLeaseStore(), FakeClock()
    shards = StaticShards(split("p", "c1", "c2"))
    rec = Recorder()
    a = stepped(settings, "a", store, clock, shards, rec)
    b = stepped(settings, "b", store, clock, shards)
    await a.run_cycle()
    await b.run_cycle()
    assert a.owned() == {"p"}
    assert b.owned() == frozenset()
    await a.checkpoint("p", Checkpoint("99"))
    await b.run_cycle()
    assert b.owned() == frozenset()
    await a.checkpoint("p", Checkpoint(SHARD_END))
    assert a.owned() == frozenset()  # a finished shard is no longer "owned"
    await a.run_cycle()
    await b.run_cycle()
    await a.run_cycle()
    assert a.owned() | b.owned() == {"c1", "c2"}
    assert len(a.owned()) == len(b.owned()) == 1
    assert not rec.problems
    assert any("p" in revoked for _, revoked in rec.calls)
    parent = await store.get_lease("app#events", "p")
    assert parent is not None
    assert parent.owner is None  # released once finished
    assert parent.checkpoint == Checkpoint(SHARD_END)


async def test_a_merged_child_needs_both_parents_or_their_ageing_out() -> None:
    settings, store, clock = make_settings(), InMemoryLeaseStore(), FakeClock()
    shards = StaticShards(
        [
            ShardDescription("p1", closed=True),
            ShardDescription("p2", closed=True),
            ShardDescription("m", ("p1", "p2")),
        ]
    )
    a = stepped(settings, "a", store, clock, shards)
    await a.run_cycle()
    assert a.owned() == {"p1", "p2"}
    await a.checkpoint("p1", Checkpoint(SHARD_END))
    await a.run_cycle()
    assert a.owned() == {"p2"}
    # p2 ages out of the stream unread (retention passed): the child may go ahead
    shards.shards = [s for s in shards.shards if s.shard_id != "p2"]
    await a.refresh_shards()
    await a.run_cycle()
    assert "m" in a.owned()
    # p1 is finished and gone from the stream too: its lease is cleaned up
    shards.shards = [s for s in shards.shards if s.shard_id != "p1"]
    await a.refresh_shards()
    assert await store.get_lease("app#events", "p1") is None


async def test_checkpoint_of_a_shard_never_held_is_refused() -> None:
    settings, store, clock, shards = (
        make_settings(),
        InMemoryLeaseStore(),
        FakeClock(),
        StaticShards(flat(1)),
    )
    a = stepped(settings, "a", store, clock, shards)
    await a.run_cycle()
    with pytest.raises(LeaseLost, match="does not hold"):
        await a.checkpoint("shardId-999", Checkpoint("1"))


async def test_apps_sharing_the_table_do_not_see_each_other() -> None:
    settings, store, clock, shards = (
        make_settings(),
        InMemoryLeaseStore(),
        FakeClock(),
        StaticShards(flat(2)),
    )
    a = stepped(settings, "a", store, clock, shards, app_id="one")
    b = stepped(settings, "b", store, clock, shards, app_id="two")
    await a.run_cycle()
    await b.run_cycle()
    assert len(a.owned()) == len(b.owned()) == 2


# --- properties of the fair-share assignment ---------------------------------------------


async def _simulate(
    shard_count: int, worker_count: int, schedule: list[int], crashed: set[int]
) -> None:
    settings, store, clock = make_settings(), InMemoryLeaseStore(), FakeClock()
    shards = StaticShards(flat(shard_count))
    recorders = [Recorder() for _ in range(worker_count)]
    workers = [
        stepped(settings, f"w{i}", store, clock, shards, recorders[i]) for i in range(worker_count)
    ]
    for index in schedule:  # an arbitrary interleaving first
        await workers[index].run_cycle()

    async def converge(alive: list[LeaseCoordinator], advance: float) -> None:
        # Every steal narrows the gap between two workers, so this is bounded.
        for _ in range(3 * shard_count + 6):
            before = [w.owned() for w in alive]
            for worker in alive:
                await worker.run_cycle()
            clock.advance(advance)
            if [w.owned() for w in alive] == before:
                return
        raise AssertionError(f"no convergence: {[sorted(w.owned()) for w in alive]}")

    async def check(alive: list[LeaseCoordinator]) -> None:
        held = [w.owned() for w in alive]
        loads = sorted(len(h) for h in held)
        assert loads[-1] - loads[0] <= 1, loads
        assert sum(loads) == shard_count
        assert set().union(*held) == {s.shard_id for s in shards.shards}
        table = await owners(store)
        for worker in alive:
            assert {s for s, o in table.items() if o == worker.worker_id} == worker.owned()

    await converge(workers, advance=1.0)
    await check(workers)
    # the rest of the workers crash; the survivors split everything once leases expire
    survivors = [w for i, w in enumerate(workers) if i not in crashed]
    for _ in range(3):  # let 1.5 lease durations pass, so the crashed leases expire
        for worker in survivors:
            await worker.run_cycle()
        clock.advance(DURATION / 2)
    await converge(survivors, advance=DURATION / 2)
    await check(survivors)
    for i in range(worker_count):
        if i not in crashed:
            assert recorders[i].current == workers[i].owned()
            assert not recorders[i].problems


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[int, int, list[int], set[int]]:
    shard_count = draw(st.integers(1, 12))
    worker_count = draw(st.integers(1, 5))
    schedule = draw(st.lists(st.integers(0, worker_count - 1), max_size=20))
    crashed = draw(st.sets(st.integers(0, worker_count - 1), max_size=worker_count - 1))
    return shard_count, worker_count, schedule, crashed


@hyp_settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_fair_share_converges_balanced_and_exclusive(
    scenario: tuple[int, int, list[int], set[int]],
) -> None:
    asyncio.run(_simulate(*scenario))


async def test_a_write_whose_response_was_lost_is_recovered() -> None:
    settings, store, clock = make_settings(), InMemoryLeaseStore(), FakeClock()
    a = stepped(settings, "a", store, clock, StaticShards(flat(1)))
    await a.run_cycle()
    (shard,) = a.owned()
    lease = await store.get_lease("app#events", shard)
    assert lease is not None
    # a's renew reached the store but its reply never came back: a's counter is stale
    await store.renew_lease(
        "app#events", shard, owner="a", expected_counter=lease.counter, now=1.0, expires_at=2.0
    )
    await a.checkpoint(shard, Checkpoint("7"))  # recovers: the lease is still a's
    assert await a.get_checkpoint(shard) == Checkpoint("7")
    await store.renew_lease(
        "app#events", shard, owner="a", expected_counter=lease.counter + 2, now=1.0, expires_at=2.0
    )
    await a.run_cycle()
    assert a.owned() == {shard}
    await store.renew_lease(
        "app#events", shard, owner="a", expected_counter=lease.counter + 4, now=1.0, expires_at=2.0
    )
    await a.stop()
    assert await owners(store) == {shard: None}


async def test_a_slow_on_change_does_not_stop_renewals() -> None:
    settings = Settings(lease_duration_s=0.3, stream_name="events")
    store = InMemoryLeaseStore()
    release = asyncio.Event()
    entered = asyncio.Event()

    async def slow(assigned: frozenset[str], revoked: frozenset[str]) -> None:
        entered.set()
        await release.wait()  # faust waiting for in-flight messages during a rebalance

    a = LeaseCoordinator(
        settings,
        app_id="app",
        stream_name="events",
        worker_id="a",
        on_change=slow,
        store=store,
        shard_source=StaticShards(flat(2)),
    )
    await a.start()
    try:
        await asyncio.wait_for(entered.wait(), 10)
        counters = [lease.counter for lease in await store.list_leases("app#events")]
        for _ in range(200):
            now = [lease.counter for lease in await store.list_leases("app#events")]
            if all(n >= c + 3 for n, c in zip(now, counters, strict=True)):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"leases not renewed while on_change ran: {counters} -> {now}")
    finally:
        release.set()
        await a.stop()


async def test_a_wall_clock_step_does_not_expire_a_healthy_lease() -> None:
    """Expiry is judged on the monotonic timer: an NTP step or a resumed VM moves the wall
    clock, and a worker judging on it would steal a lease whose holder is alive."""
    settings, store, shards = make_settings(), InMemoryLeaseStore(), StaticShards(flat(1))
    a = stepped(settings, "a", store, FakeClock(), shards, timer=FakeClock(5.0))
    b_wall, b_timer = FakeClock(), FakeClock(5.0)
    b = stepped(settings, "b", store, b_wall, shards, timer=b_timer)
    await a.run_cycle()
    await b.run_cycle()  # observes a's lease counter
    assert len(a.owned()) == 1
    b_wall.advance(3 * DURATION)  # the wall clock jumps; no real time passed
    await b.run_cycle()
    assert b.owned() == frozenset()
    # Real time passing without renewals still expires it, as before.
    b_timer.advance(DURATION)
    await b.run_cycle()
    assert len(b.owned()) == 1


async def test_two_processes_given_the_same_worker_id_split_the_shards() -> None:
    """RECSTREAM_WORKER_ID copied into two processes: without a per-process owner name, each
    accepts the other's renewals as its own (`_still_mine`) and both read every shard."""
    from streams.kinesis.transport import worker_id

    settings = Settings(lease_duration_s=DURATION, stream_name="events", worker_id="w")
    store, clock, shards = InMemoryLeaseStore(), FakeClock(), StaticShards(flat(4))
    first, second = worker_id(settings), worker_id(settings)
    assert first != second
    assert first.startswith("w~")
    assert second.startswith("w~")
    a = stepped(settings, first, store, clock, shards)
    b = stepped(settings, second, store, clock, shards)
    for _ in range(4):
        await a.run_cycle()
        await b.run_cycle()
        clock.advance(1.0)
    assert len(a.owned()) == len(b.owned()) == 2
    assert not a.owned() & b.owned()


async def test_a_parent_missing_from_a_stale_shard_list_is_not_taken_for_aged_out() -> None:
    """Two splits within one shard-sync interval: b's kept list predates parent "b1", which
    is unfinished; b must look again before treating "b1" as aged out and taking its
    children (that would read them before their parent)."""
    settings, store, clock = make_settings(), InMemoryLeaseStore(), FakeClock()
    shards = StaticShards([ShardDescription("a0")])
    b = LeaseCoordinator(
        settings,
        app_id="app",
        stream_name=settings.stream_name,
        worker_id="b",
        on_change=Recorder(),
        store=store,
        clock=clock,
        shard_source=shards,
        take_interval_s=0.0,
        shard_sync_interval_s=3600.0,  # its list stays as it was at the first cycle
    )
    await b.run_cycle()
    assert b.owned() == {"a0"}
    await b.checkpoint("a0", Checkpoint(SHARD_END))
    half = 2**127
    shards.shards = [
        ShardDescription("a0", closed=True),
        ShardDescription("b1", ("a0",), 0, half - 1, closed=True),
        ShardDescription("b2", ("a0",), half, 2**128 - 1),
        ShardDescription("c1", ("b1",), 0, half // 2 - 1),
        ShardDescription("c2", ("b1",), half // 2, half - 1),
    ]
    other = stepped(settings, "other", store, clock, shards)
    await other.run_cycle()  # creates every lease from a fresh list
    b._next_sync = float("inf")
    await b.run_cycle()
    await other.run_cycle()
    held = b.owned() | other.owned()
    assert "c1" not in held
    assert "c2" not in held
    await b.run_cycle()
    assert not {"c1", "c2"} & (b.owned() | other.owned())
