"""The spine, end to end on real parts: HTTP → collector → Kinesis (moto) → a real agent
worker process (faust on the kinesis:// transport) → Redis + DynamoDB → ranking over HTTP.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from recstream import stack
from recstream.aws import sync_client
from recstream.keys import Keys
from recstream.settings import Settings
from recstream.windows import WindowEntry
from tests.conftest import RunningApi


@contextmanager
def agent_worker(
    settings: Settings, log: Path, metrics_port: int | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """`recstream agents` as a child process, exactly as a user runs it."""
    env = {
        **os.environ,
        **settings.to_env(),
        "RECSTREAM_AGENTS_METRICS_PORT": str(metrics_port) if metrics_port else "",
        "RECSTREAM_STATE_DIR": str(log.parent),
        "RECSTREAM_POLL_INTERVAL_S": "0.05",
        "RECSTREAM_LEASE_DURATION_S": "5",
        "RECSTREAM_AGENT_BATCH_WINDOW_S": "0.02",
    }
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "recstream.cli", "agents"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=log.parent,
        )
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def tail(log: Path, size: int = 4000) -> str:
    return log.read_text(errors="replace")[-size:]


async def eventually(check: Any, what: str, log: Path, within: float = 60.0) -> Any:
    """Poll ``check`` (bounded) until it returns something truthy."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        result = await check()
        if result:
            return result
        await asyncio.sleep(0.05)
    pytest.fail(f"{what} did not happen within {within:.0f}s; agent log:\n{tail(log)}")


async def test_a_click_travels_the_whole_spine(api: RunningApi, tmp_path: Path) -> None:
    settings = api.settings
    log = tmp_path / "agents.log"
    metrics_port = stack.free_port()
    crowd = [
        {"event_type": "view", "user_id": f"crowd{n}", "item_id": f"pop{n % 3}"} for n in range(40)
    ]
    async with httpx.AsyncClient(base_url=api.url, timeout=30) as client:
        with agent_worker(settings, log, metrics_port=metrics_port):
            assert (await client.post("/v1/events", json=crowd)).status_code == 202

            async def popular_known() -> bool:
                r = await client.get("/v1/recommendations", params={"user_id": "alice"})
                return len(r.json()["items"]) == 3

            await eventually(popular_known, "the crowd's views reaching popularity", log)
            before = (await client.get("/v1/recommendations", params={"user_id": "alice"})).json()
            assert "niche" not in [i["item_id"] for i in before["items"]]

            click = {"event_type": "click", "user_id": "alice", "item_id": "niche"}
            assert (await client.post("/v1/events", json=click)).status_code == 202

            async def niche_first() -> dict[str, Any] | None:
                r = await client.get("/v1/recommendations", params={"user_id": "alice"})
                body: dict[str, Any] = r.json()
                # (a degraded answer, a store slow under load, may be empty: ask again)
                items = body["items"]
                return body if items and items[0]["item_id"] == "niche" else None

            after = await eventually(niche_first, "alice's click changing her recommendations", log)

            # A click that says it happened an hour ago: its window entry keeps when the
            # stream accepted it (freshness counts from that, serving/pipeline/freshness.py)
            an_hour_ago = time.time() - 3600
            late = {"event_type": "click", "user_id": "bob", "item_id": "niche"}
            posted = time.time()
            response = await client.post("/v1/events", json={**late, "timestamp": an_hour_ago})
            assert response.status_code == 202
            redis = aioredis.from_url(settings.redis_url)
            try:

                async def bob_entry() -> WindowEntry | None:
                    raw = await redis.lindex(Keys(settings.namespace).window("bob"), 0)
                    return WindowEntry.loads(raw) if raw is not None else None

                entry = await eventually(bob_entry, "bob's late click reaching his window", log)
            finally:
                await redis.aclose()
            assert entry.timestamp == pytest.approx(an_hour_ago, abs=0.01)
            assert entry.lag_s is not None
            assert posted - 5 <= entry.accepted_at <= time.time()
            metrics = (await client.get(f"http://127.0.0.1:{metrics_port}/metrics")).text
    assert "recstream_stream_" in metrics  # the worker's Prometheus endpoint
    assert "recently_interacted" in after["items"][0]["reasons"]

    # The durable copy of alice's window, written by the agent after Redis.
    dynamodb = sync_client(settings, "dynamodb")
    item = dynamodb.get_item(
        TableName=settings.windows_table, Key={"pk": {"S": f"{settings.namespace}#alice"}}
    )["Item"]
    assert '"niche"' in item["window"]["S"]

    # The worker checkpointed past the records it processed.
    leases = dynamodb.scan(TableName=settings.leases_table)["Items"]
    checkpoints = [lease.get("checkpoint", {}).get("S", "") for lease in leases]
    assert any(cp.isdigit() for cp in checkpoints), leases
