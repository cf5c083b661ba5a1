"""Publishing benchmark: how long a version takes to publish and to garbage-collect.

    python -m bench.publish [--items 20000] [--neighbours 50] [--repeat 3]
                            [--background-keys 200000] [--reads 5000]

A synthetic item-to-item-shaped model (one zset of ``--neighbours`` members per item, plus
a hash of 64-float factors per item) is published ``--repeat`` times into a private
redis-server and moto server. It prints:

- publish: p50 / p99 seconds, records/s and members/s, and the ratio to the reference,
  the same records written by a bare Redis pipeline in the same run (no S3, no lease, no
  key list, no switch): the ratio is the price of safe publishing;
- serving's read of one record through the pointer (`read_current`, one Lua call) against
  a bare ZREVRANGE of the same data;
- GC of one retired version by its key list, against deleting the same version by a
  SCAN of the keyspace (what GC falls back to without a key list), with
  ``--background-keys`` unrelated keys in Redis, as user windows would be.

It is a program, never part of the test run.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np
import redis.asyncio as aioredis

from recstream import stack
from recstream.aws import async_client
from recstream.keys import Keys
from recstream.settings import Settings
from training.base import RedisRecord
from training.publish import DataRange, ModelRegistry, RunInfo, read_current


class SyntheticModel:
    """Neighbour zsets and a factor hash, like item2item and ALS publish."""

    name: ClassVar[str] = "synthetic"

    def __init__(self, items: int, neighbours: int, seed: int = 0) -> None:
        self.items, self.neighbours = items, neighbours
        rng = np.random.default_rng(seed)
        self.nbr = rng.integers(0, items, size=(items, neighbours))
        self.scores = rng.random((items, neighbours))
        self.factors = rng.random((items, 64), dtype=np.float32)

    def fit(self, log: Any) -> Self:
        return self

    def recommend(
        self, history: list[str], k: int, *, user_id: str | None = None, now: float | None = None
    ) -> list[tuple[str, float]]:
        return []

    def save(self, directory: Path) -> None:
        np.save(directory / "factors.npy", self.factors)

    @classmethod
    def load(cls, directory: Path) -> Self:
        raise NotImplementedError

    def params(self) -> dict[str, Any]:
        return {"items": self.items, "neighbours": self.neighbours}

    def redis_records(self) -> Iterator[RedisRecord]:
        for i in range(self.items):
            members = {f"i{j}": float(s) for j, s in zip(self.nbr[i], self.scores[i], strict=True)}
            yield RedisRecord(f"nbr:i{i}", "zset", members)
        yield RedisRecord(
            "factors",
            "hash",
            {f"i{i}": self.factors[i].tobytes() for i in range(self.items)},
        )


async def reference_write(redis: aioredis.Redis, keys: Keys, model: SyntheticModel) -> float:
    started = time.perf_counter()
    members = 0
    async with redis.pipeline(transaction=False) as pipe:
        for record in model.redis_records():
            key = keys.model("reference", "v", record.suffix)
            if record.kind == "zset":
                pipe.zadd(key, dict(record.value))  # type: ignore[arg-type]
            else:
                pipe.hset(key, mapping=dict(record.value))  # type: ignore[arg-type]
            members += len(record.value)
            if members >= 20_000:
                await pipe.execute()
                members = 0
        await pipe.execute()
    return time.perf_counter() - started


async def fill_background(redis: aioredis.Redis, keys: Keys, count: int) -> None:
    async with redis.pipeline(transaction=False) as pipe:
        for i in range(count):
            pipe.set(keys.window(f"user{i}"), b"x")
            if i % 10_000 == 9_999:
                await pipe.execute()
        await pipe.execute()


def pct(values: list[float], q: int) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(sorted(values), n=100, method="inclusive")[q - 1]


async def run(settings: Settings, args: argparse.Namespace) -> None:
    keys = Keys(settings.namespace)
    model = SyntheticModel(args.items, args.neighbours)
    records = args.items + 1
    members = args.items * args.neighbours + args.items
    redis = aioredis.from_url(settings.redis_url)
    try:
        await fill_background(redis, keys, args.background_keys)
        reference = [await reference_write(redis, keys, model) for _ in range(args.repeat)]
        async with async_client(settings, "s3") as s3:
            registry = ModelRegistry(redis, settings, s3)
            info = RunInfo(data=DataRange(source="synthetic", start=0.0, end=1.0, rows=0))
            published: list[float] = []
            for _ in range(args.repeat):
                started = time.perf_counter()
                await registry.publish(model, info, gc=False)
                published.append(time.perf_counter() - started)

            # serving's read: pointer + neighbours in one Lua call, against a bare ZREVRANGE
            # of a known key (what a reader that cached the version would do)
            current = await registry.current("synthetic")
            assert current is not None
            direct_key = keys.model("synthetic", current, "nbr:i1")
            direct: list[float] = []
            via_pointer: list[float] = []
            for i in range(args.reads):
                started = time.perf_counter()
                await redis.zrevrange(direct_key, 0, 19, withscores=True)
                direct.append((time.perf_counter() - started) * 1000)
                started = time.perf_counter()
                await read_current(redis, keys, "synthetic", f"nbr:i{i % args.items}", limit=20)
                via_pointer.append((time.perf_counter() - started) * 1000)

            # GC by key list: retire the oldest version
            versions = [v.version for v in await registry.versions("synthetic")]
            started = time.perf_counter()
            report = await registry.gc("synthetic", keep=len(versions) - 1)
            by_list = time.perf_counter() - started
            assert report.redis_keys == records, report

            # the same deletion by SCAN of the keyspace (the fallback without a key list)
            victim = versions[1]
            started = time.perf_counter()
            found = [
                k
                async for k in redis.scan_iter(
                    match=keys.model("synthetic", victim, "*"), count=1000
                )
            ]
            for i in range(0, len(found), 500):
                await redis.unlink(*found[i : i + 500])
            by_scan = time.perf_counter() - started
            assert len(found) == records
    finally:
        await redis.aclose()

    p50, p99, ref50 = pct(published, 50), pct(published, 99), pct(reference, 50)
    print(
        f"model: {args.items:,} items x {args.neighbours} neighbours + factor hash = "
        f"{records:,} records, {members:,} members; {args.background_keys:,} other keys"
    )
    print(f"{'what':<34}{'p50 s':>9}{'p99 s':>9}{'records/s':>12}{'members/s':>12}{'ratio':>8}")
    print(
        f"{'reference: bare pipeline write':<34}{ref50:>9.3f}{pct(reference, 99):>9.3f}"
        f"{records / ref50:>12,.0f}{members / ref50:>12,.0f}{1.0:>8.2f}"
    )
    print(
        f"{'publish (S3 + Redis + switch)':<34}{p50:>9.3f}{p99:>9.3f}"
        f"{records / p50:>12,.0f}{members / p50:>12,.0f}{p50 / ref50:>8.2f}"
    )
    title = f"serving read of 20 neighbours ({args.reads:,} reads)"
    print(f"\n{title:<44}{'p50 ms':>9}{'p99 ms':>9}{'ratio':>8}")
    d50 = pct(direct, 50)
    print(
        f"{'reference: ZREVRANGE of a known key':<44}{d50:>9.3f}{pct(direct, 99):>9.3f}{1.0:>8.2f}"
    )
    v50 = pct(via_pointer, 50)
    print(
        f"{'read_current (pointer + record, Lua)':<44}{v50:>9.3f}{pct(via_pointer, 99):>9.3f}"
        f"{v50 / d50:>8.2f}\n"
    )
    blank = f"{'':>9}{'':>12}{'':>12}"
    print(f"{'GC one version by SCAN (fallback)':<34}{by_scan:>9.3f}{blank}{1.0:>8.2f}")
    print(f"{'GC one version by key list':<34}{by_list:>9.3f}{blank}{by_list / by_scan:>8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--neighbours", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--background-keys", type=int, default=200_000)
    parser.add_argument("--reads", type=int, default=5_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="recstream-bench-") as tmp:
        work = Path(tmp)
        servers = [
            stack.start_redis(stack.free_port(), work / "redis"),
            stack.start_moto(stack.free_port(), work),
        ]
        try:
            redis_server, moto = servers
            settings = Settings(
                aws_endpoint_url=moto.url,
                redis_url=f"redis://127.0.0.1:{redis_server.port}/0",
                namespace="bench",
                bucket="bench-models",
                state_dir=work,
            )
            stack.create_resources(settings)
            asyncio.run(run(settings, args))
        finally:
            for server in reversed(servers):
                server.stop()


if __name__ == "__main__":
    main()
