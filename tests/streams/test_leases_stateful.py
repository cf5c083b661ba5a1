"""A hypothesis state machine over the lease coordinator: workers cycle, pause, crash and
join, the clock moves, shards are split and finished, checkpoints are written. After every
step the safety rules must hold:

* a checkpoint is accepted only from the lease's owner in the table, and stored
  checkpoints only move forward (a stale worker never overwrites a newer one);
* a child shard is owned only when each parent is SHARD_END or gone from the stream.
"""

from __future__ import annotations

import asyncio
from typing import Any

from hypothesis import event
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from recstream.settings import Settings
from streams.leases import (
    SHARD_END,
    TRIM_HORIZON,
    Checkpoint,
    InMemoryLeaseStore,
    LeaseCoordinator,
    LeaseLost,
    ShardDescription,
)
from tests.streams.leases_helpers import FakeClock, Recorder, StaticShards, stepped

SCOPE = "app#events"
DURATION = 10.0


class LeaseMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.settings = Settings(lease_duration_s=DURATION, stream_name="events")
        self.store = InMemoryLeaseStore()
        self.clock = FakeClock()
        self.shards = StaticShards([ShardDescription("s0"), ShardDescription("s1")])
        self.workers: list[LeaseCoordinator] = []
        self.recorders: list[Recorder] = []
        self.sequence = 0
        self.stored: dict[str, int] = {}  # last accepted checkpoint per shard
        for _ in range(2):
            self.add_worker()

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        self.loop.close()

    @precondition(lambda self: len(self.workers) < 4)
    @rule()
    def add_worker(self) -> None:
        recorder = Recorder()
        self.recorders.append(recorder)
        name = f"w{len(self.workers)}"
        self.workers.append(
            stepped(self.settings, name, self.store, self.clock, self.shards, recorder)
        )

    @rule(data=st.data())
    def cycle(self, data: st.DataObject) -> None:
        # A worker that is never cycled again has crashed or paused; that is the point.
        worker = data.draw(st.sampled_from(self.workers))
        self.run(worker.run_cycle())

    @rule(seconds=st.sampled_from([1.0, DURATION / 3, DURATION + 1]))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @precondition(lambda self: len(self.shards.shards) < 12)
    @rule(data=st.data())
    def split(self, data: st.DataObject) -> None:
        open_shards = [s for s in self.shards.shards if not s.closed]
        parent = data.draw(st.sampled_from(open_shards))
        index = self.shards.shards.index(parent)
        self.shards.shards[index] = ShardDescription(
            parent.shard_id, parent.parent_shard_ids, closed=True
        )
        count = len(self.shards.shards)
        self.shards.shards += [
            ShardDescription(f"s{count}", (parent.shard_id,)),
            ShardDescription(f"s{count + 1}", (parent.shard_id,)),
        ]

    def _checkpoint(self, worker: LeaseCoordinator, shard_id: str, value: str) -> None:
        before = self.run(self.store.get_lease(SCOPE, shard_id))
        try:
            self.run(worker.checkpoint(shard_id, Checkpoint(value)))
        except LeaseLost:
            event("checkpoint refused: lease lost")
            return
        event("checkpoint accepted" + (" (SHARD_END)" if value == SHARD_END else ""))
        assert before is not None
        assert before.owner == worker.worker_id, "checkpoint accepted from a non-owner"

    @rule(data=st.data())
    def checkpoint(self, data: st.DataObject) -> None:
        worker = data.draw(st.sampled_from(self.workers))
        if not worker.owned():
            return
        shard_id = data.draw(st.sampled_from(sorted(worker.owned())))
        self.sequence += 1
        self._checkpoint(worker, shard_id, str(self.sequence))

    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        worker = data.draw(st.sampled_from(self.workers))
        closed = {s.shard_id for s in self.shards.shards if s.closed}
        finishable = sorted(worker.owned() & closed)
        if finishable:
            self._checkpoint(worker, data.draw(st.sampled_from(finishable)), SHARD_END)

    @invariant()
    def checkpoints_only_move_forward(self) -> None:
        for lease in self.run(self.store.list_leases(SCOPE)):
            value = lease.checkpoint.sequence_number
            if value == TRIM_HORIZON:
                continue
            rank = 10**9 if value == SHARD_END else int(value)
            assert rank >= self.stored.get(lease.shard_id, 0), f"{lease.shard_id} went back"
            self.stored[lease.shard_id] = rank

    @invariant()
    def children_wait_for_their_parents(self) -> None:
        leases = {lease.shard_id: lease for lease in self.run(self.store.list_leases(SCOPE))}
        in_stream = {s.shard_id for s in self.shards.shards}
        believed = {s for w in self.workers for s in w.owned()}
        for lease in leases.values():
            if lease.owner is None and lease.shard_id not in believed:
                continue
            if lease.parent_shard_ids:
                event("a child shard is leased")
            for parent in lease.parent_shard_ids:
                if parent in in_stream and parent in leases:
                    assert leases[parent].checkpoint.sequence_number == SHARD_END, (
                        f"{lease.shard_id} is leased before its parent {parent} ended"
                    )

    @invariant()
    def on_change_is_consistent(self) -> None:
        for recorder in self.recorders:
            assert not recorder.problems, recorder.problems


LeaseMachine.TestCase.settings = hyp_settings(
    max_examples=150, stateful_step_count=40, deadline=None
)
test_lease_machine = LeaseMachine.TestCase
