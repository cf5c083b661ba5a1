"""The sustained-ingestion benchmark's plumbing, with a few hundred events (never a figure).

`bench.ingest.measure` is what `python -m bench.ingest --events 1000000` runs: the API and
a `recstream agents` worker as their own processes, 64 clients posting single events. Here
it runs on the suite's stack; the test checks that every event was accepted, reached the
agents and was applied once, that the lag was sampled and drained, and that the table has
every row the issue's targets are read from. Timing is not asserted.
"""

from __future__ import annotations

import io
from pathlib import Path

import redis.asyncio as aioredis
from rich.console import Console

from bench.ingest import Options, measure, report
from recstream.keys import Keys
from tests.conftest import LocalStack, make_settings

EVENTS, CLIENTS = 640, 64


async def test_the_ingest_benchmark_posts_applies_and_reports_every_event(
    local_stack: LocalStack, tmp_path: Path
) -> None:
    # A short archive flush age lets the checkpoints, and so the drain, follow quickly.
    settings = make_settings(local_stack, state_dir=tmp_path, archive_flush_s=1.0)
    options = Options(events=EVENTS, clients=CLIENTS, window=200, lag_every=0.5)
    console = Console(file=io.StringIO(), width=200)
    # The suite's servers are shared with other tests: only the API's, the agents' and
    # this process's CPU is counted, and no emulator memory is sampled.
    result = await measure(settings, options, {}, console)

    assert result.progress.errors == {}
    assert result.accepted == EVENTS
    assert len(result.progress.latencies_ms) == EVENTS
    # The load starts once the worker holds every shard, so the lags are read throughout.
    assert result.progress.lag_samples, "the checkpoint lag was never sampled"
    assert result.progress.apply_lags, "no sampled event was seen applied"
    assert result.window_rates() is not None

    # Every posted event reached the agents and was applied once: each client's 10 events
    # went to 10 distinct users (c{client}-u{n}), and each user's window holds its event.
    # (The benchmark stopped its worker, after waiting up to 120 s for the lag to reach 0;
    # how long that took is a figure, so it is only printed.)
    keys = Keys(settings.namespace)
    client = aioredis.from_url(settings.redis_url)
    try:
        lengths = [
            await client.llen(keys.window(f"c{c}-u{u}"))
            for c in range(CLIENTS)
            for u in range(EVENTS // CLIENTS)
        ]
    finally:
        await client.aclose()
    assert lengths == [1] * EVENTS, (settings.state_dir / "agents.log").read_text()[-3000:]

    report(result, console)
    printed = console.file.getvalue()  # type: ignore[attr-defined]
    for row in (
        "events accepted",
        "ratio last / first",
        "agent lag: 202 → applied, median / max",
        "agent lag: p90 / p95, samples ≥ 1 s",
        "checkpoint lag median / max",
        "drain after load",
        "CPU per event: agents",
    ):
        assert row in printed, printed
    assert f"{EVENTS:,} in" in printed
