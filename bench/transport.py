"""Benchmark of the ``kinesis://`` faust transport; prints one table.

    python -m bench.transport [--backend kinesis-mock|moto] [--events 20000] [--shards 4]

* **throughput**: events/s through the transport into a trivial agent, with single and
  with aggregated (v2) records, each against a bare aiobotocore GetRecords loop (same
  stream, same run, envelopes decoded, no pacing) as the reference;
* **latency**: PutRecords -> agent, p50/p99, at a steady rate; the poll interval is the
  main term, so it is the reference;
* **failover**: two worker processes on the shards, one SIGKILLed; the time until the
  survivor holds every lease, and until it processed an event put after the kill on each
  of the dead worker's shards, against the lease duration.

Servers (moto, kinesis-mock, redis) are started on free ports for the run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import faust
import orjson

from bench.common import local_settings, summarize
from recstream import stack
from recstream.aws import async_client
from recstream.settings import Settings
from streams.envelope import Message, decode
from streams.kinesis import consumer_of, make_app, running, unpack
from streams.kinesis.shards import list_shards, partition_of
from streams.kinesis.writer import Entry, put_messages
from streams.leases import DynamoDBLeaseStore

PROBE_APP = "bench-failover"


def _entries(count: int, users: int, prefix: str) -> list[Entry]:
    out = []
    for i in range(count):
        user = f"user-{i % users}"
        value = orjson.dumps(
            {
                "event_id": f"{prefix}-{i}",
                "event_type": "view",
                "user_id": user,
                "item_id": f"item-{i % 997}",
                "timestamp": time.time(),
                "namespace": "default",
            }
        )
        out.append(Entry(user, Message(key=user.encode(), value=value)))
    return out


async def fill(settings: Settings, count: int, *, aggregate: bool) -> None:
    async with async_client(settings, "kinesis") as kinesis:
        shard_map = await list_shards(kinesis, settings.stream_name)
        entries = _entries(count, 500, "e")
        step = 5000 if aggregate else 500
        for start in range(0, count, step):
            await put_messages(
                kinesis,
                settings,
                settings.stream_name,
                entries[start : start + step],
                aggregate=aggregate,
                shard_map=shard_map,
            )


async def bare_loop(settings: Settings, expected: int) -> float:
    """The reference: GetRecords as fast as the emulator answers, envelopes decoded."""
    async with async_client(settings, "kinesis", max_pool_connections=64) as kinesis:
        shard_map = await list_shards(kinesis, settings.stream_name)
        counts = [0]
        started = time.monotonic()

        async def read(shard_id: str) -> None:
            response = await kinesis.get_shard_iterator(
                StreamName=settings.stream_name, ShardId=shard_id, ShardIteratorType="TRIM_HORIZON"
            )
            iterator: str | None = response["ShardIterator"]
            while iterator and counts[0] < expected:
                page = await kinesis.get_records(ShardIterator=iterator, Limit=10_000)
                for record in page["Records"]:
                    counts[0] += len(decode(record["Data"]))
                iterator = page.get("NextShardIterator")
                if not page["Records"]:
                    if page.get("MillisBehindLatest", 0) == 0:
                        return
                    await asyncio.sleep(0)

        await asyncio.gather(*(read(s) for s in shard_map.shards))
        elapsed = time.monotonic() - started
    if counts[0] < expected:
        raise SystemExit(f"the bare loop read {counts[0]} of {expected} events")
    return expected / elapsed


async def through_transport(settings: Settings, expected: int, *, whole: bool = False) -> float:
    app = make_app(settings, f"bench-{uuid.uuid4().hex[:8]}", whole_records=whole)
    done = asyncio.Event()
    state = {"count": 0, "last": 0.0}

    @app.agent(app.topic(settings.stream_name, key_serializer="raw", value_serializer="raw"))
    async def count(stream: Any) -> None:
        async for event in stream.events():
            state["count"] += len(unpack(event.key, event.value, event.headers)) if whole else 1
            if state["count"] >= expected:
                state["last"] = time.monotonic()
                done.set()

    async with running(app):
        await asyncio.wait_for(done.wait(), timeout=600)
        # From the first GetRecords call to the last event, like the reference: faust's
        # start-up (about a second) is a one-off, not throughput.
        started = min(r.stats.first_call for r in consumer_of(app).readers().values())
    return expected / (state["last"] - started)


async def latency(settings: Settings, seconds: float, rate: float) -> list[float]:
    app = make_app(settings, f"bench-latency-{uuid.uuid4().hex[:8]}")
    samples: list[float] = []
    ready = asyncio.Event()

    @app.agent(app.topic(settings.stream_name, value_serializer="raw"))
    async def measure(stream: Any) -> None:
        async for value in stream:
            sent = orjson.loads(value)["sent"]
            if sent > 0:
                samples.append((time.time() - sent) * 1000.0)
            ready.set()

    async with running(app), async_client(settings, "kinesis") as kinesis:
        # One warm-up event, so assignment and iterators are not measured.
        warm = Message(key=b"warm", value=orjson.dumps({"sent": 0}))
        await put_messages(kinesis, settings, settings.stream_name, [Entry("warm", warm)])
        await asyncio.wait_for(ready.wait(), 60)
        interval = 1.0 / rate
        deadline = time.monotonic() + seconds
        sent = 0
        while time.monotonic() < deadline:
            key = f"user-{random.randrange(1000)}"
            message = Message(key=key.encode(), value=orjson.dumps({"sent": time.time()}))
            await put_messages(kinesis, settings, settings.stream_name, [Entry(key, message)])
            sent += 1
            await asyncio.sleep(interval)
        for _ in range(300):
            if len(samples) >= sent:
                break
            await asyncio.sleep(0.05)
    return samples


# --- failover ---------------------------------------------------------------------------


def probe_app(settings: Settings) -> faust.App:
    """A worker (run by `python -m streams.kinesis bench.transport:probe_app`) that
    appends ``"<unix time> <partition> <event id>"`` per processed event to a file."""
    app = make_app(settings, PROBE_APP)
    path = Path(settings.state_dir) / f"processed-{settings.worker_id}.txt"

    @app.agent(app.topic(settings.stream_name, value_serializer="raw"))
    async def record(stream: Any) -> None:
        with path.open("a") as out:
            async for event in stream.events():
                event_id = orjson.loads(event.value)["event_id"]
                out.write(f"{time.time()} {event.message.partition} {event_id}\n")
                out.flush()

    return app


async def failover(settings: Settings) -> tuple[float, float]:
    scope = f"{PROBE_APP}#{settings.stream_name}"
    processes: dict[str, asyncio.subprocess.Process] = {}
    for worker in ("w1", "w2"):
        env = {**os.environ, **settings.to_env(), "RECSTREAM_WORKER_ID": worker}
        processes[worker] = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "streams.kinesis", "bench.transport:probe_app",
            env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
    stop = asyncio.Event()
    try:
        async with (
            DynamoDBLeaseStore(settings) as store,
            async_client(settings, "kinesis") as kinesis,
        ):

            async def owners() -> dict[str, str | None]:
                return {lease.shard_id: lease.owner for lease in await store.list_leases(scope)}

            for _ in range(1200):
                current = await owners()
                loads = sorted(list(current.values()).count(w) for w in ("w1", "w2"))
                if len(current) == settings.stream_shards and loads[0] == loads[1]:
                    break
                await asyncio.sleep(0.1)
            else:
                raise SystemExit(f"the two workers did not share the shards: {await owners()}")
            # A lease stolen during the start-up is read by its old owner until that
            # owner's next renew; let the renewals settle first.
            await asyncio.sleep(settings.lease_duration_s + 1)

            async def produce() -> None:
                i = 0
                while not stop.is_set():
                    batch = [
                        Entry(
                            f"user-{j}",
                            Message(
                                key=f"user-{j}".encode(),
                                value=orjson.dumps({"event_id": f"p-{i}-{j}"}),
                            ),
                        )
                        for j in range(40)
                    ]
                    await put_messages(kinesis, settings, settings.stream_name, batch)
                    i += 1
                    await asyncio.sleep(0.05)

            producer = asyncio.create_task(produce())
            await asyncio.sleep(2)
            dead = {shard for shard, owner in (await owners()).items() if owner == "w1"}
            processes["w1"].send_signal(signal.SIGKILL)
            killed = time.time()
            await processes["w1"].wait()
            leases_at = resumed_at = 0.0
            log = Path(settings.state_dir) / "processed-w2.txt"
            dead_partitions = {partition_of(s) for s in dead}
            while time.time() - killed < 120 and not (leases_at and resumed_at):
                if not leases_at and set((await owners()).values()) == {"w2"}:
                    leases_at = time.time()
                if not resumed_at and log.exists():
                    resumed: set[int] = set()
                    for line in log.read_text().splitlines():
                        at, partition, _ = line.split()
                        if float(at) > killed and int(partition) in dead_partitions:
                            resumed.add(int(partition))
                    if resumed == dead_partitions:
                        resumed_at = time.time()
                await asyncio.sleep(0.05)
            stop.set()
            await producer
            if not (leases_at and resumed_at):
                raise SystemExit("the survivor did not take over within 120 s")
            return leases_at - killed, resumed_at - killed
    finally:
        for process in processes.values():
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(process.wait(), 15)
                except TimeoutError:
                    process.kill()
                    await process.wait()


# --- main -------------------------------------------------------------------------------


def _stream(base: Settings, name: str, shards: int, **extra: Any) -> Settings:
    settings = base.model_copy(
        update={"stream_name": f"bench-{name}-{uuid.uuid4().hex[:6]}", "stream_shards": shards}
        | extra
    )
    stack.create_resources(settings)
    return settings


async def run(args: argparse.Namespace, base: Settings) -> list[tuple[str, str, str, str]]:
    rows: list[tuple[str, str, str, str]] = []
    for label, aggregate in (("single records", False), ("aggregated records", True)):
        settings = _stream(base, "agg" if aggregate else "single", args.shards)
        await fill(settings, args.events, aggregate=aggregate)
        reference = await bare_loop(settings, args.events)
        measured = await through_transport(settings, args.events)
        rows.append(
            (
                f"{label}: events/s into an agent",
                f"{measured:,.0f}",
                f"{reference:,.0f} (bare GetRecords loop)",
                f"{measured / reference:.2f}",
            )
        )
        if aggregate:
            whole = await through_transport(settings, args.events, whole=True)
            rows.append(
                (
                    "aggregated, whole_records=True: events/s",
                    f"{whole:,.0f}",
                    f"{reference:,.0f} (bare GetRecords loop)",
                    f"{whole / reference:.2f}",
                )
            )
    settings = _stream(base, "latency", args.shards)
    samples = await latency(settings, args.latency_seconds, args.rate)
    stats = summarize(samples)
    poll_ms = settings.poll_interval_s * 1000
    rows.append(
        (
            f"PutRecords -> agent p50 / p99 (ms), {stats['n']:.0f} events",
            f"{stats['p50']:.0f} / {stats['p99']:.0f}",
            f"{poll_ms:.0f} (poll interval)",
            f"{stats['p99'] / poll_ms:.2f} (p99)",
        )
    )
    if not args.skip_failover:
        settings = _stream(base, "failover", 4, lease_duration_s=args.lease_duration)
        leases_s, resumed_s = await failover(settings)
        lease = settings.lease_duration_s
        rows.append(
            (
                "failover after SIGKILL: leases taken (s)",
                f"{leases_s:.1f}",
                f"{lease:.1f} (lease duration)",
                f"{leases_s / lease:.2f}",
            )
        )
        rows.append(
            (
                "failover after SIGKILL: processing resumed (s)",
                f"{resumed_s:.1f}",
                f"{lease:.1f} (lease duration)",
                f"{resumed_s / lease:.2f}",
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["kinesis-mock", "moto"], default="kinesis-mock")
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--latency-seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=100.0, help="events/s for latency")
    parser.add_argument("--lease-duration", type=float, default=3.0)
    parser.add_argument("--skip-failover", action="store_true")
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    with local_settings(kinesis_mock=args.backend == "kinesis-mock") as base:
        rows = asyncio.run(run(args, base))
    table = Table(title=f"kinesis:// transport on {args.backend}, {args.shards} shards")
    for column in ("measurement", "transport", "reference", "ratio"):
        table.add_column(column, justify="left" if column == "measurement" else "right")
    for row in rows:
        table.add_row(*row)
    Console().print(table)


if __name__ == "__main__":
    main()
