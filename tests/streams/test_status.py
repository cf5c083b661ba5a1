"""`recstream streams status`: leases, checkpoints and lag, from the table and Kinesis."""

from __future__ import annotations

import asyncio

import pytest

from recstream.cli import main
from recstream.settings import Settings
from streams.kinesis import consumer_of, make_app, running
from streams.kinesis.status import shard_status
from tests.streams.kinesis_helpers import make_events, owner_name, put_events, wait_until


async def test_status_shows_owner_checkpoint_lag_and_age(
    stream_settings: Settings, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = stream_settings.model_copy(update={"worker_id": "status-worker"})
    app = make_app(settings, "test-status")
    seen: list[bytes] = []

    @app.agent(app.topic(settings.stream_name, value_serializer="raw"))
    async def collect(stream):  # type: ignore[no-untyped-def]
        async for value in stream:
            seen.append(value)

    await put_events(settings, make_events(200))
    async with running(app):
        consumer = consumer_of(app)
        await wait_until(lambda: len(seen) >= 200, what="200 events")
        await wait_until(
            lambda: all(p.committed_offset > 0 for p in consumer._partitions.values()),
            what="checkpoints",
        )
        rows = await shard_status(settings)
        lag = consumer.lag()

    assert [row.shard_id for row in rows] == ["shardId-000000000000", "shardId-000000000001"]
    assert {row.app_id for row in rows} == {"test-status"}
    assert {owner_name(row.owner) for row in rows} == {"status-worker"}
    assert all(row.checkpoint.isdigit() for row in rows)
    # Caught up: the checkpoint is the last record, nothing after it.
    assert all(row.lag_ms is not None and row.lag_ms >= 0 for row in rows)
    assert all(row.lease_age_s >= 0 and not row.expired for row in rows)
    assert all(isinstance(v, int) for v in lag.values())

    for name, value in settings.to_env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("COLUMNS", "200")  # rich fits the table to the terminal width
    # The CLI runs its own event loop, so it runs on a thread here.
    assert await asyncio.to_thread(main, ["streams", "status"]) == 0
    out = capsys.readouterr().out
    assert "shardId-000000000000" in out
    assert "test-status" in out
    # The app stopped and released its leases: no owner is shown any more.
    assert "status-worker" not in out
    assert (
        await asyncio.to_thread(main, ["streams", "status", "--json", "--app", "test-status"]) == 0
    )
    assert capsys.readouterr().out.count('"shard_id"') == 2
