"""Drill: a worker that cannot reach AWS is told to stop (SIGTERM).

Real processes: a `recstream agents` worker holding 12 shard leases, a private moto and
a private redis-server. The worker reads and applies events, then AWS goes away while a
batch is in flight, in one of three ways:

* ``frozen``: moto SIGSTOPped: connections are accepted and never answered (the worst
  case for a client: each call waits for its read timeout);
* ``stopped``: moto stopped: connections refused;
* ``silent-checkpoints``: through a test-side proxy (tests/reliability/faultproxy.py),
  the checkpoint writes and the trend keeper's reads of the S3 archive (a fresh Redis
  makes it replay the archive) go unanswered first, so the worker has a commit of every
  shard and a blocking read in a thread in flight, then every other call too.

Then the worker gets a SIGTERM, as an orchestrator sends one before it replaces a node.

Checked: the process exits, with status 0, within a generous bound (60 s: a hang is what
is tested, not speed), and leaves no child process behind. Its checkpoints and lease
releases cannot be written, so the next worker re-reads what was not checkpointed and
the agents apply each event once (tests/integration/test_crash.py covers that side).

What it found: faust's wait for unacked messages had no bound (the agents' batch never
finishes without its stores: fixed before this drill, `Consumer.wait_empty`); the leases
were released one after the other, each waiting for its timeouts (about 9 s a lease);
checkpoints were written one shard after the other, so a commit of 12 shards to a silent
DynamoDB took over a minute before the worker could stop; and once stopped, the process
waited at exit for the keeper's thread blocked in a boto3 read (3 x 60 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from agents.app import APP_ID
from recstream import stack
from recstream.settings import Settings
from streams.leases import read_leases
from streams.schema import Event
from tests.reliability.drillkit import (
    agents,
    applied_ids,
    drill_settings,
    numbered_events,
    paused,
    private_moto,
    private_redis,
    put,
    wait_for,
)
from tests.reliability.faultproxy import Call, FaultProxy

USERS = 48
"""Enough actors that a batch touches every shard."""
SHARDS = 12
"""Enough leases that waiting for DynamoDB's timeouts once per shard, one shard after the
other, outlasts the bound (releases took about 9 s a lease, checkpoints about 6 s)."""
EXIT_BOUND_S = 60.0
"""How long the worker may take to exit: far above its lease duration (5 s here) and
the stores' timeouts, far below "it hangs"."""


def events(settings: Settings, prefix: str, count: int) -> list[Event]:
    return numbered_events(settings, prefix, count, users=USERS, items=7, event_type="view")


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


def is_checkpoint(call: Call) -> bool:
    """A checkpoint write of the lease table (streams/leases.py `update_checkpoint`)."""
    return call.operation == "UpdateItem" and b"SET checkpoint = :checkpoint" in call.body


def is_archive_replay(call: Call) -> bool:
    """The trend keeper's replay of the archive (recstream/archive.py `read_events`, boto3
    in a thread): its listing of a day, without the delimiter of the keeper's own (async)
    listing of the days."""
    return call.method == "GET" and "list-type=2" in call.path and "delimiter" not in call.path


@asynccontextmanager
async def proxied(moto: stack.Server) -> AsyncIterator[FaultProxy]:
    proxy = FaultProxy(moto.url)
    await proxy.start(stack.free_port())
    try:
        yield proxy
    finally:
        await proxy.close()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("how", ["frozen", "stopped", "silent-checkpoints"])
async def test_a_worker_cut_off_from_aws_exits_on_sigterm(tmp_path: Path, how: str) -> None:
    with private_redis(tmp_path) as redis_server, private_moto(tmp_path) as moto:
        async with proxied(moto) as proxy:
            direct = drill_settings(
                f"redis://127.0.0.1:{redis_server.port}/0",
                moto.url,
                stream_shards=SHARDS,
                # Checkpoints move once the archive has written what it read (every
                # minute by default): every second, so that commits are under way.
                archive_flush_s=1.0,
            )
            # The worker sees AWS through the proxy only when the proxy makes the fault.
            settings = (
                direct.model_copy(update={"aws_endpoint_url": proxy.url})
                if how == "silent-checkpoints"
                else direct
            )
            log = tmp_path / "worker" / "agents.log"
            log.parent.mkdir()
            client = aioredis.from_url(settings.redis_url)
            actors = [f"u{n}" for n in range(USERS)]
            try:
                with agents(settings, log) as worker:
                    code, took, children, left = await _drill(
                        direct, client, actors, worker, log, how, moto, proxy
                    )
            finally:
                await client.aclose()
    assert code is not None, f"the worker did not exit within {EXIT_BOUND_S:.0f}s of SIGTERM"
    assert code == 0, f"exit status {code}"  # a clean stop, not a crash on the way out
    assert left == set(), f"child processes left behind: {left}"
    print(f"\nDRILL sigterm ({how}): exited with {code} after {took:.1f}s, children {children}")


async def _drill(
    settings: Settings,
    client: aioredis.Redis,
    actors: list[str],
    worker: subprocess.Popen[bytes],
    log: Path,
    how: str,
    moto: stack.Server,
    proxy: FaultProxy,
) -> tuple[int | None, float, set[int], set[int]]:
    first = events(settings, "before-", 2 * USERS)
    await put(settings, first)

    async def applied(batch: list[Event]) -> bool:
        return {e.event_id for e in batch} <= await applied_ids(client, settings.namespace, actors)

    await wait_for(lambda: applied(first), "the first events applied", 90, log)

    async def holds_every_lease() -> bool:
        leases = await read_leases(settings, app_id=APP_ID, stream_name=settings.stream_name)
        owners = {lease.owner for lease in leases}
        return len(leases) == SHARDS and None not in owners and len(owners) == 1

    await wait_for(holds_every_lease, f"the worker holding {SHARDS} leases", 60, log)
    during = events(settings, "during-", 2 * USERS)
    async with contextlib.AsyncExitStack() as faults:
        if how == "silent-checkpoints":
            proxy.hold = lambda call: is_checkpoint(call) or is_archive_replay(call)
            await put(settings, during)

            async def committing() -> bool:
                return (
                    await applied(during)
                    and proxy.held_by("UpdateItem") > 0
                    and proxy.held_by("GET") > 0
                )

            await wait_for(
                committing, "the events applied, checkpoints and an archive read sent", 60, log
            )
            proxy.hold = lambda call: True
        else:
            # A batch on the stream that the worker is still reading and applying when
            # AWS goes away: its writes and its checkpoint hang or fail.
            await put(settings, during)
            if how == "frozen":
                faults.enter_context(paused(moto))
            else:
                moto.stop()
        children = descendants(worker.pid)
        started = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            await asyncio.to_thread(worker.wait, EXIT_BOUND_S)
        took = time.monotonic() - started
        code = worker.poll()
        if code is None:
            print(await asyncio.to_thread(log.read_text, errors="replace"))
        return code, took, children, {pid for pid in children if alive(pid)}
