"""A worker SIGKILLed mid-stream loses no event and double-counts none.

Two real `recstream agents` processes share a 4-shard stream. One is killed with SIGKILL
while events flow; the survivor takes its leases after the lease expiry and re-reads
from the dead worker's last checkpoint, so some events are delivered twice. The agents'
idempotence must absorb exactly those: every popularity count ends exact.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from recstream.aws import sync_client
from recstream.keys import Keys
from recstream.settings import Settings
from tests.conftest import LocalStack, RunningApi, make_settings, serve_in_thread
from tests.integration.test_spine import agent_worker, eventually, tail

USERS, ITEMS, EVENTS = 60, 40, 2400


async def both_own_shards(settings: Settings, log: Path) -> None:
    """Wait until the two workers share the shards (a new worker steals its way in)."""
    dynamodb = sync_client(settings, "dynamodb")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        leases = dynamodb.scan(TableName=settings.leases_table)["Items"]
        owners = {lease["owner"]["S"] for lease in leases if lease.get("owner", {}).get("S")}
        if len(owners) == 2:
            return
        await asyncio.sleep(0.2)
    pytest.fail(f"the two workers never shared the shards; log:\n{tail(log)}")


async def popularity(client: aioredis.Redis, keys: Keys) -> dict[str, float]:
    pairs: list[Any] = await client.zrange(keys.popularity, 0, -1, withscores=True)
    return {bytes(item).decode(): float(score) for item, score in pairs}


async def at_least(client: aioredis.Redis, keys: Keys, total: float) -> bool:
    return await popularity_total(client, keys) >= total


async def popularity_total(client: aioredis.Redis, keys: Keys) -> float:
    return sum((await popularity(client, keys)).values())


async def test_sigkill_mid_stream_loses_nothing_and_counts_once(
    local_stack: LocalStack, tmp_path: Path
) -> None:
    from serving.app import create_app

    settings = make_settings(local_stack, stream_shards=4)
    events = [
        {
            "event_id": f"e{n}",
            "event_type": "view",
            "user_id": f"u{n % USERS}",
            "item_id": f"i{(n * 7) % ITEMS}",
        }
        for n in range(EVENTS)
    ]
    keys = Keys(settings.namespace)
    client = aioredis.from_url(settings.redis_url)
    from recstream import stack

    port = stack.free_port()
    try:
        with (
            serve_in_thread(create_app(settings), port),
            agent_worker(settings, tmp_path / "a.log") as doomed,
            agent_worker(settings, tmp_path / "b.log"),
        ):
            api = RunningApi(url=f"http://127.0.0.1:{port}", settings=settings)
            log_b = tmp_path / "b.log"
            await both_own_shards(settings, tmp_path / "b.log")
            async with httpx.AsyncClient(base_url=api.url, timeout=30) as http:
                for start in range(0, EVENTS, 100):
                    response = await http.post("/v1/events", json=events[start : start + 100])
                    assert response.status_code == 202
                    if start == EVENTS // 3:
                        # Mid-stream: wait until the workers are applying what flows (so
                        # the doomed one holds applied but uncommitted work), then kill
                        # it hard, and keep posting.
                        await eventually(
                            lambda: at_least(client, keys, EVENTS / 6), "processing", log_b
                        )
                        doomed.send_signal(signal.SIGKILL)
                    await asyncio.sleep(0.02)
            deadline = time.monotonic() + 90
            total = 0.0
            while time.monotonic() < deadline:
                total = await popularity_total(client, keys)
                if total >= EVENTS:
                    break
                await asyncio.sleep(0.1)
            else:
                pytest.fail(
                    f"only {total} of {EVENTS} views counted; survivor log:\n"
                    f"{tail(tmp_path / 'b.log')}"
                )
            await asyncio.sleep(2.0)  # anything re-delivered late must still not count
            assert await popularity_total(client, keys) == EVENTS
            expected = {f"i{i}": 0.0 for i in range(ITEMS)}
            for event in events:
                expected[str(event["item_id"])] += 1.0
            assert await popularity(client, keys) == expected
            for user in range(USERS):
                window = await client.lrange(keys.window(f"u{user}"), 0, -1)
                assert len(window) == EVENTS // USERS
        # The survivor really was handed events twice (the killed worker's uncommitted
        # batch, or the overlap while a lease changed hands), and really skipped them.
        assert "already-applied" in tail(tmp_path / "b.log", 1_000_000)
    finally:
        await client.aclose()
