"""Benchmark of the stream agent (windows + feature vectors + trending); prints tables.

    python -m bench.agents [--events 20000] [--batch 500] [--samples 100] [--users 10000]
                           [--order dataset|time]
                           [--only throughput,commands,dedup,memory,latency,backlog]

* **throughput**: events/s of one agent process applying real events (Taobao
  UserBehavior, with the catalog and a published ALS model in Redis) in batches: the
  whole windows agent (parse, Redis, DynamoDB copies on moto) as the worker runs it
  (`agents.windows.Pipeline`: a batch's durable copies written while the next batch is
  applied to Redis, and each batch fed: parsed and prepared while the one before is
  applied) and with the copies in turn (`deliver`), its Redis part alone, and every agent
  of a worker on every record (windows, attribution, archive to S3; each agent in its own
  task with its own queue, as the worker's faust agents run side by side), each as
  a ratio to a bare loop sending the same Redis writes as plain pipelined commands (no
  Lua, no dedup, no parsing), in the same run. ``--order dataset`` keeps the slice's
  order (one user's events after another's: what a per-user cache sees at its best);
  ``--order time`` sorts by event time, as a shard interleaves its users;
* **commands** (only when asked for): redis-server's time per event by command the
  script calls (INFO commandstats), against the script's own time and the server's CPU;
* **agent-instructions** (only when asked for; needs valgrind): the agent process's own
  CPU instructions per event (``--agent-modes``: ``worker``, every agent of a worker as
  the throughput run's last row; ``windows``, the windows agent alone), under callgrind:
  a fresh agent in a process of its own, instrumentation switched on only around
  ``--instructions-events`` events after ``--instructions-warm`` others (a READY/DONE
  handshake on its stdin and stdout, as `bench.request_cost`), ``PYTHONHASHSEED`` fixed
  and the copy interval's timer off (the copies are written when a group reaches its
  actor cap, and for what is left at the end of each stretch); redis-server and moto run
  as usual and are not counted. ``--agent-profile PATH`` runs the same under cProfile;
* **instructions** (only when asked for; needs valgrind): redis-server's instructions
  per event for the Redis part, under callgrind, for ``--instructions-events`` events
  after ``--instructions-warm`` others: unlike CPU time, the count does not move with
  the machine's load (about 0.5% from run to run), so small changes to the script show;
* **dedup design**: the composed script (one seen check for all parts) against one
  script and one seen set per part, events/s and bytes per active user;
* **click -> feature vector**: a click put on Kinesis until a `recstream agents` worker
  has changed the user's feature vector (polled with `read_user_state`), p50/p95, against
  the transport's poll interval;
* **backlog**: a real `recstream agents` worker (every agent on, the `kinesis://`
  transport) working off the slice, four times over under other user ids, put on the
  emulator's stream first through the API's own producer (100 events a call, aggregated
  per shard as configured): events/s and the worker's CPU per event, from its start to
  the last event applied, less its start-up (measured by a worker applying one event),
  as a ratio to the bare loop sending the same Redis writes for the same events, in the
  same run;
* **memory**: Redis bytes per active user (window, seen ids, features, embedding) and
  per 100k active users.

Servers (redis, moto) are started on free ports for the run.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import csv
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from agents.app import STREAM_BUFFER, build_agent
from agents.archive import ArchiveBuffer, S3ArchiveSink, flush_until_done
from agents.attribution import AttributionAgent, DynamoCounters
from agents.catalog import ALS_MODEL
from agents.features import FeaturesPart, read_user_state
from agents.state import RedisHotStore, WindowsPart
from agents.trending import WINDOWS, TrendingPart
from agents.windows import Pipeline, deliver
from agents.worker import GC_THRESHOLDS
from bench.common import cpu_seconds, local_settings, summarize
from recstream import stack
from recstream.aws import sync_client
from recstream.heap import tuned_collector
from recstream.keys import Keys
from recstream.settings import Settings
from recstream.stores import open_stores
from streams.envelope import Message, encode
from streams.kinesis.app import _loop_factory
from streams.producer import KinesisProducer
from streams.schema import Event, Item

TYPES = {"pv": "view", "cart": "add_to_cart", "buy": "purchase", "fav": "like"}
DATA = (
    Path(__file__).resolve().parent.parent.parent / "shared" / "data",
    Path("/work/shared/data"),
)


def taobao_rows(limit: int) -> list[list[str]]:
    for root in DATA:
        path = root / "taobao-userbehavior-head-dev" / "UserBehavior_head_dev.csv"
        if path.is_file():
            with path.open() as handle:
                return [row for _, row in zip(range(limit), csv.reader(handle), strict=False)]
    raise SystemExit(f"the Taobao slice is missing; looked in {DATA}")


ORDER = "dataset"
"""``dataset`` (the slice's order, user after user) or ``time`` (by event time)."""
REDIS_CONFIG: dict[str, str] = {}
"""``--redis-config``: redis.conf settings the instructions and memory runs set first."""


async def configure(redis: aioredis.Redis) -> None:
    for name, value in REDIS_CONFIG.items():
        await redis.config_set(name, value)


def events_of(rows: Sequence[list[str]], namespace: str, copies: int = 1) -> list[Event]:
    """The rows as events; ``copies`` > 1 repeats them under other user ids (more users).
    In `ORDER`."""
    out: list[Event] = []
    for copy in range(copies):
        for n, (user, item, category, behavior, ts) in enumerate(rows):
            out.append(
                Event(
                    event_id=f"{copy}-{n}",
                    event_type=TYPES[behavior],
                    user_id=f"u{user}-{copy}",
                    item_id=item,
                    timestamp=float(ts),
                    properties={"category": f"c{category}"},
                    impression=[r[1] for r in rows[n : n + 4]] if n % 5 == 0 else [],
                    namespace=namespace,
                )
            )
    if ORDER == "time":
        out.sort(key=lambda e: (e.timestamp, e.event_id))
    return out


async def prepare(redis: aioredis.Redis, namespace: str, rows: Sequence[list[str]]) -> None:
    """The catalog's hot copy and a published 64-factor ALS model, as in production."""
    keys = Keys(namespace)
    items = sorted({r[1] for r in rows})
    await redis.mset(
        {
            keys.item(i): Item(
                item_id=i, categories=[f"c{c}"], brand=f"b{int(i) % 97}"
            ).model_dump_json()
            for i, c in {r[1]: r[2] for r in rows}.items()
        }
    )
    rng = np.random.default_rng(1)
    factors: dict[Any, Any] = {i: rng.normal(size=64).astype("<f4").tobytes() for i in items}
    await redis.hset(keys.model(ALS_MODEL, "v1", "factors"), mapping=factors)
    await redis.set(keys.model_pointer(ALS_MODEL), "v1")


# --- the bare reference ----------------------------------------------------------------------


async def bare_loop(
    redis: aioredis.Redis, settings: Settings, events: Sequence[Event], batch: int
) -> float:
    """The same Redis writes as plain pipelined commands, one pipeline per batch; events/s.
    Per event what the agent's script writes per event; per batch what it writes once per
    chunk (the trend clock, the caps, the categories' newest times)."""
    started = time.perf_counter()
    for start in range(0, len(events), batch):
        chunk = events[start : start + batch]
        pipe = redis.pipeline(transaction=False)
        clocks: dict[str, float] = {}
        for e in chunk:
            keys = Keys(e.namespace)
            actor, item, ts = e.actor, e.item_id or "", e.timestamp
            cat = str(e.properties.get("category", ""))
            pipe.zadd(keys.seen(actor), {e.event_id: ts})
            pipe.lpush(keys.window(actor), e.to_json())
            pipe.ltrim(keys.window(actor), 0, settings.window_size - 1)
            pipe.zincrby(keys.popularity, 1, item)
            feat = keys.features(actor)
            pipe.hincrby(feat, "n", 1)
            pipe.hincrby(feat, f"n:{e.event_type}", 1)
            pipe.hset(
                feat,
                mapping={
                    "last_ts": ts,
                    f"a:cat:{cat}": f"1@{ts}",
                    f"a:type:{e.event_type}": f"1@{ts}",
                },
            )
            pipe.expire(feat, settings.window_ttl_s)
            pipe.zincrby(keys.popularity_decayed, 1.0, item)
            pipe.zincrby(keys.popularity_category(cat), 1.0, item)
            for w in WINDOWS:
                bucket = keys.counts_bucket(w.span_s, w.bucket(ts))
                pipe.zincrby(bucket, 1, item)
                pipe.zincrby(keys.counts_bucket(w.span_s, w.bucket(ts), cat), 1, item)
            clocks[keys.trend_clock] = max(ts, clocks.get(keys.trend_clock, ts))
        for clock, ts in clocks.items():
            pipe.hset(clock, "t", ts)
        await pipe.execute()
    return len(events) / (time.perf_counter() - started)


# --- runs ----------------------------------------------------------------------------------------


async def _server_cpu(redis: aioredis.Redis) -> float:
    info: dict[str, Any] = await redis.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _emulator_cpu(settings: Settings) -> float:
    """CPU seconds of the emulator process serving ``aws_endpoint_url`` (it shares the
    machine's cores with Redis and the agent); 0 where /proc does not say."""
    port = f"-p {(settings.aws_endpoint_url or '').rsplit(':', 1)[-1]}"
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            if "recstream.emulator" in argv and port in argv:
                return cpu_seconds(int(pid))
        except OSError:
            continue
    return 0.0


async def concurrently(
    batches: Sequence[list[bytes]],
    pipeline: Pipeline,
    attribution: AttributionAgent,
    archive: ArchiveBuffer[int],
) -> None:
    """Every agent of a worker on every batch, each in its own task with its own queue,
    as the worker's faust agents consume the topic side by side in one process (one
    agent's CPU work runs while another waits for its stores); returns once every agent
    has handled every batch, the archive flushed and the durable copies written. Each
    queue holds what faust's stream buffer holds in the worker (`agents.app.STREAM_BUFFER`
    messages), so one agent falls that far behind the others before it holds
    them up."""
    size = max(2, STREAM_BUFFER // max(len(batches[0]) if batches else 1, 1))
    queues: list[asyncio.Queue[list[bytes] | None]] = [asyncio.Queue(size) for _ in range(3)]

    async def windows(queue: asyncio.Queue[list[bytes] | None]) -> None:
        while (chunk := await queue.get()) is not None:
            await pipeline.feed(chunk)
        await pipeline.drain()

    async def attributing(queue: asyncio.Queue[list[bytes] | None]) -> None:
        while (chunk := await queue.get()) is not None:
            await attribution.process(chunk, "bench")

    async def archiving(queue: asyncio.Queue[list[bytes] | None]) -> None:
        offset = 0
        while (chunk := await queue.get()) is not None:
            archive.add((value, offset + n) for n, value in enumerate(chunk))
            offset += len(chunk)
            if archive.full:
                await flush_until_done(archive)
        await flush_until_done(archive)

    async def feed() -> None:
        for chunk in [*batches, None]:
            for queue in queues:
                await queue.put(chunk)

    await asyncio.gather(feed(), windows(queues[0]), attributing(queues[1]), archiving(queues[2]))


async def throughput(settings: Settings, rows: Sequence[list[str]], batch: int) -> None:
    """Wall-clock events/s, plus the CPU each event costs this process, redis-server and
    the emulator (moto, which serves DynamoDB, S3 and SQS here): on a shared, loaded
    machine the CPU figures say what free cores would do."""
    async with open_stores(settings) as stores:
        redis = stores.redis
        table: list[tuple[str, float, float, float, float]] = []
        for label in ("bare", "redis", "agent", "inturn", "worker"):
            ns = f"{label}-{os.getpid()}"
            await prepare(redis, ns, rows)
            events = events_of(rows, ns)
            wall, cpu, server = time.perf_counter(), time.process_time(), await _server_cpu(redis)
            emulator = _emulator_cpu(settings)
            if label == "bare":
                await bare_loop(redis, settings, events, batch)
            elif label == "redis":
                hot = build_agent(stores, settings).hot
                for start in range(0, len(events), batch):
                    await hot.apply(events[start : start + batch])
            elif label == "agent":
                agent = build_agent(stores, settings)
                pipeline = Pipeline(agent, "bench")
                raw = [e.to_json() for e in events]
                for start in range(0, len(raw), batch):
                    await pipeline.feed(raw[start : start + batch])
                await pipeline.drain()
            elif label == "inturn":
                agent = build_agent(stores, settings)
                raw = [e.to_json() for e in events]
                for start in range(0, len(raw), batch):
                    await deliver(agent, raw[start : start + batch], "bench")
            else:
                # Every agent of a worker on every record, one after the other, as the
                # worker's agents share one process (the forwarder needs a tracker).
                agent = build_agent(stores, settings)
                attribution = AttributionAgent(
                    redis, DynamoCounters(stores.dynamodb, settings), settings
                )
                archive: ArchiveBuffer[int] = ArchiveBuffer.of(
                    S3ArchiveSink(stores.s3, settings), settings
                )
                pipeline = Pipeline(agent, "bench")
                raw = [e.to_json() for e in events]
                await concurrently(
                    [raw[start : start + batch] for start in range(0, len(raw), batch)],
                    pipeline,
                    attribution,
                    archive,
                )
            n = len(events)
            table.append(
                (
                    label,
                    n / (time.perf_counter() - wall),
                    (time.process_time() - cpu) / n * 1e6,
                    (await _server_cpu(redis) - server) / n * 1e6,
                    (_emulator_cpu(settings) - emulator) / n * 1e6,
                )
            )
    bare = table[0][1]
    print(
        f"\nthroughput, {len(rows)} Taobao events ({ORDER} order), batches of {batch}, one process"
    )
    print(
        f"{'run':<44}{'events/s':>10}{'ratio':>7}{'client us/ev':>14}{'redis us/ev':>13}"
        f"{'moto us/ev':>12}{'ev/s per client core':>22}"
    )
    names = {
        "bare": "bare loop: same Redis writes, plain pipeline",
        "redis": "agent, Redis part (a Lua call per 100 ev.)",
        "agent": "agent, whole (parse + Redis + DynamoDB)",
        "inturn": "  the same, durable copies in turn",
        "worker": "worker: windows + attribution + archive",
    }
    for label, rate, client_us, server_us, emulator_us in table:
        print(
            f"{names[label]:<44}{rate:>10,.0f}{rate / bare:>7.2f}{client_us:>14.0f}"
            f"{server_us:>13.0f}{emulator_us:>12.0f}{1e6 / client_us:>22,.0f}"
        )


async def commands(settings: Settings, rows: Sequence[list[str]], batch: int) -> None:
    """Where redis-server's time per event goes when the agent's script applies the
    events (the Redis part alone): INFO commandstats after a reset, per command called
    by the script, against the server's CPU per event."""
    async with open_stores(settings) as stores:
        redis = stores.redis
        ns = f"commands-{os.getpid()}"
        await prepare(redis, ns, rows)
        events = events_of(rows, ns)
        hot = build_agent(stores, settings).hot
        await redis.config_resetstat()
        server = await _server_cpu(redis)
        for start in range(0, len(events), batch):
            await hot.apply(events[start : start + batch])
        cpu = (await _server_cpu(redis) - server) / len(events) * 1e6
        stats: dict[str, Any] = await redis.info("commandstats")
    n = len(events)
    print(
        f"\nredis-server per event, {n} Taobao events ({ORDER} order), Redis part alone: "
        f"{cpu:.0f} us of CPU (load {os.getloadavg()[0]:.1f})"
    )
    print(f"{'command':<22}{'calls/ev':>10}{'us/call':>10}{'us/ev':>10}")
    rows_out = sorted(
        ((name.removeprefix("cmdstat_"), v) for name, v in stats.items()),
        key=lambda kv: -float(kv[1]["usec"]),
    )
    inner = script = 0.0
    for name, v in rows_out:
        calls, usec = int(v["calls"]), float(v["usec"])
        if name in ("evalsha", "eval"):
            script = usec
        else:
            inner += usec
        if usec / n >= 0.05:
            print(f"{name:<22}{calls / n:>10.2f}{usec / max(calls, 1):>10.2f}{usec / n:>10.2f}")
    print(
        f"the script's wall time {script / n:.0f} us/ev, of which the commands it calls "
        f"{inner / n:.0f}: the rest is Lua (decoding the chunk, tables, strings, numbers)"
    )


def instructions(
    settings: Settings,
    rows: Sequence[list[str]],
    warm: int,
    count: int,
    keep: Path | None = None,
) -> None:
    """redis-server's instructions per event (callgrind) for the Redis part: the server
    runs under valgrind on a port of its own, its counters are zeroed after the set-up
    and the first ``warm`` events, and dumped after the next ``count``. With ``keep``,
    the dump is copied there (for ``callgrind_annotate``: where the instructions go)."""
    valgrind = shutil.which("valgrind")
    control = shutil.which("callgrind_control")
    if valgrind is None or control is None:
        raise SystemExit("`--only instructions` needs valgrind: apt-get install valgrind")
    port = stack.free_port()
    out = settings.state_dir / f"callgrind-{port}"
    server = subprocess.Popen(
        [valgrind, "--tool=callgrind", f"--callgrind-out-file={out}.%p",
         "redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    local = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{port}/0"})

    def callgrind(command: str) -> None:
        subprocess.run([control, command, str(server.pid)], check=True, capture_output=True)

    try:
        measured = asyncio.run(_instructions_run(local, rows, warm, count, callgrind))
        total = 0
        for dump in out.parent.glob(f"{out.name}.*"):
            text = dump.read_text()
            if "Trigger: dump" in text:
                total = max(
                    int(line.split()[1]) for line in text.splitlines() if line.startswith("totals:")
                )
                if keep is not None:
                    shutil.copyfile(dump, keep)
    finally:
        server.terminate()
        server.wait(60)
        for dump in out.parent.glob(f"{out.name}.*"):
            dump.unlink()
    print(
        f"\nredis-server instructions per event, Redis part, {measured} Taobao events "
        f"({ORDER} order) after {warm}: {total / max(measured, 1) / 1e3:.1f}k"
    )


async def _instructions_run(
    settings: Settings,
    rows: Sequence[list[str]],
    warm: int,
    count: int,
    callgrind: Callable[[str], None],
) -> int:
    """The events of `instructions`; how many were measured."""
    async with open_stores(settings) as stores:
        redis = stores.redis
        for _ in range(300):  # valgrind starts redis-server in a few seconds
            try:
                await redis.ping()
                break
            except (OSError, RedisError):
                await asyncio.sleep(0.1)
        ns = f"instructions-{os.getpid()}"
        await configure(redis)
        await prepare(redis, ns, rows)
        events = events_of(rows, ns)
        hot = build_agent(stores, settings).hot
        for start in range(0, warm, 500):
            await hot.apply(events[start : min(warm, start + 500)])
        measured = events[warm : warm + count]
        await asyncio.to_thread(callgrind, "-z")  # counters zeroed: only these events count
        for start in range(0, len(measured), 500):
            await hot.apply(measured[start : start + 500])
        await asyncio.to_thread(callgrind, "-d")
    return len(measured)


AGENT_MODES = ("worker", "windows")
ROOT = Path(__file__).resolve().parent.parent


def _agent_env(settings: Settings, namespace: str) -> dict[str, str]:
    """The measured agent's environment: the stack's addresses, string hashing fixed (set
    and dict orders, and so the work of a batch, otherwise differ between runs)."""
    return {
        **os.environ,
        **settings.to_env(),
        "PYTHONHASHSEED": "0",
        "BENCH_NAMESPACE": namespace,
        "PYTHONPATH": str(ROOT),
    }


async def _agent_inner(
    mode: str, rows: Sequence[list[str]], warm: int, count: int, batch: int, profile: str | None
) -> None:
    """In the measured process: a fresh agent (every agent of a worker, or the windows
    agent alone) over ``warm`` events, then ``count`` more between two lines on stdin
    (the parent switches callgrind's instrumentation on and off there). Each stretch ends
    with what the worker would still owe for it: the pending durable copies written and
    the archive's buffer flushed."""
    settings = Settings()
    namespace = os.environ["BENCH_NAMESPACE"]
    async with open_stores(settings) as stores:
        redis = stores.redis
        await prepare(redis, namespace, rows)
        raw = [e.to_json() for e in events_of(rows, namespace)]
        agent = build_agent(stores, settings)
        # no timer: under valgrind's slowness the 5 s interval would fall anywhere
        pipeline = Pipeline(agent, "bench", interval_s=1e9)
        attribution = AttributionAgent(redis, DynamoCounters(stores.dynamodb, settings), settings)
        archive: ArchiveBuffer[int] = ArchiveBuffer.of(S3ArchiveSink(stores.s3, settings), settings)

        async def stretch(records: Sequence[bytes]) -> None:
            for start in range(0, len(records), batch):
                chunk = records[start : start + batch]
                await pipeline.submit(chunk)
                if mode == "worker":
                    await attribution.process(chunk, "bench")
                    archive.add((value, n) for n, value in enumerate(chunk))
                    if archive.full:
                        await flush_until_done(archive)
            if mode == "worker":
                await flush_until_done(archive)
            await pipeline.drain()

        await stretch(raw[:warm])
        measured = raw[warm : warm + count]
        if profile is not None:
            profiler = cProfile.Profile()
            profiler.enable()
            await stretch(measured)
            profiler.disable()
            profiler.dump_stats(profile)
            print(f"DONE {len(measured)}", flush=True)
            return
        print(f"READY {len(measured)}", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        await stretch(measured)
        print(f"DONE {len(measured)}", flush=True)
        await asyncio.to_thread(sys.stdin.readline)


def _inner_argv(mode: str, events: int, warm: int, count: int, batch: int) -> list[str]:
    return [
        sys.executable, "-m", "bench.agents", "--agent-inner", mode, "--events", str(events),
        "--order", ORDER, "--instructions-warm", str(warm), "--instructions-events",
        str(count), "--batch", str(batch),
    ]  # fmt: skip


def agent_instructions(
    settings: Settings,
    mode: str,
    events: int,
    warm: int,
    count: int,
    batch: int,
    run: int,
    keep: Path | None = None,
) -> float:
    """The agent process's instructions per event (``mode``: `AGENT_MODES`) under
    callgrind, for the ``count`` events after ``warm`` (see `_agent_inner`)."""
    valgrind = shutil.which("valgrind")
    control = shutil.which("callgrind_control")
    if valgrind is None or control is None:
        raise SystemExit("`--only agent-instructions` needs valgrind: apt-get install valgrind")
    env = _agent_env(settings, f"ai{mode[0]}{run}")
    with tempfile.TemporaryDirectory(prefix="recstream-agent-cost-") as tmp:
        out = Path(tmp) / "callgrind.out"
        process = subprocess.Popen(
            [valgrind, "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
             *_inner_argv(mode, events, warm, count, batch)],
            cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        assert process.stdin is not None
        assert process.stdout is not None
        try:

            def step(word: str) -> int:
                for line in process.stdout:  # type: ignore[union-attr]
                    if line.startswith(word):
                        return int(line.split()[1])
                raise SystemExit(f"the agent under valgrind stopped before {word} ({mode})")

            def callgrind(switch: str) -> None:
                subprocess.run(
                    [control, "-i", switch, str(process.pid)], check=True, capture_output=True
                )

            measured = step("READY")
            callgrind("on")
            process.stdin.write("\n")
            process.stdin.flush()
            step("DONE")
            callgrind("off")
            process.stdin.write("\n")
            process.stdin.flush()
            process.wait(600)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        totals = [
            int(line.split()[1])
            for line in out.read_text().splitlines()
            if line.startswith(("totals:", "summary:"))
        ]
        if keep is not None:
            shutil.copyfile(out, keep.with_suffix(f".{mode}.{run}"))
    return max(totals) / max(measured, 1)


def agent_profile(
    settings: Settings, mode: str, events: int, warm: int, count: int, batch: int, path: Path
) -> None:
    """The same events under cProfile (no valgrind); prints where the time goes."""
    subprocess.run(
        [*_inner_argv(mode, events, warm, count, batch), "--agent-profile", str(path)],
        cwd=ROOT, env=_agent_env(settings, f"ap{mode[0]}"), check=True,
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    stats = pstats.Stats(str(path))
    stats.sort_stats("tottime").print_stats(30)
    stats.sort_stats("cumulative").print_stats(50)


async def dedup_designs(settings: Settings, rows: Sequence[list[str]], batch: int) -> None:
    """One composed script vs one script and seen set per part (separate Redis dbs)."""
    base = settings.redis_url.rsplit("/", 1)[0]
    results: list[tuple[str, float, float]] = []
    for label, layout in (
        ("composed: one script, one seen set", [(0, None)]),
        ("separate: a script and seen set per part", [(1, "w"), (2, "f"), (3, "r")]),
    ):
        clients = [aioredis.from_url(f"{base}/{db}") for db, _ in layout]
        try:
            stores = []
            for client, (_, part) in zip(clients, layout, strict=True):
                await client.flushdb()
                await prepare(client, "d", rows)
                parts = {
                    "w": WindowsPart(settings),
                    "f": FeaturesPart(settings),
                    "r": TrendingPart(settings),
                }
                chosen = list(parts.values()) if part is None else [parts[part]]
                stores.append(RedisHotStore(client, settings, parts=chosen))  # type: ignore[arg-type]
            events = events_of(rows, "d")
            started = time.perf_counter()
            for start in range(0, len(events), batch):
                chunk = events[start : start + batch]
                # each part's agent would read the catalog itself
                await asyncio.gather(*(s.apply(chunk) for s in stores))
            rate = len(events) / (time.perf_counter() - started)
            actors = sorted({e.actor for e in events})
            seen_bytes = 0
            for client in clients:
                pipe = client.pipeline(transaction=False)
                for actor in actors:
                    pipe.memory_usage(Keys("d").seen(actor))
                seen_bytes += sum(int(x or 0) for x in await pipe.execute())
            results.append((label, rate, seen_bytes / len(actors)))
        finally:
            for client in clients:
                await client.flushdb()
                await client.aclose()
    print(f"\nexactly-once design, Redis part only, {len(rows)} events")
    print(f"{'design':<44}{'events/s':>12}{'seen bytes/user':>18}")
    for label, rate, per_user in results:
        print(f"{label:<44}{rate:>12,.0f}{per_user:>18,.0f}")


async def click_latency(settings: Settings, samples: int) -> None:
    """Kinesis put -> a `recstream agents` worker -> the feature vector changed."""
    env = {
        **os.environ,
        **settings.to_env(),
        "RECSTREAM_POLL_INTERVAL_S": str(settings.poll_interval_s),
        "RECSTREAM_AGENT_BATCH_WINDOW_S": "0.02",
    }
    log = settings.state_dir / "bench-agents.log"
    with log.open("wb") as out:
        worker = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "recstream.cli", "agents",
            env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    kinesis = sync_client(settings, "kinesis")
    redis = aioredis.from_url(settings.redis_url)
    latencies: list[float] = []
    try:
        ns = settings.namespace
        for n in range(samples + 5):
            event = Event(
                event_type="click", user_id="clicker", item_id=f"item{n % 50}", namespace=ns
            )
            before = (await read_user_state(redis, settings, ns, "clicker")).events
            started = time.perf_counter()
            await asyncio.to_thread(
                kinesis.put_record,
                StreamName=settings.stream_name,
                Data=encode(Message(key=b"clicker", value=event.to_json())),
                PartitionKey="clicker",
            )
            # the first clicks wait for the worker to start and take its leases
            deadline = started + (300 if n < 5 else 60)
            while (await read_user_state(redis, settings, ns, "clicker")).events == before:
                if time.perf_counter() > deadline:
                    raise SystemExit(
                        f"no feature change within {deadline - started:.0f} s; see {log}"
                    )
                await asyncio.sleep(0.002)
            if n >= 5:
                latencies.append((time.perf_counter() - started) * 1000)
    finally:
        await redis.aclose()
        worker.terminate()
        await asyncio.wait_for(worker.wait(), 30)
    cut = np.percentile(latencies, [50, 95])
    stats = summarize(latencies)
    print(f"\nclick -> changed feature vector, {len(latencies)} clicks, one worker, moto Kinesis")
    print(f"{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}{'poll interval ms':>20}")
    poll = settings.poll_interval_s * 1000
    print(f"{cut[0]:>10.0f}{cut[1]:>10.0f}{stats['p99']:>10.0f}{poll:>20.0f}")


APPLIED_PROBE = 50
"""Actors whose last event the backlog's poll asks about at once (see `applied`)."""


async def backlog(
    settings: Settings, rows: Sequence[list[str]], copies: int = 4, per_call: int = 100
) -> None:
    """A real `recstream agents` worker (every agent on, the `kinesis://` transport, one
    process holding every shard) working off a backlog: the events (the slice ``copies``
    times over, under other user ids: a run of several seconds) are put on the emulator's
    stream as the API writes them (its `KinesisProducer`, ``per_call`` events a PutRecords
    call, as its group commit carries concurrent requests: with ``event_aggregation``
    one aggregated record per shard and call) while no worker runs; then a worker starts.

    Its start-up (faust, the stores, the leases) is measured first, by a worker that
    applies one event and stops; the backlog's figures are the second worker's, from its
    start to the last event applied, less that start-up's wall time and CPU."""
    ns = f"backlog-{os.getpid()}"
    redis = aioredis.from_url(settings.redis_url)
    await prepare(redis, ns, rows)
    events = events_of(rows, ns, copies)
    env = {**os.environ, **settings.to_env(), "RECSTREAM_NAMESPACE": ns}
    log = settings.state_dir / "bench-agents-backlog.log"
    confirmed = 0

    async def applied(pairs: Sequence[tuple[str, str]]) -> int:
        """How many of ``pairs`` (each actor's last event, in put order) are applied:
        the first ``APPLIED_PROBE`` not yet seen applied at a time. An applied id stays
        applied, and the worker applies a shard in put order, so the probe moves along
        with it; asking for every actor's at each poll (thousands of ZSCOREs, 50 times a
        second) took half a core of the machine being measured (session 15)."""
        nonlocal confirmed
        while confirmed < len(pairs):
            probe = pairs[confirmed : confirmed + APPLIED_PROBE]
            pipe = redis.pipeline(transaction=False)
            for actor, event_id in probe:
                pipe.zscore(Keys(ns).seen(actor), event_id)
            scores = await pipe.execute()
            done = next((n for n, s in enumerate(scores) if s is None), len(probe))
            confirmed += done
            if done < len(probe):
                break
        return confirmed

    async def put(batch: Sequence[Event]) -> None:
        async with KinesisProducer(settings) as producer:
            for start in range(0, len(batch), per_call):
                results = await producer.put_events(batch[start : start + per_call])
                if not all(r.ok for r in results):
                    raise SystemExit(f"putting the backlog failed: {results[0].error}")

    async def work_off(batch: Sequence[Event]) -> tuple[float, float]:
        """A worker started now until every event of ``batch`` is applied (then stopped):
        its wall time and CPU seconds."""
        nonlocal confirmed
        confirmed = 0
        # each actor's last event, in the order they were put
        at = {e.actor: (n, e.event_id) for n, e in enumerate(batch)}
        last = [
            (actor, event_id)
            for actor, (_, event_id) in sorted(at.items(), key=lambda kv: kv[1][0])
        ]
        with log.open("ab") as out:
            began = time.perf_counter()
            worker = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "recstream.cli", "agents",
                env=env, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        try:
            while await applied(last) < len(last):
                if time.perf_counter() > began + 600:
                    raise SystemExit(f"the backlog was not worked off; see {log}")
                await asyncio.sleep(0.02)
            return time.perf_counter() - began, cpu_seconds(worker.pid)
        finally:
            worker.terminate()  # (a graceful stop: its leases are handed over)
            await asyncio.wait_for(worker.wait(), 60)

    try:
        warm = Event(event_type="view", user_id="warm-up", item_id="i1", namespace=ns)
        await put([warm])
        startup_wall, startup_cpu = await work_off([warm])
        await put(events)
        wall, cpu = await work_off(events)
        # the reference, same run: the same Redis writes as plain pipelined commands, on
        # the same events under a namespace of their own
        await prepare(redis, f"{ns}-bare", rows)
        bare = await bare_loop(
            redis, settings, events_of(rows, f"{ns}-bare", copies), settings.agent_batch_size
        )
    finally:
        await redis.aclose()
    wall, cpu = wall - startup_wall, cpu - startup_cpu
    print(
        f"\nbacklog: {len(events)} Taobao events ({ORDER} order) put by the API's producer, "
        f"{per_call} a call (aggregated: {settings.event_aggregation}), one `recstream "
        f"agents` worker (every agent on), its start-up ({startup_wall:.1f} s) left out"
    )
    rate = len(events) / wall
    print(f"{'events/s':>10}{'worker CPU us/ev':>18}{'bare loop events/s':>20}{'ratio':>7}")
    print(f"{rate:>10,.0f}{cpu / len(events) * 1e6:>18.0f}{bare:>20,.0f}{rate / bare:>7.2f}")


async def memory(settings: Settings, rows: Sequence[list[str]], users: int) -> None:
    redis = aioredis.from_url(settings.redis_url)
    try:
        ns = "mem"
        await configure(redis)
        await prepare(redis, ns, rows)
        base_users = len({r[0] for r in rows})
        copies = max(1, users // base_users)
        events = events_of(rows, ns, copies)
        hot = RedisHotStore(
            redis,
            settings,
            parts=(WindowsPart(settings), FeaturesPart(settings), TrendingPart(settings)),
        )
        for start in range(0, len(events), 1000):
            await hot.apply(events[start : start + 1000])
        actors = sorted({e.actor for e in events})
        keys = Keys(ns)
        totals = dict.fromkeys(("win", "seen", "feat", "emb"), 0)
        for family, make in (
            ("win", keys.window),
            ("seen", keys.seen),
            ("feat", keys.features),
            ("emb", keys.embedding),
        ):
            pipe = redis.pipeline(transaction=False)
            for actor in actors:
                pipe.memory_usage(make(actor))
            totals[family] = sum(int(x or 0) for x in await pipe.execute())
        per_user = sum(totals.values()) / len(actors)
        print(
            f"\nRedis memory per active user, {len(actors):,} users, {len(events):,} events "
            f"({len(events) / len(actors):.1f} per user), window {settings.window_size}"
        )
        print(f"{'key':<10}{'bytes/user':>12}{'MB per 100k users':>20}")
        for family, total in totals.items():
            mean = total / len(actors)
            print(f"{family:<10}{mean:>12,.0f}{mean * 1e5 / 2**20:>20,.1f}")
        print(f"{'total':<10}{per_user:>12,.0f}{per_user * 1e5 / 2**20:>20,.1f}")
        # The keys all users share (popularity, buckets, categories, the index): bounded
        # by their caps rather than by users, but their encoding is what
        # zset-max-listpack-entries changes.
        own = {f"rs:{ns}:{family}:" for family in ("win", "seen", "feat", "emb", "item")}
        shared = 0
        async for key in redis.scan_iter(match=f"rs:{ns}:*", count=1000):
            name = key.decode()
            if not any(name.startswith(prefix) for prefix in own) and ":model:" not in name:
                shared += int(await redis.memory_usage(key) or 0)
        print(
            f"shared keys (popularity, trending, categories): {shared / 2**20:,.1f} MB "
            f"for {len(events):,} events"
        )
    finally:
        await redis.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--samples", type=int, default=100, help="clicks timed end to end")
    parser.add_argument("--users", type=int, default=10000, help="active users for memory")
    parser.add_argument("--order", choices=("dataset", "time"), default="dataset")
    parser.add_argument("--instructions-warm", type=int, default=7000)
    parser.add_argument("--instructions-events", type=int, default=3000)
    parser.add_argument(
        "--callgrind-out", type=Path, default=None, help="keep the instructions' callgrind dump"
    )
    parser.add_argument(
        "--agent-modes", default="worker", help=f"agent-instructions: any of {AGENT_MODES}"
    )
    parser.add_argument("--repeat", type=int, default=1, help="agent-instructions runs each")
    parser.add_argument(
        "--agent-profile", type=Path, default=None, help="agent-instructions under cProfile"
    )
    parser.add_argument("--agent-inner", choices=AGENT_MODES, help=argparse.SUPPRESS)
    parser.add_argument(
        "--redis-config",
        default="",
        help="CONFIG SET before the instructions and memory runs, e.g. "
        "zset-max-listpack-entries=0 (an operator's redis.conf choice, measured)",
    )
    parser.add_argument(
        "--only",
        default="throughput,dedup,memory,latency,backlog",
        help="comma-separated sections to run (default: all)",
    )
    args = parser.parse_args()
    global ORDER, REDIS_CONFIG
    ORDER = args.order
    REDIS_CONFIG = dict(pair.split("=", 1) for pair in args.redis_config.split(",") if pair.strip())
    sections = set(args.only.split(","))
    rows = taobao_rows(args.events)
    with tuned_collector(GC_THRESHOLDS):  # as `recstream agents` runs
        _run(args, rows, sections)


def _run(args: argparse.Namespace, rows: list[Any], sections: set[str]) -> None:
    if args.agent_inner:
        profile = str(args.agent_profile) if args.agent_profile is not None else None
        inner = _agent_inner(
            args.agent_inner,
            rows,
            args.instructions_warm,
            args.instructions_events,
            args.batch,
            profile,
        )
        # the worker's loop (streams/kinesis/app.py `run_in_process`)
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(inner)
        return
    with local_settings(namespace="bench", poll_interval_s=0.05) as settings:
        if "throughput" in sections:
            asyncio.run(throughput(settings, rows, args.batch))
        if "commands" in sections:
            asyncio.run(commands(settings, rows, args.batch))
        if "instructions" in sections:
            instructions(
                settings,
                rows,
                args.instructions_warm,
                args.instructions_events,
                args.callgrind_out,
            )
        if "agent-instructions" in sections:
            modes = [m for m in args.agent_modes.split(",") if m]
            # (settings, mode, events, warm, measured, batch): the same run, profiled or counted
            jobs = [
                (settings, mode, args.events, args.instructions_warm, args.instructions_events,
                 args.batch)
                for mode in modes
            ]  # fmt: skip
            if args.agent_profile is not None:
                for run_args in jobs:
                    agent_profile(*run_args, args.agent_profile.with_suffix(f".{run_args[1]}"))
            else:
                counts = {
                    run_args[1]: [
                        agent_instructions(*run_args, run, args.callgrind_out)
                        for run in range(args.repeat)
                    ]
                    for run_args in jobs
                }
                print(
                    f"\nagent process instructions per event, {args.instructions_events} Taobao "
                    f"events ({ORDER} order) after {args.instructions_warm}, batches of "
                    f"{args.batch}"
                )
                for mode, runs in counts.items():
                    print(f"  {mode:<10}" + ", ".join(f"{c / 1e3:.1f}k" for c in runs))
        if "dedup" in sections:
            asyncio.run(dedup_designs(settings, rows, args.batch))
        if "memory" in sections:
            asyncio.run(memory(settings, rows, args.users))
        if "latency" in sections and args.samples:
            asyncio.run(click_latency(settings, args.samples))
        if "backlog" in sections:
            asyncio.run(backlog(settings, rows))


if __name__ == "__main__":
    main()
