"""The agents alone at a fixed rate: what `recstream agents` costs per event, and its lag.

    python -m bench.paced [--rate 800] [--seconds 40] [--clients 64] [--users 40]

`bench.ingest` is a closed loop (each client waits for its answer), so its rate, and with
it how many events each user has per copy interval, follows the machine's load, and the
API's and the load generator's CPU share the cores with the agents. Here one batched
producer puts `bench.ingest`'s users' events (``--clients`` times ``--users`` users, each
client's users in turn) on the stream every 50 ms at ``--rate`` (an open loop), and only
the agents read them. It prints each process's CPU per event from the first event until
the agents applied the last one and one copy interval more (so every durable copy of
those events is counted), and the lag of an event sampled every 2 s: put → in its actor's
``seen`` set, as `bench.ingest`'s "202 → applied". Session 8 (docs/local-stack.md) used
it to compare two versions of the agents back to back.

Servers (redis, moto) are started on free ports for the run, kept as `recstream up`
keeps them (Redis's append-only file, the emulator's snapshots).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from rich.console import Console
from rich.table import Table

from bench.common import local_stack
from bench.ingest import agents, agents_ready, cpu_seconds
from recstream.keys import Keys
from recstream.settings import Settings
from streams.producer import KinesisProducer
from streams.schema import Event

SLICE_S = 0.05
"""How often the producer puts what is due (one PutRecords call per slice or so)."""
PROBE_EVERY_S = 2.0
COPIES_WAIT_S = 6.0
"""After the last event is applied, its durable copies are written within one copy
interval (5 s by default): the CPU is counted until then. A constant, not the setting,
so that the program measures older versions of the agents too (run it with their
checkout first on ``PYTHONPATH``)."""


@dataclass
class PacedResult:
    events: int
    elapsed: float
    cpu: dict[str, float]
    """CPU seconds each process spent on the run's events."""
    lags: list[float] = field(default_factory=list)
    """Seconds from a sampled event's put to its actor's `seen` set."""


def event_of(n: int, clients: int, users: int, rng: random.Random, namespace: str) -> Event:
    """The ``n``-th event: client ``n % clients``, each client's users in turn."""
    client, user = n % clients, (n // clients) % users
    return Event(
        event_id=f"p{n}",
        event_type=rng.choice(("view", "view", "view", "click", "add_to_cart")),
        user_id=f"c{client}-u{user}",
        item_id=f"i{int(rng.paretovariate(1.2)) % 5000}",
        namespace=namespace,
    )


async def applied(redis: aioredis.Redis, keys: Keys, event: Event) -> bool:
    return await redis.zscore(keys.seen(event.actor), event.event_id) is not None


async def follow(
    redis: aioredis.Redis, keys: Keys, event: Event, put_at: float, lags: list[float]
) -> None:
    while time.perf_counter() - put_at < 120:
        if await applied(redis, keys, event):
            lags.append(time.perf_counter() - put_at)
            return
        await asyncio.sleep(0.02)


async def measure(
    settings: Settings,
    servers: dict[str, int],
    *,
    rate: float,
    seconds: float,
    clients: int,
    users: int,
) -> PacedResult:
    async with agents(settings) as worker:
        await agents_ready(settings, worker)
        pids = {**servers, "agents": worker.pid}
        redis = aioredis.from_url(settings.redis_url)
        keys = Keys(settings.namespace)
        rng = random.Random(1)
        lags: list[float] = []
        probes: set[asyncio.Task[None]] = set()
        try:
            async with KinesisProducer(settings) as producer:
                before = {name: cpu_seconds(pid) for name, pid in pids.items()}
                start = time.perf_counter()
                next_probe = start + PROBE_EVERY_S
                count = 0
                last: Event | None = None
                while (now := time.perf_counter()) - start < seconds:
                    due = int((now - start) * rate)
                    batch = [
                        event_of(n, clients, users, rng, settings.namespace)
                        for n in range(count, due)
                    ]
                    count = max(count, due)
                    if batch:
                        await producer.put_events(batch)
                        last = batch[-1]
                        if now >= next_probe:
                            probe = asyncio.create_task(
                                follow(redis, keys, last, time.perf_counter(), lags)
                            )
                            probes.add(probe)
                            next_probe = now + PROBE_EVERY_S
                    await asyncio.sleep(SLICE_S)
                elapsed = time.perf_counter() - start
                await asyncio.gather(*probes)
                if last is not None:
                    await follow(redis, keys, last, time.perf_counter(), [])
                await asyncio.sleep(COPIES_WAIT_S)
                cpu = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
        finally:
            await redis.aclose()
    return PacedResult(count, elapsed, cpu, lags)


def report(result: PacedResult, console: Console, title: str) -> None:
    table = Table(title=title)
    table.add_column("measure")
    table.add_column("value")
    table.add_row(
        "events put", f"{result.events:,} in {result.elapsed:.0f} s "
        f"({result.events / result.elapsed:,.0f}/s)"
    )  # fmt: skip
    if result.lags:
        table.add_row(
            "lag: put → applied, median / max",
            f"{statistics.median(result.lags) * 1000:,.0f} / {max(result.lags) * 1000:,.0f} ms "
            f"({len(result.lags)} samples)",
        )
    per_event = {
        name: seconds * 1000 / max(result.events, 1) for name, seconds in result.cpu.items()
    }
    for name, ms in per_event.items():
        table.add_row(f"CPU per event: {name}", f"{ms:.3f} ms")
    table.add_row("CPU per event: all", f"{sum(per_event.values()):.3f} ms")
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=800.0, help="events/s put on the stream")
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--users", type=int, default=40, help="users per client")
    args = parser.parse_args()
    with local_stack(durable=True, prefix="recstream-paced-") as (settings, servers):
        pids = {"redis": servers[0].process.pid, "emulator": servers[1].process.pid}
        result = asyncio.run(
            measure(
                settings,
                pids,
                rate=args.rate,
                seconds=args.seconds,
                clients=args.clients,
                users=args.users,
            )
        )
        report(
            result,
            Console(),
            f"the agents alone, {args.rate:,.0f} events/s put, {args.clients * args.users:,} users",
        )


if __name__ == "__main__":
    main()
