"""Collector throughput: events/s through POST /v1/events, against a direct PutRecords
producer on the same emulator in the same run (the reference).

    python -m bench.collector [--events 20000] [--batch 500] [--kinesis-mock]
"""

from __future__ import annotations

import argparse
import asyncio
import time

import httpx
from rich.console import Console
from rich.table import Table

from bench.common import local_settings, start_api, summarize, wait_http
from recstream import stack
from streams.producer import KinesisProducer
from streams.schema import Event


def payloads(n: int, tag: str) -> list[dict[str, object]]:
    return [
        {
            "event_id": f"{tag}-{i}",
            "event_type": "view",
            "user_id": f"u{i % 997}",
            "item_id": f"i{i % 5003}",
        }
        for i in range(n)
    ]


async def via_http(
    url: str, events: list[dict[str, object]], batch: int
) -> tuple[float, list[float]]:
    latencies: list[float] = []
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        started = time.perf_counter()
        for start in range(0, len(events), batch):
            t = time.perf_counter()
            response = await client.post("/v1/events", json=events[start : start + batch])
            latencies.append((time.perf_counter() - t) * 1000)
            assert response.status_code == 202, response.text
        return len(events) / (time.perf_counter() - started), latencies


async def direct(
    producer: KinesisProducer, events: list[Event], batch: int
) -> tuple[float, list[float]]:
    latencies: list[float] = []
    started = time.perf_counter()
    for start in range(0, len(events), batch):
        t = time.perf_counter()
        results = await producer.put_events(events[start : start + batch])
        latencies.append((time.perf_counter() - t) * 1000)
        assert all(r.ok for r in results)
    return len(events) / (time.perf_counter() - started), latencies


async def main_async(args: argparse.Namespace) -> None:
    with local_settings(kinesis_mock=args.kinesis_mock) as settings:
        raw = payloads(args.events, "direct")
        events = [Event.model_validate(p) for p in raw]
        async with KinesisProducer(settings) as producer:
            ref_rate, ref_lat = await direct(producer, events, args.batch)
        port = stack.free_port()
        server = start_api(settings, port)
        try:
            url = f"http://127.0.0.1:{port}"
            await wait_http(url, server)
            rate, lat = await via_http(url, payloads(args.events, "http"), args.batch)
        finally:
            server.terminate()
            server.wait(10)
    engine = "kinesis-mock" if args.kinesis_mock else "moto"
    table = Table(
        title=f"collector throughput, {args.events} events in batches of {args.batch}, {engine}"
    )
    for column in ("path", "events/s", "batch p50 ms", "batch p99 ms", "ratio"):
        table.add_column(column, justify="right")
    r, h = summarize(ref_lat), summarize(lat)
    table.add_row(
        "PutRecords direct (reference)",
        f"{ref_rate:,.0f}",
        f"{r['p50']:.1f}",
        f"{r['p99']:.1f}",
        "1.00",
    )
    table.add_row(
        "POST /v1/events",
        f"{rate:,.0f}",
        f"{h['p50']:.1f}",
        f"{h['p99']:.1f}",
        f"{rate / ref_rate:.2f}",
    )
    Console().print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--kinesis-mock", action="store_true", help="Kinesis on kinesis-mock")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
