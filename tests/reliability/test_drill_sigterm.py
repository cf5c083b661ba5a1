"""Drill: a worker that cannot reach AWS is told to stop (SIGTERM).

Real processes: a `recstream agents` worker, a private moto and a private redis-server.
The worker reads and applies events, then AWS becomes unreachable while a batch is in
flight: moto is either frozen (SIGSTOP: connections are accepted and never answered,
the worst case for a client) or stopped (connections refused). Then the worker gets a
SIGTERM, as an orchestrator sends one before it replaces a node.

Checked: the process exits within a generous bound (60 s: a hang is what is tested, not
speed) and leaves no child process behind. Its checkpoints and lease releases cannot be
written, so the next worker re-reads what was not checkpointed and the agents apply each
event once (tests/integration/test_crash.py covers that side).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from agents.app import APP_ID
from recstream import stack
from recstream.settings import Settings
from streams.leases import read_leases
from streams.producer import KinesisProducer
from streams.schema import Event
from tests.reliability.drillkit import (
    agents,
    applied_ids,
    drill_settings,
    paused,
    private_moto,
    private_redis,
    wait_for,
)

USERS = 4
SHARDS = 8
"""Enough leases that releasing them one after the other, each waiting for DynamoDB's
read timeout, outlasts the bound (it did: about 9 s per lease)."""
EXIT_BOUND_S = 60.0
"""How long the worker may take to exit: far above its lease duration (5 s here) and
the stores' timeouts, far below "it hangs"."""


def events(settings: Settings, prefix: str, count: int) -> list[Event]:
    return [
        Event.model_validate(
            {
                "namespace": settings.namespace,
                "event_id": f"{prefix}{n}",
                "event_type": "view",
                "user_id": f"u{n % USERS}",
                "item_id": f"i{n % 7}",
            }
        )
        for n in range(count)
    ]


async def put(settings: Settings, batch: list[Event]) -> None:
    async with KinesisProducer(settings) as producer:
        results = await producer.put_events(batch)
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (from /proc, whatever their command)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command may hold spaces and parentheses: the fields follow the last ')'.
        parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@contextmanager
def unreachable(server: stack.Server, how: str) -> Iterator[None]:
    if how == "frozen":
        with paused(server):
            yield
    else:
        server.stop()
        yield


@pytest.mark.timeout(180)
@pytest.mark.parametrize("how", ["frozen", "stopped"])
async def test_a_worker_cut_off_from_aws_exits_on_sigterm(tmp_path: Path, how: str) -> None:
    with private_redis(tmp_path) as redis_server, private_moto(tmp_path) as moto:
        settings = drill_settings(
            f"redis://127.0.0.1:{redis_server.port}/0", moto.url, stream_shards=SHARDS
        )
        log = tmp_path / "worker" / "agents.log"
        log.parent.mkdir()
        client = aioredis.from_url(settings.redis_url)
        actors = [f"u{n}" for n in range(USERS)]
        try:
            with agents(settings, log) as worker:
                first = events(settings, "before-", 20)
                await put(settings, first)

                async def applied() -> bool:
                    ids = await applied_ids(client, settings.namespace, actors)
                    return {e.event_id for e in first} <= ids

                await wait_for(applied, "the first events applied", 90, log)

                async def holds_every_lease() -> bool:
                    leases = await read_leases(
                        settings, app_id=APP_ID, stream_name=settings.stream_name
                    )
                    owners = {lease.owner for lease in leases}
                    return len(leases) == SHARDS and None not in owners and len(owners) == 1

                await wait_for(holds_every_lease, f"the worker holding {SHARDS} leases", 60, log)
                # A batch on the stream that the worker is still reading and applying
                # when AWS goes away: its writes and its checkpoint hang or fail.
                await put(settings, events(settings, "during-", 20))
                with unreachable(moto, how):
                    children = descendants(worker.pid)
                    started = time.monotonic()
                    worker.send_signal(signal.SIGTERM)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        await asyncio.to_thread(worker.wait, EXIT_BOUND_S)
                    took = time.monotonic() - started
                    code = worker.poll()
                    assert code is not None, (
                        f"the worker did not exit within {EXIT_BOUND_S:.0f}s of SIGTERM with "
                        f"AWS {how}\n{log.read_text(errors='replace')[-6000:]}"
                    )
                    left = {pid for pid in children if alive(pid)}
        finally:
            await client.aclose()
    assert code == 0, f"exit status {code}"  # a clean stop, not a crash on the way out
    assert left == set(), f"child processes left behind: {left}"
    print(f"\nDRILL sigterm ({how}): exited with {code} after {took:.1f}s, children {children}")
