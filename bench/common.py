"""Shared plumbing for the benchmarks: a private local stack and percentile maths."""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import httpx

from recstream import stack
from recstream.settings import Settings

__all__ = ["local_settings", "local_stack", "start_api", "summarize", "wait_http"]


@contextmanager
def local_stack(
    *,
    durable: bool = False,
    kinesis_mock: bool = False,
    prefix: str = "recstream-bench-",
    overrides: Mapping[str, object] | None = None,
) -> Iterator[tuple[Settings, list[stack.Server]]]:
    """redis-server + moto (+ kinesis-mock) on free ports, resources created: the
    settings, and the servers in that order (their pids are what the benches watch).
    ``durable``: as `recstream up` starts them, Redis with its append-only file and the
    emulator snapshotting its state, since what a user's stack costs is what is measured."""
    servers: list[stack.Server] = []
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        work = Path(tmp)
        try:
            redis_server = stack.start_redis(stack.free_port(), work / "redis", durable=durable)
            servers.append(redis_server)
            moto = stack.start_moto(
                stack.free_port(),
                work,
                state_dir=work / "moto" if durable else None,
                snapshot_every_s=Settings().emulator_snapshot_s,
                max_records_per_shard=Settings().emulator_max_records,
            )
            servers.append(moto)
            kinesis_url = None
            if kinesis_mock:
                km = stack.start_kinesis_mock(
                    stack.free_port(), work, Settings().kinesis_mock_dir.resolve()
                )
                servers.append(km)
                kinesis_url = km.url
            values: dict[str, object] = {
                "aws_endpoint_url": moto.url,
                "kinesis_endpoint_url": kinesis_url,
                "redis_url": f"redis://127.0.0.1:{redis_server.port}/0",
                "state_dir": work,
                **(overrides or {}),
            }
            settings = Settings(**values)  # type: ignore[arg-type]
            stack.create_resources(settings)
            yield settings, servers
        finally:
            for server in reversed(servers):
                server.stop()


@contextmanager
def local_settings(*, kinesis_mock: bool = False, **overrides: object) -> Iterator[Settings]:
    """`local_stack`'s settings alone."""
    with local_stack(kinesis_mock=kinesis_mock, overrides=overrides) as (settings, _):
        yield settings


def summarize(samples_ms: list[float]) -> dict[str, float]:
    ordered = sorted(samples_ms)
    cut = statistics.quantiles(ordered, n=100, method="inclusive")
    return {"p50": cut[49], "p99": cut[98], "mean": statistics.fmean(ordered), "n": len(ordered)}


def start_api(settings: Settings, port: int) -> subprocess.Popen[bytes]:
    """The API in its own process, as in production, so the load generator does not share
    its interpreter."""
    return subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", "serving.app:app_from_env",
         "--port", str(port), "--log-level", "warning", "--no-access-log"],
        env={**os.environ, **settings.to_env()},
    )  # fmt: skip


async def wait_http(url: str, server: subprocess.Popen[bytes]) -> None:
    async with httpx.AsyncClient(base_url=url) as client:
        for _ in range(300):
            if server.poll() is not None:
                raise SystemExit("the API process exited during start-up")
            try:
                if (await client.get("/healthz")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
    raise SystemExit("the API did not start within 30 s")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process and its live children (uvicorn's workers) have
    used (Linux /proc): a cost per request or event that other processes' load on a
    shared machine does not inflate, unlike latency; 0 for a process that is gone."""
    total = 0.0
    for proc in [pid, *_children(pid)]:
        try:
            fields = Path(f"/proc/{proc}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            listed = task.read_text().split()
        except OSError:
            continue
        for child in listed:
            found += [int(child), *_children(int(child))]
    return found
