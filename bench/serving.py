"""Serving latency under open-loop load, MovieLens in real Redis, item-to-item published.

    python -m bench.serving [--rates 500,1000,2000] [--duration 10] [--events 0]
        [--loop auto] [--http auto] [--parser auto] [--variants] [--json out.json]
        [--answer-cache both|on|off] [--event-rate 0]

Set-up: a private redis-server and moto server; every MovieLens rating applied to the
live state through the agents' Redis store (``like`` for 4+ stars, else ``view``);
item-to-item fitted on MovieLens and published through training's real publish path
(S3 + versioned Redis records + pointer switch).

Two endpoints run in their own processes (bench/serve_app.py), with the same uvicorn
options: the app `serving.app.create_app` builds, and the reference, a bare ASGI endpoint
making the same Redis round trips with no framework and no ranking. For each rate a
separate load-generator process (bench/loadgen.py) sends ``GET /v1/recommendations``
open-loop; latency counts from each request's due time. Each endpoint is warmed first
(``--warmup`` seconds at 200 req/s: its in-process caches), then for 2 s at each rate
before that rate is measured: its steady state, not the step to it. Printed per
endpoint and rate: achieved throughput, p50, p99, p99.9 (of the answered requests),
errors (failed or non-2xx), requests still unanswered 10 s after sending stopped, Redis
commands per request (INFO commandstats, which counts the commands run inside Lua
scripts too), the server process's CPU milliseconds per answered request (robust to
other load on a shared machine), and the p99 ratio real / bare.

The real app runs twice by default (``--answer-cache both``): as configured (``real``:
the answer cache on, serving/pipeline/memo.py), and with the answer cache off
(``real, computed``: every answer computed), so the cost of computing an answer stays
measured beside the cost of serving one again. ``--event-rate R`` applies R new MovieLens
events a second to the requested users' live state while each rate is measured (through
the agents' Redis store, as the agents would), so answers go stale the way live traffic
makes them: each applied event changes that user's next answer.

``--variants`` repeats the run for each server configuration, one part added at a time:
pure-Python Redis parser + asyncio + h11, then hiredis, then uvloop, then httptools.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import redis.asyncio as aioredis
from rich.console import Console
from rich.table import Table

from agents.features import FeaturesPart
from agents.state import RedisHotStore, WindowsPart
from agents.trending import TrendingPart, materialize
from bench.common import cpu_seconds, local_settings, wait_http
from recstream import stack
from recstream.catalog_cli import load as load_catalog
from recstream.catalog_cli import read_movielens
from recstream.settings import Settings
from streams.schema import Event
from training.data import load_movielens
from training.models import ItemToItem
from training.publish import DataRange, RunInfo, open_registry

ROOT = Path(__file__).resolve().parent.parent
RATINGS = ROOT / "data" / "movielens-small" / "ratings.csv"
DAY_S = 86_400.0
STEP_S = 300.0


@dataclass(frozen=True)
class Variant:
    name: str
    loop: str
    http: str
    parser: str
    workers: int = 1


VARIANTS = [
    Variant("asyncio + h11 + Python RESP parser", "asyncio", "h11", "python"),
    Variant("+ hiredis", "asyncio", "h11", "auto"),
    Variant("+ uvloop", "uvloop", "h11", "auto"),
    Variant("+ httptools (= recstream serve)", "uvloop", "httptools", "auto"),
    Variant("+ 2 workers (recstream serve --workers 2)", "auto", "auto", "auto", workers=2),
]


def movielens(limit: int) -> list[Event]:
    """The ratings as events of a live site's last day: in their order, spread evenly
    over the 24 hours before the call (its time rounded down to the trend's 300 s step,
    so two runs file the events into the same buckets: with the step's boundaries
    falling anywhere, `bench.request_cost`'s count of the same code moved by ~3 %).
    With their own times (1996-2018) the agents file them as history only: no decayed
    popularity, no trend and no per-category list exists, so the bench measured requests
    whose trending and category sources had nothing to do, which a live deployment's
    never are."""
    with RATINGS.open(newline="") as handle:
        rows = sorted(csv.DictReader(handle), key=lambda r: int(r["timestamp"]))
    rows = rows[-limit:] if limit else rows
    start = time.time() // STEP_S * STEP_S - DAY_S
    step = DAY_S / max(1, len(rows))
    return [
        Event(
            event_id=f"ml-{r['userId']}-{r['movieId']}",
            event_type="like" if float(r["rating"]) >= 4 else "view",
            user_id=r["userId"],
            item_id=r["movieId"],
            timestamp=start + n * step,
        )
        for n, r in enumerate(rows)
    ]


async def load_state(settings: Settings, events: list[Event]) -> None:
    # the catalog first (titles and genres), as in a real deployment: answers carry
    # metadata, and the agents file each event under its item's genre, so the
    # per-category popularity lists that category popularity reads are there
    await load_catalog(
        settings, settings.namespace, read_movielens(RATINGS.with_name("movies.csv")), []
    )
    # ... and through every part the agents run (windows, feature vectors, popularity
    # and trending, per category too), then one tick of the trend materializer: the state
    # a live deployment's requests read. (With the windows alone, the features, the
    # decayed popularity, the trend lists and the per-category lists were all absent,
    # and those sources had nothing to do.)
    client = aioredis.from_url(settings.redis_url)
    parts = (WindowsPart(settings), FeaturesPart(settings), TrendingPart(settings))
    store = RedisHotStore(client, settings, parts=parts)
    for start in range(0, len(events), 1000):
        await store.apply(events[start : start + 1000])
    await materialize(client, settings, settings.namespace, lock=False)
    await client.aclose()
    log = load_movielens(RATINGS)
    model = ItemToItem().fit(log)
    run = RunInfo(data=DataRange(source="movielens", start=log.start, end=log.end, rows=len(log)))
    async with open_registry(settings) as registry:
        await registry.publish(model, run)


def answer_cache_counts(url: str) -> tuple[float, float]:
    """The app's answer-cache (hits, misses) so far, from its /metrics (every worker's);
    (0, 0) for the bare endpoint, which has none."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    counts = {"hit": 0.0, "miss": 0.0}
    for line in text.splitlines():
        if line.startswith("recstream_answer_cache_total{"):
            for result in counts:
                if f'result="{result}"' in line:
                    counts[result] += float(line.rsplit(" ", 1)[1])
    return counts["hit"], counts["miss"]


async def redis_calls(settings: Settings) -> tuple[int, int]:
    """Commands Redis ran, and connections it accepted, so far."""
    client = aioredis.from_url(settings.redis_url)
    try:
        stats = await client.info("commandstats")
        accepted = int((await client.info("stats"))["total_connections_received"])
    finally:
        await client.aclose()
    return sum(int(v["calls"]) for k, v in stats.items() if k.startswith("cmdstat_")), accepted


ENDPOINTS = {
    # endpoint → (serve_app's --app, settings it changes)
    "bare": ("bare", {}),
    "real": ("real", {}),
    "real, computed": ("real", {"RECSTREAM_ANSWER_CACHE_TTL_S": "0"}),
}


def start_server(
    settings: Settings, app: str, port: int, variant: Variant, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "bench.serve_app", "--app", app, "--port", str(port),
         "--event-loop", variant.loop, "--http", variant.http, "--parser", variant.parser,
         "--workers", str(variant.workers)],
        env={**os.environ, **settings.to_env(), **(env or {})}, cwd=ROOT,
    )  # fmt: skip


async def apply_events(
    settings: Settings, users: list[str], items: list[str], rate: float, stop: asyncio.Event
) -> int:
    """New events for random ``users`` at ``rate`` a second until ``stop``, applied to the
    live state in batches every 50 ms, as the agents apply theirs."""
    client = aioredis.from_url(settings.redis_url)
    store = RedisHotStore(client, settings)
    rng = random.Random(11)
    applied = 0
    started = time.perf_counter()
    try:
        while not stop.is_set():
            await asyncio.sleep(0.05)
            due = int(rate * (time.perf_counter() - started)) - applied
            batch = [
                Event(
                    event_type="view", user_id=rng.choice(users), item_id=rng.choice(items),
                    timestamp=int(time.time()),
                )
                for _ in range(max(0, due))
            ]  # fmt: skip
            if batch:
                await store.apply(batch)
                applied += len(batch)
    finally:
        await client.aclose()
    return applied


def load(url: str, paths: Path, rate: float, duration: float, out: Path) -> dict[str, Any]:
    subprocess.run(
        [sys.executable, "-m", "bench.loadgen", "--url", url, "--paths", str(paths),
         "--rate", str(rate), "--duration", str(duration), "--out", str(out)],
        check=True, cwd=ROOT,
    )  # fmt: skip
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def percentiles(samples: list[float]) -> tuple[float, float, float]:
    if not samples:
        return (float("nan"),) * 3
    p50, p99, p999 = np.percentile(np.asarray(samples), [50, 99, 99.9])
    return float(p50), float(p99), float(p999)


WARM_AT_RATE_S = 2.0
"""Seconds at the measured rate before each measurement."""


async def measure(
    settings: Settings, variant: Variant, rates: list[float], args: argparse.Namespace,
    paths: Path, work: Path, users: list[str], items: list[str],
) -> list[dict[str, Any]]:  # fmt: skip
    rows: list[dict[str, Any]] = []
    servers = {}
    endpoints = {
        "both": ["bare", "real", "real, computed"],
        "on": ["bare", "real"],
        "off": ["bare", "real, computed"],
    }[args.answer_cache]
    try:
        for app in endpoints:
            port = stack.free_port()
            kind, env = ENDPOINTS[app]
            servers[app] = (port, start_server(settings, kind, port, variant, env))
        for port, server in servers.values():
            await wait_http(f"http://127.0.0.1:{port}", server)
        for port, _ in servers.values():
            # Steady state is what is measured: the catalog's and the neighbour rows'
            # in-process caches fill over the first few thousand requests (cold, a request
            # cost twice the CPU), as they do once in a deployment's life.
            if args.warmup > 0:
                load(f"http://127.0.0.1:{port}", paths, 200.0, args.warmup, work / "warm.json")
        for rate in rates:
            for app, (port, _) in servers.items():
                url = f"http://127.0.0.1:{port}"
                # A short warm-up at the same rate, so what is measured is that rate's
                # steady state: the step from the warm-up's 200 req/s to 1,000 held most
                # of the run's slow requests in its first 0.4 s (the server's Redis pool
                # grew from 1 to 40 connections meanwhile; docs/serving-speed.md,
                # session 13).
                load(url, paths, rate, WARM_AT_RATE_S, work / "warm.json")
                before = await redis_calls(settings)
                real = ENDPOINTS[app][0] == "real"
                cache_before = answer_cache_counts(url) if real else (0.0, 0.0)
                cpu_before = cpu_seconds(servers[app][1].pid)
                spy = None
                if args.profile and ENDPOINTS[app][0] == "real":
                    # Sample the server under load: where its time goes (docs/serving-speed.md).
                    out = args.profile.with_name(
                        f"{args.profile.stem}-{variant.loop}-{variant.http}-{variant.parser}-"
                        f"{rate:.0f}-{app.replace(', ', '-')}.txt"
                    )
                    spy = subprocess.Popen(  # noqa: ASYNC220 (nothing else runs on this loop)
                        [str(Path(sys.executable).with_name("py-spy")), "record", "--pid",
                         str(servers[app][1].pid), "--duration", str(int(args.duration)),
                         "--format", "raw", "--rate", "250", "--nonblocking", "--subprocesses",
                         "--output", str(out)],
                        stdout=subprocess.DEVNULL,
                    )  # fmt: skip
                stop = asyncio.Event()
                writer = asyncio.ensure_future(
                    apply_events(settings, users, items, args.event_rate, stop)
                    if args.event_rate > 0
                    else asyncio.sleep(0, 0)
                )
                measured = work / f"{app}-{rate}.json"
                result = await asyncio.to_thread(load, url, paths, rate, args.duration, measured)
                if args.keep:
                    args.keep.mkdir(parents=True, exist_ok=True)
                    name = f"{variant.name}-{app.replace(', ', '-')}-{rate:.0f}.json"
                    shutil.copyfile(measured, args.keep / name)
                stop.set()
                applied = await writer
                if spy is not None:
                    spy.wait(60)
                cpu = cpu_seconds(servers[app][1].pid) - cpu_before
                after = await redis_calls(settings)
                hits, misses = (
                    np.subtract(answer_cache_counts(url), cache_before) if real else (0.0, 0.0)
                )
                p50, p99, p999 = percentiles(result["latencies_ms"])
                bad = sum(n for s, n in result["statuses"].items() if not s.startswith("2"))
                rows.append({
                    "variant": variant.name, "endpoint": app, "rate": rate,
                    "achieved_rps": result["achieved_rps"], "completed": result["completed"],
                    "p50_ms": p50, "p99_ms": p99, "p999_ms": p999,
                    "errors": result["error_count"] + bad, "timed_out": result["timed_out"],
                    # INFO itself and our own reads count a few calls; negligible per request
                    "redis_per_request": (after[0] - before[0]) / max(1, result["completed"]),
                    # a pool that keeps its connections opens few; churn shows here
                    "redis_connections": after[1] - before[1],
                    "cpu_ms_per_request": 1000 * cpu / max(1, result["completed"]),
                    "events_applied": applied,
                    # share of answers served again from the answer cache (memo.py)
                    "answer_cache_hits": float(hits / (hits + misses)) if hits + misses else None,
                })  # fmt: skip
    finally:
        for _, server in servers.values():
            server.terminate()
            server.wait(10)
    return rows


def print_table(console: Console, rows: list[dict[str, Any]], title: str) -> None:
    table = Table(title=title)
    columns = ("variant", "endpoint", "rate", "achieved req/s", "p50 ms", "p99 ms", "p99.9 ms",
               "errors", "timed out", "Redis cmds/req", "new Redis conns",
               "server CPU ms/req", "answer cache hits", "p99 real/bare")  # fmt: skip
    for column in columns:
        table.add_column(column, justify="right")
    bare = {(r["variant"], r["rate"]): r for r in rows if r["endpoint"] == "bare"}
    for r in rows:
        ratio = ""
        if r["endpoint"] != "bare":
            ref = bare[(r["variant"], r["rate"])]
            ratio = f"{r['p99_ms'] / ref['p99_ms']:.2f}"
        table.add_row(
            r["variant"], r["endpoint"], f"{r['rate']:,.0f}", f"{r['achieved_rps']:,.0f}",
            f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}", f"{r['p999_ms']:.2f}",
            str(r["errors"]), str(r["timed_out"]), f"{r['redis_per_request']:.2f}",
            str(r.get("redis_connections", "")), f"{r['cpu_ms_per_request']:.2f}",
            "" if r.get("answer_cache_hits") is None else f"{r['answer_cache_hits']:.0%}", ratio,
        )  # fmt: skip
    console.print(table)


async def main_async(args: argparse.Namespace) -> None:
    console = Console()
    rates = [float(r) for r in args.rates.split(",")]
    given = Variant("as given", args.loop, args.http, args.parser, args.workers)
    variants = VARIANTS if args.variants else [given]
    if importlib.util.find_spec("hiredis") is None:
        console.print("[yellow]hiredis is not installed: 'auto' parser is the Python one")
    with local_settings() as settings, tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        events = movielens(args.events)
        started = time.perf_counter()
        await load_state(settings, events)
        console.print(
            f"loaded {len(events):,} MovieLens events and the catalog, published item2item "
            f"in {time.perf_counter() - started:.1f} s"
        )
        users = sorted({e.user_id for e in events if e.user_id})
        items = sorted({e.item_id for e in events if e.item_id})
        rng = random.Random(7)
        paths = work / "paths.txt"
        paths.write_text(
            "\n".join(
                f"/v1/recommendations?user_id={rng.choice(users)}&num_results=20"
                for _ in range(20_000)
            )
        )
        rows: list[dict[str, Any]] = []
        for variant in variants:
            rows += await measure(settings, variant, rates, args, paths, work, users, items)
    print_table(
        console, rows,
        f"GET /v1/recommendations, open loop, {args.duration:.0f} s per rate, "
        f"{len(events):,} MovieLens events in Redis, item2item published, "
        f"{args.event_rate:,.0f} new events/s applied while measuring",
    )  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rates", default="500,1000,2000")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per rate")
    parser.add_argument(
        "--warmup", type=float, default=15.0, help="seconds at 200 req/s before measuring"
    )
    parser.add_argument("--events", type=int, default=0, help="newest N ratings; 0 = all")
    parser.add_argument("--loop", default="auto", choices=["auto", "asyncio", "uvloop"])
    parser.add_argument("--http", default="auto", choices=["auto", "h11", "httptools"])
    parser.add_argument("--parser", default="auto", choices=["auto", "python"])
    parser.add_argument("--workers", type=int, default=1, help="API processes per endpoint")
    parser.add_argument("--variants", action="store_true", help="measure each part in turn")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument(
        "--answer-cache", default="both", choices=["both", "on", "off"],
        help="run the real app with its answer cache on, off, or both side by side",
    )  # fmt: skip
    parser.add_argument(
        "--event-rate", type=float, default=0.0,
        help="new events a second applied to the requested users while measuring",
    )  # fmt: skip
    parser.add_argument(
        "--profile", type=Path, help="py-spy the app under load; collapsed stacks to PATH-*.txt"
    )
    parser.add_argument(
        "--keep", type=Path,
        help="keep each measurement's load-generator output (every latency with its due "
        "time) in this directory",
    )  # fmt: skip
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
