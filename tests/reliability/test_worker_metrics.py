"""The agent worker's own Redis and AWS call metrics, on its /metrics port.

Real processes: a `recstream agents` worker serving ``RECSTREAM_AGENTS_METRICS_PORT``,
the session's moto and a private redis-server (stopped halfway, for the errors).

Checked: after the worker applied some events, its scrape carries the same families as
the API's (`recstream_redis_call_seconds`, `recstream_aws_call_seconds`) for the calls
the worker makes itself: Redis commands of the agents, Kinesis GetRecords of the shard
readers, DynamoDB UpdateItem of the lease renewals and checkpoints, S3 PutObject of the
archive; and once Redis is gone, `recstream_redis_call_errors_total`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import redis.asyncio as aioredis

from recstream import stack
from recstream.settings import Settings
from streams.schema import Event
from tests.conftest import LocalStack
from tests.reliability.drillkit import (
    Samples,
    agents,
    applied_ids,
    drill_settings,
    metric,
    numbered_events,
    private_redis,
    put,
    scrape,
    wait_for,
)

USERS = 3


def events(settings: Settings, prefix: str, count: int) -> list[Event]:
    return numbered_events(settings, prefix, count, users=USERS, items=5, event_type="click")


CALLS = "recstream_aws_call_seconds_count"


@pytest.mark.timeout(150)
async def test_the_worker_times_its_own_redis_and_aws_calls(
    local_stack: LocalStack, tmp_path: Path
) -> None:
    with private_redis(tmp_path) as redis_server:
        settings = drill_settings(
            f"redis://127.0.0.1:{redis_server.port}/0",
            local_stack.moto_url,
            # the archive writes its first object soon, not after a minute
            archive_flush_s=1.0,
        )
        port = stack.free_port()
        log = tmp_path / "worker" / "agents.log"
        log.parent.mkdir()
        client = aioredis.from_url(settings.redis_url)
        try:
            with agents(settings, log, metrics_port=port):
                first = events(settings, "m-", 12)
                await put(settings, first)

                async def applied() -> bool:
                    ids = await applied_ids(
                        client, settings.namespace, [f"u{n}" for n in range(USERS)]
                    )
                    return {e.event_id for e in first} <= ids

                await wait_for(applied, "the events applied", 90, log)

                async def every_kind_timed() -> Samples:
                    samples = await scrape(port)
                    timed = (
                        metric(samples, "recstream_redis_call_seconds_count"),
                        metric(samples, CALLS, service="kinesis", operation="GetRecords"),
                        metric(samples, CALLS, service="dynamodb", operation="UpdateItem"),
                        metric(samples, CALLS, service="s3", operation="PutObject"),
                    )
                    return samples if all(timed) else {}  # (empty: not yet)

                samples = await wait_for(every_kind_timed, "the worker's call metrics", 60, log)
                redis_server.stop()
                await put(settings, events(settings, "gone-", 3))

                async def redis_errors() -> float:
                    return metric(await scrape(port), "recstream_redis_call_errors_total")

                errors = await wait_for(redis_errors, "Redis errors counted", 60, log)
        finally:
            await client.aclose()
    commands = sorted(
        dict(labels)["command"]
        for name, labels in samples
        if name == "recstream_redis_call_seconds_count"
    )
    operations = sorted(
        f"{dict(labels)['service']}.{dict(labels)['operation']}"
        for name, labels in samples
        if name == CALLS
    )
    print(f"\nworker metrics: redis {commands}; aws {operations}; redis errors {errors:.0f}")
