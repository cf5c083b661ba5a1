"""Shared plumbing for the benchmarks: a private local stack and percentile maths."""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from recstream import stack
from recstream.settings import Settings

__all__ = ["local_settings", "summarize"]


@contextmanager
def local_settings(*, kinesis_mock: bool = False, **overrides: object) -> Iterator[Settings]:
    """redis-server + moto (+ kinesis-mock) on free ports, resources created."""
    servers: list[stack.Server] = []
    with tempfile.TemporaryDirectory(prefix="recstream-bench-") as tmp:
        work = Path(tmp)
        try:
            redis_server = stack.start_redis(stack.free_port(), work / "redis")
            servers.append(redis_server)
            moto = stack.start_moto(stack.free_port(), work)
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
                **overrides,
            }
            settings = Settings(**values)  # type: ignore[arg-type]
            stack.create_resources(settings)
            yield settings
        finally:
            for server in reversed(servers):
                server.stop()


def summarize(samples_ms: list[float]) -> dict[str, float]:
    ordered = sorted(samples_ms)
    cut = statistics.quantiles(ordered, n=100, method="inclusive")
    return {"p50": cut[49], "p99": cut[98], "mean": statistics.fmean(ordered), "n": len(ordered)}
