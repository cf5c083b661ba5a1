"""`recstream train` and `recstream models ...`: parsing, scheduling and the commands
against real Redis and the emulator's S3."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from recstream.cli import build_parser
from recstream.errors import ConfigurationError, ResourceNotFound
from recstream.keys import Keys
from recstream.settings import Settings
from tests.training.test_publish_pipeline import plan, tiny
from tests.training.tinymodel import TinyModel
from training import sources
from training.cli import parse_duration, parse_time, run_every
from training.pipeline import ModelSpec
from training.publish import DataRange, ModelRegistry, RunInfo, current_version, read_current


def run_cli(argv: list[str], settings: Settings) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.handler(args, settings)
    return code


async def cli(argv: list[str], settings: Settings) -> int:
    # The handlers call asyncio.run, so they run off this test's event loop.
    return await asyncio.to_thread(run_cli, argv, settings)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30m", 1800),
        ("6h", 6 * 3600),
        ("24h", 86400),
        ("7d", 7 * 86400),
        ("1h30m", 5400),
        ("90s", 90),
        ("1w", 7 * 86400),
        ("0.5h", 1800),
        (" 2H ", 7200),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "24", "h", "-5m", "0m", "5x", "5m3", "m5", "1.h", "daily"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_duration(text)


def test_train_every_is_parsed_by_the_recstream_parser(capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(["train", "--every", "24h", "--source", "movielens"])
    assert args.every == 86400
    assert args.source == "movielens"
    assert args.promote
    assert args.refit
    once = build_parser().parse_args(["train", "--no-promote", "--start", "2026-11-01"])
    assert once.every is None
    assert not once.promote
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["train", "--every", "daily"])
    assert exited.value.code == 2
    assert "not a duration" in capsys.readouterr().err


def test_parse_time() -> None:
    assert parse_time("2026-11-01") == 1793491200.0
    assert parse_time("2026-11-01T06:00:00+01:00") == 1793491200.0 + 5 * 3600
    assert parse_time("1793491200") == 1793491200.0
    assert parse_time("7d", now=1793491200.0) == 1793491200.0 - 7 * 86400
    with pytest.raises(argparse.ArgumentTypeError):
        parse_time("last tuesday")


def test_run_every_keeps_the_cadence_and_survives_failures() -> None:
    clock = [1000.0]
    sleeps: list[float] = []
    durations = iter([10.0, 5.0, 200.0, 1.0])
    outcomes = iter([True, "boom", True, False])

    def run_once() -> bool:
        clock[0] += next(durations)
        outcome = next(outcomes)
        if outcome == "boom":
            raise RuntimeError("training failed")
        return bool(outcome)

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        clock[0] += seconds

    succeeded = run_every(100.0, run_once, sleep=sleep, clock=lambda: clock[0], max_runs=4)
    assert succeeded == 2
    # runs start at 1000, 1100, 1200; the third overran (200 s) so the fourth starts at once
    assert sleeps == [90.0, 95.0]


def run_info(hr: float) -> RunInfo:
    return RunInfo(
        data=DataRange(source="tiny", start=1793491200.0, end=1793577600.0, rows=1234),
        metrics={"hr@10": hr},
    )


async def test_models_list_promote_rollback(
    registry: ModelRegistry,
    settings: Settings,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COLUMNS", "220")
    assert await cli(["models", "list"], settings) == 0
    assert "no published versions" in capsys.readouterr().out

    v1 = await registry.publish(TinyModel().fit([]), run_info(0.25))
    v2 = await registry.publish(TinyModel().fit([]), run_info(0.5))

    assert await cli(["models", "list", "--json"], settings) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(v["version"], v["current"]) for v in listed] == [
        (v1.version, False),
        (v2.version, True),
    ]
    assert listed[0]["metrics"] == {"hr@10": 0.25}
    assert listed[0]["data"]["rows"] == 1234

    assert await cli(["models", "list", "tiny"], settings) == 0
    table = capsys.readouterr().out
    assert v1.version in table
    assert "HR@10" in table
    assert "2026-11-01 00:00 → 2026-11-02 00:00" in table
    current_line = next(line for line in table.splitlines() if v2.version in line)
    assert "●" in current_line
    assert "0.5000" in current_line
    assert "1,234" in current_line
    assert "●" not in next(line for line in table.splitlines() if v1.version in line)

    assert await cli(["models", "rollback", "tiny"], settings) == 0
    assert f"rolled back from {v2.version} to {v1.version}" in capsys.readouterr().out
    assert await registry.current("tiny") == v1.version

    assert await cli(["models", "promote", "tiny", v2.version], settings) == 0
    assert f"now serving {v2.version}" in capsys.readouterr().out
    assert await registry.current("tiny") == v2.version

    assert await cli(["models", "show", "tiny"], settings) == 0
    assert json.loads(capsys.readouterr().out)["version"] == v2.version

    with pytest.raises(ResourceNotFound):
        await cli(["models", "promote", "tiny", "20200101T000000.000Z-000000"], settings)
    assert await registry.current("tiny") == v2.version

    assert await cli(["models", "gc", "tiny", "--keep", "1", "--sweep"], settings) == 0
    assert "retired 1 version" in capsys.readouterr().out
    assert [v.version for v in await registry.versions("tiny")] == [v2.version]


async def test_train_once_publishes_and_reports(
    registry: ModelRegistry,
    settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    asked: dict[str, Any] = {}

    specs: list[ModelSpec[Any]] = [ModelSpec("tiny", tiny)]

    def setup(source: str, path: Path | None, settings: Settings, **window: Any) -> Any:
        asked.update(source=source, path=path, **window)
        return plan(), specs

    monkeypatch.setattr(sources, "training_setup", setup)
    out = tmp_path / "report.json"
    argv = ["train", "--source", "csv", "--path", "x.csv", "--start", "2026-11-01"]
    assert await cli([*argv, "--json", str(out)], settings) == 0

    assert asked == {
        "source": "csv",
        "path": Path("x.csv"),
        "start": 1793491200.0,
        "end": None,
        "wanted": None,
    }
    report = json.loads(out.read_text())
    assert report["ok"]
    version = report["models"][0]["version"]
    assert await registry.current("tiny") == version
    printed = capsys.readouterr().out
    assert "stage timings" in printed
    assert "serving" in printed

    # a run whose model fails exits 1 and leaves the serving version alone
    specs[:] = [ModelSpec("tiny", lambda p: TinyModel(fail_after=0))]
    assert await cli(["train", "--source", "csv"], settings) == 1
    assert await registry.current("tiny") == version


def write_interactions(path: Path) -> None:
    """A Personalize CSV: two disjoint clusters of items over three days."""
    rows = ["USER_ID,ITEM_ID,TIMESTAMP,EVENT_TYPE,EVENT_VALUE"]
    t0 = 1_793_491_200
    for user in range(12):
        cluster = "a" if user % 2 else "b"
        for step in range(8):
            item = f"{cluster}{(user + step) % 5}"
            kind = "purchase" if step == 7 else "view"
            rows.append(f"u{user},{item},{t0 + step * 30_000 + user * 60},{kind},")
    path.write_text("\n".join(rows) + "\n")


async def test_train_publishes_the_real_models_from_a_personalize_csv(
    registry: ModelRegistry,
    settings: Settings,
    redis_client: aioredis.Redis,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    csv_path = tmp_path / "interactions.csv"
    write_interactions(csv_path)
    out = tmp_path / "report.json"
    argv = ["train", "--source", "csv", "--path", str(csv_path), "--json", str(out)]
    assert await cli([*argv, "--models", "popularity,item2item"], settings) == 0

    report = json.loads(out.read_text())
    assert [m["name"] for m in report["models"]] == ["popularity", "item2item"]
    assert all(m["error"] is None for m in report["models"])
    assert report["data"]["rows"] == 96
    for model in report["models"]:
        assert set(model["metrics"]) >= {"hr@10", "ndcg@10", "hr@20", "mrr@20"}
    assert await registry.names() == ["item2item", "popularity"]
    keys = Keys(settings.namespace)
    version = await current_version(redis_client, keys, "item2item")
    assert version is not None
    assert version == report["models"][1]["version"]
    manifest = await registry.manifest("item2item", version)
    assert manifest["search"]["trials"]
    assert manifest["redis"]["records"] > 0
    assert manifest["data"]["source"] == str(csv_path)
    prefix = manifest["redis"]["prefix"]
    assert prefix.endswith(f"{version}:")
    prefix_keys = [k async for k in redis_client.scan_iter(match=prefix + "*", count=1000)]
    assert len(prefix_keys) == manifest["redis"]["records"]
    # serving reads the neighbours: a cluster's items, never the other cluster's
    neighbours = await read_current(redis_client, keys, "item2item", "nbr:a1", limit=10)
    assert neighbours is not None
    assert neighbours.kind == "zset"
    assert isinstance(neighbours.value, list)
    assert neighbours.value
    assert {item[0] for item, _ in neighbours.value} == {"a"}
    top = await read_current(redis_client, keys, "popularity", "top", limit=3)
    assert top is not None
    assert isinstance(top.value, list)
    assert len(top.value) == 3

    # Redis loses the model; `models restore` rebuilds it from S3 with the real class
    await redis_client.unlink(*[k async for k in redis_client.scan_iter(match=prefix + "*")])
    await redis_client.hdel(registry.versions_key("item2item"), version)
    assert await cli(["models", "restore", "item2item"], settings) == 0
    assert f"restored {version}" in capsys.readouterr().out
    again = await read_current(redis_client, keys, "item2item", "nbr:a1", limit=10)
    assert again is not None
    assert again.value == neighbours.value

    with pytest.raises(ConfigurationError, match="unknown model"):
        await cli([*argv, "--models", "nonsense"], settings)
    # with --every too: a wrong option stops the command instead of failing every run
    with pytest.raises(ConfigurationError, match="unknown model"):
        await cli([*argv, "--models", "nonsense", "--every", "1h"], settings)


async def test_train_every_runs_on_the_schedule(
    registry: ModelRegistry, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from training import commands

    monkeypatch.setattr(
        sources, "training_setup", lambda *a, **k: (plan(), [ModelSpec("tiny", tiny)])
    )
    waits: list[float] = []

    def two_runs(interval: float, run_once: Any, **kwargs: Any) -> int:
        waits.append(interval)
        return run_every(interval, run_once, sleep=lambda s: None, max_runs=2, **kwargs)

    monkeypatch.setattr(commands, "run_every", two_runs)
    assert await cli(["train", "--source", "csv", "--every", "6h"], settings) == 0
    assert waits == [6 * 3600]
    versions = await registry.versions("tiny")
    assert len(versions) == 2
    assert versions[-1].current


async def test_train_on_the_s3_archive_within_a_window(
    registry: ModelRegistry, settings: Settings, tmp_path: Path
) -> None:
    from streams.schema import Event
    from training.archive import write_events

    now = time.time()
    events = [
        Event(
            event_type="purchase" if step == 7 else "view",
            user_id=f"u{user}",
            item_id=f"{'ab'[user % 2]}{(user + step) % 4}",
            timestamp=now - 3 * 86400 + step * 30_000 + user,
            namespace=settings.namespace,
        )
        for user in range(10)
        for step in range(8)
    ]
    await write_events(settings, events)
    out = tmp_path / "report.json"
    argv = ["train", "--source", "archive", "--models", "popularity", "--json", str(out)]
    assert await cli(argv, settings) == 0
    report = json.loads(out.read_text())
    assert report["data"]["rows"] == 80
    assert report["data"]["source"].startswith(f"archive s3://{settings.bucket}")

    # --start 2d: only the events of the last two days
    assert await cli([*argv, "--start", "2d"], settings) == 0
    recent = sum(e.timestamp >= now - 2 * 86400 for e in events)
    assert 0 < recent < 80
    assert json.loads(out.read_text())["data"]["rows"] == recent
    assert len(await registry.versions("popularity")) == 2


def test_max_drop_is_a_fraction(capsys: pytest.CaptureFixture[str]) -> None:
    assert build_parser().parse_args(["train", "--max-drop", "0.3"]).max_drop == 0.3
    assert build_parser().parse_args(["train"]).max_drop is None
    for bad in ("1", "-0.1", "lots"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["train", "--max-drop", bad])
        assert "not a fraction" in capsys.readouterr().err
