"""`recstream serve --workers 2`: two API processes on one port, answering as one, with
one /metrics for both (prometheus-client's multiprocess mode), each accepting on a
listening socket of its own (serving/workers.py), also after a worker is replaced."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx

from recstream import prom, stack
from tests.conftest import LocalStack, make_settings


@contextlib.asynccontextmanager
async def two_workers(
    local_stack: LocalStack, tmp_path: Path
) -> AsyncIterator[tuple[httpx.AsyncClient, subprocess.Popen[bytes], int]]:
    """`recstream serve --workers 2` on a free port, answering: a client, the server
    process (the supervisor) and the port."""
    settings = make_settings(local_stack, state_dir=tmp_path)
    port = stack.free_port()
    log = (tmp_path / "serve.log").open("wb")
    server = subprocess.Popen(  # noqa: ASYNC220 (a server for the test to talk to)
        [sys.executable, "-m", "recstream.cli", "serve", "--port", str(port), "--workers", "2"],
        env={**os.environ, **settings.to_env()},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            await _ready(client, server, tmp_path / "serve.log")
            yield client, server, port
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(5)
        log.close()


async def test_two_workers_answer_and_share_their_metrics(
    local_stack: LocalStack, tmp_path: Path
) -> None:
    async with two_workers(local_stack, tmp_path) as (_, _, port):
        # separate connections, so the kernel spreads them over both processes
        for n in range(40):
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as fresh:
                response = await fresh.get("/v1/recommendations", params={"user_id": f"u{n}"})
                assert response.status_code == 200, response.text
        # each process adds its observations to the shared files once a second
        # (recstream/prom.py); the one answering /metrics adds its own at once
        await asyncio.sleep(prom.FLUSH_EVERY_S + 0.5)
        scrapes = []
        for _ in range(6):
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as fresh:
                scrapes.append(_count((await fresh.get("/metrics")).text))
    # whichever process answered /metrics counted the requests of both
    assert min(scrapes) >= 40, scrapes
    files = list((tmp_path / "metrics" / str(port)).glob("histogram_*.db"))
    assert len({f.stem.rsplit("_", 1)[1] for f in files}) >= 2  # two processes wrote


async def test_each_worker_listens_on_a_socket_of_its_own_also_when_replaced(
    local_stack: LocalStack, tmp_path: Path
) -> None:
    """uvicorn's one socket shared by every worker let the worker that waited last take
    most connections (72 % of a bench's requests to one of two); each worker now has a
    ``SO_REUSEPORT`` socket of its own, which the kernel balances, and a worker that
    dies is replaced on the same socket."""
    async with two_workers(local_stack, tmp_path) as (client, server, port):
        holders = workers_on(port, server.pid)
        assert len(holders) == 2, holders  # two listening sockets, one worker on each
        assert all(len(p) == 1 for p in holders.values()), holders
        victim, survivor = (next(iter(p)) for p in holders.values())
        assert victim != survivor

        inode = next(i for i, p in holders.items() if victim in p)
        os.kill(victim, signal.SIGKILL)
        for _ in range(300):  # the supervisor checks twice a second
            now = workers_on(port, server.pid)
            if now.get(inode) and victim not in now[inode]:
                break
            await asyncio.sleep(0.1)
        assert set(now) == set(holders), now  # the same two sockets
        (replacement,) = now[inode]
        assert replacement not in (victim, survivor)
        assert (await client.get("/healthz")).status_code == 200


def workers_on(port: int, supervisor: int) -> dict[int, set[int]]:
    """The sockets listening on ``port`` (by inode), each with the processes holding it
    but the supervisor (which keeps them all, for the workers it starts)."""
    inodes: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as f:
            for line in list(f)[1:]:
                fields = line.split()
                local, state, inode = fields[1], fields[3], int(fields[9])
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                    inodes.add(inode)
    held: dict[int, set[int]] = {i: set() for i in inodes}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) == supervisor:
            continue
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith("socket:[") and int(target[8:-1]) in held:
                        held[int(target[8:-1])].add(int(pid))
    return held


def _count(metrics: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("recstream_http_request_seconds_count")
        and 'route="/v1/recommendations"' in line
    )


async def _ready(client: httpx.AsyncClient, server: subprocess.Popen[bytes], log: Path) -> None:
    for _ in range(600):
        if server.poll() is not None:
            raise AssertionError(f"recstream serve exited:\n{log.read_text()[-3000:]}")  # noqa: ASYNC240
        try:
            if (await client.get("/healthz")).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError("the API did not start within 60 s")
