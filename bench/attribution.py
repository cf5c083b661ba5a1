"""Attribution and identity-stitching benchmark: what the two stages cost per event.

    python -m bench.attribution [--events 20000] [--batch 500] [--users 2000]

Into a private redis-server and moto server it measures:

- serving's `log_served` (one Lua call: record, per-actor index, impressions), p50 / p99
  ms per call, against a bare ``SET … EX`` of the same record in the same run;
- the attribution agent over batches of clicks, carts, purchases and views (a third
  naming a recommendation id, a third hitting a served item without one), events/s
  including the DynamoDB copy, against a bare pipeline doing one GET per event and
  the counter HINCRBYs per match (no dedup, no index, no durable copy);
- the windows agent with identity stitching on (a fifth of the events anonymous of
  sessions that logged in, one in fifty a login) against the same agent without it.

It is a program, never part of the test run.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Sequence

import redis.asyncio as aioredis

from agents.attribution import AttributionAgent, DynamoCounters
from agents.deadletter import MemoryDeadLetters
from agents.identity import IdentityStitcher
from agents.state import RedisHotStore
from agents.windows import WindowAgent
from bench.common import local_settings, summarize
from recstream.keys import Keys
from recstream.served import ServedLog, served_record
from recstream.settings import Settings
from recstream.stores import open_stores
from recstream.windows import DynamoWindows
from streams.schema import Event


def events(n: int, users: int, namespace: str, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    now = time.time()
    out = []
    for i in range(n):
        user = rng.randrange(users)
        kind = rng.choice(["click", "click", "add_to_cart", "purchase", "view"])
        rid = f"r{user}" if i % 3 == 0 else None
        item = f"i{user % 97}-{rng.randrange(10)}" if i % 3 != 2 else f"x{i}"
        value = round(rng.uniform(1, 100), 2) if kind == "purchase" else None
        out.append(
            Event(
                event_id=f"b{seed}-{i}",
                event_type=kind,
                user_id=f"u{user}",
                item_id=item,
                recommendation_id=rid,
                event_value=value,
                timestamp=now,
                namespace=namespace,
            ).to_json()
        )
    return out


def mixed(n: int, users: int, namespace: str) -> list[bytes]:
    """A fifth anonymous events of sessions that log in, one in fifty a login."""
    rng = random.Random(3)
    now = time.time()
    out = []
    for i in range(n):
        user = rng.randrange(users)
        who: dict[str, str] = {"user_id": f"v{user}"}
        if i % 5 == 0:
            who = {"session_id": f"s{user}"}
        elif i % 50 == 1:
            who["session_id"] = f"s{user}"
        out.append(
            Event(
                event_id=f"m{i}",
                event_type="view",
                item_id=f"i{i % 500}",
                timestamp=now + i * 1e-3,
                namespace=namespace,
                **who,
            ).to_json()
        )
    return out


async def rate(
    process: Callable[[Sequence[bytes]], Awaitable[object]], records: list[bytes], batch: int
) -> float:
    started = time.perf_counter()
    for start in range(0, len(records), batch):
        await process(records[start : start + batch])
    return len(records) / (time.perf_counter() - started)


async def run(settings: Settings, n: int, batch: int, users: int) -> None:
    ns = settings.namespace
    async with open_stores(settings) as stores:
        redis: aioredis.Redis = stores.redis
        served_log = ServedLog(redis, settings)
        logged, bare = [], []
        for user in range(users):
            record = served_record(f"u{user}", "ranker", [f"i{user % 97}-{k}" for k in range(10)])
            t = time.perf_counter()
            await served_log.log(ns, f"r{user}", record)
            logged.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            await redis.set(f"bench:served:{user}", record.dumps(), ex=60)
            bare.append((time.perf_counter() - t) * 1000)
        a, b = summarize(logged), summarize(bare)
        print(f"{'log_served':<34} p50 {a['p50']:.3f} ms  p99 {a['p99']:.3f} ms")
        print(f"{'  reference: bare SET':<34} p50 {b['p50']:.3f} ms  p99 {b['p99']:.3f} ms")
        print(f"{'  ratio (p50)':<34} {a['p50'] / b['p50']:.2f}x")

        agent = AttributionAgent(redis, DynamoCounters(stores.dynamodb, settings), settings)
        keys = Keys(ns)

        async def reference(values: Sequence[bytes]) -> None:
            parsed = [Event.from_json(v) for v in values]
            pipe = redis.pipeline(transaction=False)
            for e in parsed:
                pipe.get(keys.served(e.recommendation_id or f"r{e.user_id}"))
            found = await pipe.execute()
            pipe = redis.pipeline(transaction=False)
            for e, raw in zip(parsed, found, strict=True):
                if raw is not None and e.event_type != "view":
                    pipe.hincrby("bench:attr", e.event_type, 1)
                    pipe.hincrby("bench:attr:day", e.event_type, 1)
            await pipe.execute()

        records = events(n, users, ns, seed=1)
        ours = await rate(agent.process, records, batch)
        ref = await rate(reference, events(n, users, ns, seed=2), batch)
        print(f"{'attribution agent':<34} {ours:,.0f} events/s ({agent.totals.attributed} counted)")
        print(f"{'  reference: bare GET + HINCRBY':<34} {ref:,.0f} events/s")
        print(f"{'  ratio':<34} {ours / ref:.2f}")

        results = {}
        for name, on in (("windows + identity", True), ("windows alone", False)):
            s = settings.model_copy(update={"namespace": f"{ns}-{int(on)}"})
            hot, durable = RedisHotStore(redis, s), DynamoWindows(stores.dynamodb, s)
            identity = IdentityStitcher(redis, hot, durable, s) if on else None
            windows = WindowAgent(hot, durable, MemoryDeadLetters(), identity=identity)
            results[name] = await rate(windows.process, mixed(n, users, s.namespace), batch)
            print(f"{name:<34} {results[name]:,.0f} events/s")
        ratio = results["windows + identity"] / results["windows alone"]
        print(f"{'  ratio':<34} {ratio:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--users", type=int, default=2_000)
    args = parser.parse_args()
    with local_settings() as settings:
        asyncio.run(run(settings, args.events, args.batch, args.users))


if __name__ == "__main__":
    main()
