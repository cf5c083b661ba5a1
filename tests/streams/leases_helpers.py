"""Helpers shared by the lease tests: a settable clock, a fixed shard list, a recorder."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from recstream.settings import Settings
from streams.leases import (
    LeaseCoordinator,
    LeaseStore,
    ShardDescription,
)


class FakeClock:
    """Unix seconds that only move when a test says so."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class StaticShards:
    """A ShardSource whose shards a test sets directly."""

    def __init__(self, shards: list[ShardDescription]) -> None:
        self.shards = list(shards)

    async def __call__(self) -> list[ShardDescription]:
        return list(self.shards)


def flat(count: int) -> list[ShardDescription]:
    return [ShardDescription(f"shardId-{i:012d}") for i in range(count)]


@dataclass
class Recorder:
    """Collects on_change calls and keeps the assignment they add up to."""

    calls: list[tuple[frozenset[str], frozenset[str]]] = field(default_factory=list)
    current: set[str] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)

    async def __call__(self, assigned: frozenset[str], revoked: frozenset[str]) -> None:
        # The coordinator logs exceptions from on_change, so problems are kept for the test.
        if not revoked <= self.current:
            self.problems.append(f"revoked {set(revoked - self.current)} never assigned")
        if assigned & self.current:
            self.problems.append(f"assigned {set(assigned & self.current)} twice")
        if assigned & revoked:
            self.problems.append(f"{set(assigned & revoked)} both assigned and revoked")
        self.calls.append((assigned, revoked))
        self.current -= revoked
        self.current |= assigned


def stepped(
    settings: Settings,
    worker: str,
    store: LeaseStore,
    clock: FakeClock,
    shards: StaticShards | None,
    recorder: Recorder | None = None,
    app_id: str = "app",
    rng: random.Random | None = None,
    timer: FakeClock | None = None,
) -> LeaseCoordinator:
    """A coordinator that a test drives with run_cycle(): it takes on every cycle.

    ``shards=None`` lists the real stream with ListShards."""
    return LeaseCoordinator(
        settings,
        app_id=app_id,
        stream_name=settings.stream_name,
        worker_id=worker,
        on_change=recorder or Recorder(),
        store=store,
        clock=clock,
        timer=timer,
        shard_source=shards,
        take_interval_s=0.0,
        shard_sync_interval_s=0.0,
        rng=rng or random.Random(worker),
    )


async def eventually(check: Callable[[], bool], what: str, limit_s: float = 30.0) -> None:
    """Wait until ``check()`` holds; the limit only bounds a hung test, it is no SLA."""
    deadline = asyncio.get_running_loop().time() + limit_s
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)
