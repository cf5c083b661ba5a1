"""Ranking latency over HTTP, with MovieLens windows and popularity loaded in Redis.

    python -m bench.serving [--requests 5000] [--concurrency 8]

Reference, measured in the same run: the API's /healthz (HTTP + one Redis PING), so the
ratio shows what ranking adds on top of the HTTP round trip. Prints one table.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import random
import time
from pathlib import Path

import httpx
import redis.asyncio as aioredis
from rich.console import Console
from rich.table import Table

from agents.state import RedisHotStore
from bench.common import local_settings, start_api, summarize, wait_http
from recstream import stack
from streams.schema import Event

ROOT = Path(__file__).resolve().parent.parent


def movielens(limit: int) -> list[Event]:
    with (ROOT / "data" / "movielens-small" / "ratings.csv").open(newline="") as handle:
        rows = sorted(csv.DictReader(handle), key=lambda r: int(r["timestamp"]))[-limit:]
    return [
        Event(
            event_id=f"ml-{r['userId']}-{r['movieId']}",
            event_type="like" if float(r["rating"]) >= 4 else "view",
            user_id=r["userId"],
            item_id=r["movieId"],
            timestamp=int(r["timestamp"]),
        )
        for r in rows
    ]


async def hammer(url: str, paths: list[str], concurrency: int) -> tuple[list[float], float]:
    latencies: list[float] = []
    queue: asyncio.Queue[str] = asyncio.Queue()
    for path in paths:
        queue.put_nowait(path)

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            path = queue.get_nowait()
            started = time.perf_counter()
            response = await client.get(path)
            latencies.append((time.perf_counter() - started) * 1000)
            response.raise_for_status()

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
        await client.get(paths[0])  # warm the connection pool
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return latencies, len(paths) / elapsed


async def server_side(url: str, paths: list[str]) -> list[float]:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        return [float((await client.get(path)).json()["took_ms"]) for path in paths]


async def main_async(args: argparse.Namespace) -> None:
    console = Console()
    with local_settings() as settings:
        events = movielens(args.events)
        client = aioredis.from_url(settings.redis_url)
        store = RedisHotStore(client, settings)
        for start in range(0, len(events), 1000):
            await store.apply(events[start : start + 1000])
        await client.aclose()
        users = sorted({e.user_id for e in events if e.user_id})
        rng = random.Random(7)
        paths = [
            f"/v1/recommendations?user_id={rng.choice([*users, 'new-visitor'])}&num_results=20"
            for _ in range(args.requests)
        ]
        port = stack.free_port()
        # The API runs in its own process, as in production, so the load generator does
        # not share its interpreter.
        server = start_api(settings, port)
        try:
            url = f"http://127.0.0.1:{port}"
            await wait_http(url, server)
            ref, ref_rps = await hammer(url, ["/healthz"] * args.requests, args.concurrency)
            rank, rank_rps = await hammer(url, paths, args.concurrency)
            took = await server_side(url, paths[: min(len(paths), 2000)])
        finally:
            server.terminate()
            server.wait(10)
    table = Table(
        title=f"ranking over HTTP, {len(events)} MovieLens events in Redis, "
        f"concurrency {args.concurrency}"
    )
    for column in ("endpoint", "requests", "p50 ms", "p99 ms", "req/s", "p50 ratio"):
        table.add_column(column, justify="right")
    r, k = summarize(ref), summarize(rank)
    table.add_row(
        "/healthz (reference)",
        str(len(ref)),
        f"{r['p50']:.2f}",
        f"{r['p99']:.2f}",
        f"{ref_rps:,.0f}",
        "1.00",
    )
    table.add_row(
        "/v1/recommendations",
        str(len(rank)),
        f"{k['p50']:.2f}",
        f"{k['p99']:.2f}",
        f"{rank_rps:,.0f}",
        f"{k['p50'] / r['p50']:.2f}",
    )
    console.print(table)
    t = summarize(took)
    console.print(
        f"server-side ranking time (took_ms, sequential requests): p50 {t['p50']:.2f} ms, "
        f"p99 {t['p99']:.2f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--events", type=int, default=50_000)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
