"""An open-loop HTTP load generator, run as its own process by bench/serving.py.

    python -m bench.loadgen --url http://127.0.0.1:8000 --paths paths.txt --rate 1000 \
        --duration 10 --out result.json

Requests leave at a fixed rate whatever the server does (open loop): request ``i`` is due
at ``start + i / rate``, and its latency is measured from that due time, so time spent
queueing for a free connection counts (no coordinated omission). A closed-loop client
would slow down with the server and hide exactly the queueing this measures.

The client is a minimal HTTP/1.1 keep-alive client on asyncio streams (uvloop when
installed): general clients cost several times more CPU per request, and on a 2-core
machine the load generator must not be what saturates.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from urllib.parse import urlsplit

__all__ = ["main"]


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def get(self, request: bytes) -> int:
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        lower = head.lower()
        at = lower.find(b"content-length:")
        if at < 0:
            raise RuntimeError("response without content-length; the bench expects one")
        length = int(lower[at + 15 : lower.find(b"\r\n", at)])
        await self.reader.readexactly(length)
        return status

    def close(self) -> None:
        self.writer.close()


async def run(
    url: str, paths: list[str], rate: float, duration: float, connections: int, drain: float
) -> dict[str, object]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    requests = [f"GET {p} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode() for p in paths]
    idle: asyncio.Queue[Connection] = asyncio.Queue()
    opened = 0
    latencies: list[float] = []
    dues: list[float] = []
    statuses: dict[int, int] = {}
    errors: list[str] = []

    async def acquire() -> Connection:
        nonlocal opened
        if idle.empty() and opened < connections:
            opened += 1
            reader, writer = await asyncio.open_connection(host, port)
            return Connection(reader, writer)
        return await idle.get()

    async def one(request: bytes, due: float) -> None:
        nonlocal opened
        conn = await acquire()
        try:
            status = await conn.get(request)
        except Exception as exc:  # counted and reported, never hidden
            errors.append(repr(exc))
            conn.close()
            opened -= 1
            return
        latencies.append((time.perf_counter() - due) * 1000)
        dues.append(due - start)
        statuses[status] = statuses.get(status, 0) + 1
        idle.put_nowait(conn)

    # Warm up: open the connections and touch the server before the clock starts.
    warm = [await acquire() for _ in range(min(connections, 16))]
    for conn in warm:
        await conn.get(requests[0])
        idle.put_nowait(conn)

    total = int(rate * duration)
    tasks: set[asyncio.Task[None]] = set()
    start = time.perf_counter()
    sent = 0
    while sent < total:
        now = time.perf_counter()
        due_count = min(total, int((now - start) * rate) + 1)
        while sent < due_count:
            due = start + sent / rate
            task = asyncio.create_task(one(requests[sent % len(requests)], due))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            sent += 1
        next_due = start + sent / rate
        await asyncio.sleep(max(0.0, next_due - time.perf_counter()))
    send_elapsed = time.perf_counter() - start
    if tasks:
        # An overloaded server may never catch up: what is still out after the drain
        # time is reported as timed out, not left out of the percentiles silently.
        await asyncio.wait(tasks, timeout=drain)
    timed_out = len(tasks)
    for task in list(tasks):
        task.cancel()
    elapsed = time.perf_counter() - start
    while not idle.empty():
        idle.get_nowait().close()
    return {
        "rate": rate,
        "sent": sent,
        "completed": len(latencies),
        "elapsed_s": elapsed,
        "send_elapsed_s": send_elapsed,
        "achieved_rps": len(latencies) / elapsed if elapsed else 0.0,
        "latencies_ms": latencies,
        # each answered request's due time, seconds from the start (as `latencies_ms`):
        # when the slow ones came (bench.serving --keep)
        "due_s": dues,
        "statuses": statuses,
        "errors": errors[:20],
        "error_count": len(errors),
        "timed_out": timed_out,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--paths", type=Path, required=True, help="one request path a line")
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of sending")
    parser.add_argument("--connections", type=int, default=64, help="most open at once")
    parser.add_argument("--drain", type=float, default=10.0, help="seconds to wait at the end")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    paths = args.paths.read_text().split()
    coro = run(args.url, paths, args.rate, args.duration, args.connections, args.drain)
    try:
        import uvloop

        result = uvloop.run(coro)
    except ImportError:
        result = asyncio.run(coro)
    args.out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
