"""What the fault drills share: private servers to break, settings, and polling.

A drill breaks a server (flushes, pauses or restarts it), so it never breaks the session's
shared ones: each drill starts its own redis-server and, when it restarts the emulator,
its own moto with a state directory (as `recstream up` runs it), and stops them by the
process it started. Waiting is always on a condition with a generous deadline, never on
a sleep of a guessed length.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from recstream import stack
from recstream.keys import Keys
from recstream.settings import Settings
from streams.producer import KinesisProducer
from streams.schema import Event
from tests.conftest import REPO, unique
from tests.integration.test_spine import agent_worker

T = TypeVar("T")

__all__ = [
    "Poster",
    "Samples",
    "agents",
    "applied_ids",
    "drill_settings",
    "metric",
    "paused",
    "private_moto",
    "private_redis",
    "scrape",
    "wait_for",
]


@contextmanager
def private_redis(workdir: Path, port: int | None = None) -> Iterator[stack.Server]:
    """A redis-server of this drill only (nothing persisted: a restart comes back empty)."""
    server = stack.start_redis(port or stack.free_port(), workdir / "redis")
    try:
        yield server
    finally:
        resume(server)
        server.stop()


@contextmanager
def private_moto(workdir: Path, port: int | None = None) -> Iterator[stack.Server]:
    """moto through `recstream.emulator` with its state in ``workdir/moto-state``, as
    `recstream up` runs it: a SIGTERM saves the state and a restart loads it back."""
    server = stack.start_moto(
        port or stack.free_port(), workdir, state_dir=workdir / "moto-state", snapshot_every_s=1
    )
    try:
        yield server
    finally:
        resume(server)
        server.stop()


def resume(server: stack.Server) -> None:
    if server.process.poll() is None:
        os.killpg(server.process.pid, signal.SIGCONT)


@contextmanager
def paused(server: stack.Server) -> Iterator[None]:
    """SIGSTOP the server (and its process group) for the block: its sockets stay open
    and accept connections, but nothing answers, like a store stuck on a slow disk."""
    os.killpg(server.process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.killpg(server.process.pid, signal.SIGCONT)


@contextmanager
def agents(settings: Settings, log: Path, metrics_port: int | None = None) -> Iterator[Any]:
    """`recstream agents` (tests.integration.test_spine.agent_worker) running the code of
    this checkout: the child starts in another directory, where an editable install
    would otherwise import the package from wherever it was installed. With
    ``metrics_port``, the worker serves its /metrics there."""
    previous = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *([previous] if previous else [])])
    try:
        starting = agent_worker(settings, log, metrics_port=metrics_port)
        process = starting.__enter__()
    finally:
        if previous is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = previous
    try:
        yield process
    finally:
        starting.__exit__(None, None, None)


def drill_settings(redis_url: str, moto_url: str, **overrides: Any) -> Settings:
    """Fresh resource names on the given servers; the resources are created here."""
    name = unique("drill")
    values: dict[str, Any] = {
        "aws_endpoint_url": moto_url,
        "kinesis_endpoint_url": None,
        "redis_url": redis_url,
        "namespace": name,
        "stream_name": f"{name}-events",
        "table_prefix": name,
        "bucket": f"{name}-archive",
        "dlq_name": f"{name}-dlq",
        **overrides,
    }
    settings = Settings(**values)
    stack.create_resources(settings)
    return settings


def numbered_events(
    settings: Settings, prefix: str, count: int, *, users: int, items: int, event_type: str
) -> list[Event]:
    """``count`` events with ids ``{prefix}{n}``, spread over ``users`` actors and ``items``
    items, in the settings' namespace."""
    return [
        Event.model_validate(
            {
                "namespace": settings.namespace,
                "event_id": f"{prefix}{n}",
                "event_type": event_type,
                "user_id": f"u{n % users}",
                "item_id": f"i{n % items}",
            }
        )
        for n in range(count)
    ]


async def put(settings: Settings, batch: list[Event]) -> None:
    """Put ``batch`` on the stream directly; every event must land."""
    async with KinesisProducer(settings) as producer:
        results = await producer.put_events(batch)
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]


async def wait_for(
    check: Callable[[], Awaitable[T]], what: str, within: float = 60.0, log: Path | None = None
) -> T:
    """Poll ``check`` until it returns something truthy; fail after ``within`` seconds
    (a deadline for a stuck drill, never a measurement)."""
    deadline = time.monotonic() + within
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            tail = await asyncio.to_thread(_tail, log)
            pytest.fail(f"{what} did not happen within {within:.0f}s\n{tail}")
        await asyncio.sleep(0.1)


def _tail(log: Path | None) -> str:
    return log.read_text(errors="replace")[-4000:] if log and log.exists() else ""


async def applied_ids(client: aioredis.Redis, namespace: str, actors: list[str]) -> set[str]:
    """Every event id the agents applied for ``actors`` (their ``seen`` sets)."""
    keys = Keys(namespace)
    pipe = client.pipeline(transaction=False)
    for actor in actors:
        pipe.zrange(keys.seen(actor), 0, -1)
    found: set[str] = set()
    for members in await pipe.execute():
        found.update(m.decode() if isinstance(m, bytes) else str(m) for m in members)
    return found


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(port: int) -> Samples:
    """Every sample a process serves at ``http://127.0.0.1:{port}/metrics``."""
    async with httpx.AsyncClient(timeout=30) as client:
        answer = await client.get(f"http://127.0.0.1:{port}/metrics")
    answer.raise_for_status()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(answer.text)
        for s in family.samples
    }


def metric(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, have), v in samples.items() if n == name and wanted <= have)


@dataclass
class Poster:
    """Posts batches of fresh events until stopped; remembers every outcome."""

    url: str
    users: int = 20
    batch_size: int = 5
    prefix: str = "d2-"
    accepted: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    """Ids in a 503's ``failed`` list (or a 503 without a body): not acknowledged."""
    statuses: list[int] = field(default_factory=list)
    missing_retry_after: int = 0
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    counter: itertools.count[int] = field(default_factory=itertools.count)

    def batch(self) -> list[dict[str, Any]]:
        out = []
        for _ in range(self.batch_size):
            n = next(self.counter)
            user, item = f"u{n % self.users}", f"i{n % 31}"
            out.append(
                {
                    "event_id": f"{self.prefix}{n}",
                    "event_type": "view",
                    "user_id": user,
                    "item_id": item,
                }
            )
        return out

    def refusals(self) -> int:
        return sum(1 for s in self.statuses if s == 503)

    async def run(self) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=60) as client:
            while not self.stop.is_set():
                events = self.batch()
                response = await client.post("/v1/events", json=events)
                self.statuses.append(response.status_code)
                body = response.json()
                if response.status_code == 503 and "Retry-After" not in response.headers:
                    self.missing_retry_after += 1
                if response.status_code in (202, 503) and "accepted" in body:
                    self.accepted += [a["event_id"] for a in body["accepted"]]
                    self.refused += [f["event_id"] for f in body["failed"]]
                else:
                    self.refused += [e["event_id"] for e in events]
                await asyncio.sleep(0.02)
