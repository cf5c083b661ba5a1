"""The S3 archive end to end: HTTP → Kinesis → a real `recstream agents` worker → S3, a
SIGKILL between buffering and flushing, a restart, then `recstream train` with no flags.

The first worker buffers every event but never reaches its flush (an hour's age limit),
so when it is killed nothing is in S3 and nothing may have been checkpointed past the
buffer. The second worker takes the leases over, re-reads from the checkpoint and
flushes: the archive must then hold every event exactly once, counting raw lines (no
dedup on read involved). Training on defaults then finds those events.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from recstream import stack
from recstream.aws import sync_client
from recstream.settings import Settings
from streams.schema import Event
from tests.conftest import LocalStack, make_settings, serve_in_thread
from tests.integration.test_spine import agent_worker, eventually, tail

USERS, ITEMS, EVENTS = 30, 20, 300


def archived_lines(settings: Settings) -> list[Event]:
    s3 = sync_client(settings, "s3")
    events: list[Event] = []
    pages = s3.get_paginator("list_objects_v2").paginate(
        Bucket=settings.bucket, Prefix=f"archive/{settings.namespace}/"
    )
    for page in pages:
        for obj in page.get("Contents", ()):
            body = s3.get_object(Bucket=settings.bucket, Key=obj["Key"])["Body"].read()
            events.extend(Event.from_json(line) for line in gzip.decompress(body).splitlines())
    return events


async def buffered(metrics_url: str) -> float:
    async with httpx.AsyncClient(timeout=5) as http:
        try:
            text = (await http.get(metrics_url)).text
        except httpx.TransportError:
            return 0.0
    for line in text.splitlines():
        if line.startswith("recstream_archive_buffered_events "):
            return float(line.split()[1])
    return 0.0


def recstream(settings: Settings, *argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **settings.to_env(), "RECSTREAM_STATE_DIR": str(cwd)}
    return subprocess.run(
        [sys.executable, "-m", "recstream.cli", *argv],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


# Three processes start (two workers, `recstream train` with every model), so this test
# gets more than the suite's 120 s per test.
@pytest.mark.timeout(300)
async def test_sigkill_before_the_flush_then_restart_archives_each_event_once_and_trains(
    local_stack: LocalStack, tmp_path: Path
) -> None:
    from serving.app import create_app

    # Nothing reaches the flush in the first worker: an hour's age, a gigabyte's size.
    settings = make_settings(local_stack, archive_flush_s=3600.0, archive_flush_bytes=10**9)
    now = time.time()
    events = [
        {
            "event_id": f"e{n}",
            "event_type": "purchase" if n % 11 == 0 else "view",
            "user_id": f"u{n % USERS}",
            "item_id": f"i{(n * 7 + n // USERS) % ITEMS}",
            # three hours of history, so the archive has three hour partitions
            "timestamp": now - 3 * 3600 + n * 15,
        }
        for n in range(EVENTS)
    ]
    port, metrics_port = stack.free_port(), stack.free_port()
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    with serve_in_thread(create_app(settings), port):
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            with agent_worker(settings, log_a, metrics_port=metrics_port) as doomed:
                for start in range(0, EVENTS, 100):
                    response = await http.post("/v1/events", json=events[start : start + 100])
                    assert response.status_code == 202, response.text

                async def all_buffered() -> bool:
                    return await buffered(metrics_url) >= EVENTS

                await eventually(
                    all_buffered, "the archive agent buffering every event", log_a, 120
                )
                assert archived_lines(settings) == []  # between buffer and flush
                doomed.send_signal(signal.SIGKILL)
                doomed.wait(10)

            restarted = settings.model_copy(update={"archive_flush_s": 0.5})
            with agent_worker(restarted, log_b):

                async def all_archived() -> bool:
                    return len({e.event_id for e in archived_lines(settings)}) >= EVENTS

                await eventually(all_archived, "the restarted worker archiving", log_b, 120)
                await asyncio.sleep(1.5)  # a late duplicate flush would land by now
    lines = archived_lines(settings)
    counts = Counter(event.event_id for event in lines)
    assert set(counts) == {e["event_id"] for e in events}
    duplicates = {event_id: n for event_id, n in counts.items() if n > 1}
    assert not duplicates, f"archived more than once: {duplicates}"
    # exactly the events posted, as validated Events, in their own hour's partition
    by_id = {event.event_id: event for event in lines}
    for posted in events:
        stored = by_id[str(posted["event_id"])]
        assert (stored.user_id, stored.item_id, stored.event_type) == (
            posted["user_id"],
            posted["item_id"],
            posted["event_type"],
        )
        assert stored.timestamp == pytest.approx(float(posted["timestamp"]))

    # `recstream train` with no flags trains on what the stack received ...
    trained = recstream(settings, "train", cwd=tmp_path)
    assert trained.returncode == 0, trained.stdout + trained.stderr + tail(log_b)
    assert f"s3://{settings.bucket}" in trained.stdout
    listed = recstream(settings, "models", "list", "--json", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    models = json.loads(listed.stdout)
    assert models, "no model was published"
    for model in models:
        assert model["current"]
        assert model["data"]["rows"] == EVENTS
