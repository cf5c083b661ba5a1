"""Archive agent throughput: raw records → parsed, buffered, gzip'd and PUT to S3 (moto),
against a bare loop that PUTs the same records, already gzip'd, in the same run.

    python -m bench.archive [--events 100000] [--batch 500] [--flush-mb 5]

It drives the agent's own `ArchiveBuffer` + `S3ArchiveSink` (what the faust agent runs per
batch), without faust, so the figure is the archive's cost, not the transport's. It also
prints the objects a flush writes and the objects per hour that follow from the flush
policy at the measured record size.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import time

from rich.console import Console
from rich.table import Table

from agents.archive import ArchiveBuffer, S3ArchiveSink
from bench.common import local_settings, summarize
from recstream.aws import async_client
from recstream.settings import Settings
from streams.schema import Event


def records(n: int) -> list[bytes]:
    now = time.time()
    return [
        Event(
            event_id=f"e{i}",
            event_type="view" if i % 9 else "purchase",
            user_id=f"u{i % 997}",
            session_id=f"s{i % 3001}",
            item_id=f"i{i % 5003}",
            timestamp=now - 1800 + i * 0.01,
            context={"device": "mobile"},
        ).to_json()
        for i in range(n)
    ]


class CountingSink(S3ArchiveSink):
    puts = 0

    async def put(self, key: str, body: bytes) -> None:
        await super().put(key, body)
        self.puts += 1


async def through_agent(
    settings: Settings, raw: list[bytes], batch: int
) -> tuple[float, list[float], int]:
    flush_ms: list[float] = []
    async with async_client(settings, "s3") as s3:
        sink = CountingSink(s3, settings)
        buffer: ArchiveBuffer[int] = ArchiveBuffer.of(sink, settings)
        started = time.perf_counter()
        for start in range(0, len(raw), batch):
            buffer.add((r, 0) for r in raw[start : start + batch])
            if buffer.full:
                t = time.perf_counter()
                await buffer.flush()
                flush_ms.append((time.perf_counter() - t) * 1000)
        if buffer.pending:
            t = time.perf_counter()
            await buffer.flush()
            flush_ms.append((time.perf_counter() - t) * 1000)
        return len(raw) / (time.perf_counter() - started), flush_ms, sink.puts


async def bare_loop(settings: Settings, raw: list[bytes], flush_bytes: int) -> float:
    """Reference: the same bytes cut at the same size, compressed and PUT, no parsing."""
    chunks: list[list[bytes]] = [[]]
    size = 0
    for r in raw:
        chunks[-1].append(r)
        size += len(r) + 1
        if size >= flush_bytes:
            chunks.append([])
            size = 0
    async with async_client(settings, "s3") as s3:
        started = time.perf_counter()
        for n, chunk in enumerate(c for c in chunks if c):
            body = gzip.compress(b"".join(r + b"\n" for r in chunk), compresslevel=6, mtime=0)
            await s3.put_object(Bucket=settings.bucket, Key=f"bare/{n}.jsonl.gz", Body=body)
        return len(raw) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=500, help="records per faust batch")
    parser.add_argument("--flush-mb", type=float, default=5.0)
    args = parser.parse_args()
    flush_bytes = int(args.flush_mb * 1024 * 1024)
    raw = records(args.events)
    mean_size = sum(len(r) + 1 for r in raw) / len(raw)
    with local_settings(archive_flush_bytes=flush_bytes) as settings:
        reference = asyncio.run(bare_loop(settings, raw, flush_bytes))
        rate, flush_ms, objects = asyncio.run(through_agent(settings, raw, args.batch))
    stats = summarize(flush_ms) if len(flush_ms) > 1 else {"p50": flush_ms[0], "p99": flush_ms[0]}
    table = Table(title=f"archive: {args.events:,} events, {mean_size:.0f} B each, flush at "
                  f"{args.flush_mb} MB / {settings.archive_flush_s:.0f} s")  # fmt: skip
    for column in ("path", "events/s", "flush p50 ms", "flush p99 ms", "objects", "ratio"):
        table.add_column(column, justify="right")
    table.add_row("bare gzip+PUT loop", f"{reference:,.0f}", "-", "-", "-", "1.00")
    table.add_row(
        "ArchiveBuffer → S3",
        f"{rate:,.0f}",
        f"{stats['p50']:.0f}",
        f"{stats['p99']:.0f}",
        str(objects),
        f"{rate / reference:.2f}",
    )
    Console().print(table)
    # Objects per hour per worker and namespace: one per age flush at low rates, one per
    # size flush at high ones (plus one more whenever a flush spans an hour boundary).
    for rate_per_s in (10, 1_000, 10_000):
        by_size = rate_per_s * mean_size * 3600 / flush_bytes
        per_hour = max(3600 / settings.archive_flush_s, by_size)
        print(f"at {rate_per_s:>6,} events/s: ~{per_hour:,.0f} objects/hour")


if __name__ == "__main__":
    main()
