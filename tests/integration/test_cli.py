"""`recstream up` / `down` as a user runs them: child processes, custom ports, pid files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from recstream import stack
from recstream.aws import sync_client
from recstream.demo import moved_to_now
from recstream.settings import Settings


def recstream(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "recstream.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def test_up_is_idempotent_and_down_stops_everything(tmp_path: Path) -> None:
    redis_port, moto_port, kinesis_port = (stack.free_port() for _ in range(3))
    settings = Settings(
        redis_url=f"redis://127.0.0.1:{redis_port}/0",
        aws_endpoint_url=f"http://127.0.0.1:{moto_port}",
        kinesis_endpoint_url=f"http://127.0.0.1:{kinesis_port}",
        state_dir=tmp_path / "state",
        kinesis_mock_dir=Settings().kinesis_mock_dir.resolve(),
    )
    env = {**os.environ, **settings.to_env()}
    try:
        first = recstream(["up"], env)
        assert first.returncode == 0, first.stderr
        assert f"redis-server on 127.0.0.1:{redis_port}" in first.stdout
        assert f"kinesis-mock on http://127.0.0.1:{kinesis_port}" in first.stdout
        assert all(stack.port_open(p) for p in (redis_port, moto_port, kinesis_port))
        shards = sync_client(settings, "kinesis").list_shards(StreamName=settings.stream_name)
        assert len(shards["Shards"]) == settings.stream_shards

        second = recstream(["up"], env)
        assert second.returncode == 0, second.stderr
        assert "already running" in second.stdout
    finally:
        down = recstream(["down"], env)
    assert down.returncode == 0, down.stderr
    assert "redis-server" in down.stdout
    assert not any(stack.port_open(p) for p in (redis_port, moto_port, kinesis_port))
    assert list((tmp_path / "state").glob("*.pid")) == []


def test_bad_settings_are_reported_not_raised(tmp_path: Path) -> None:
    env = {**os.environ, "RECSTREAM_STREAM_SHARDS": "zero"}
    result = recstream(["up"], env)
    assert result.returncode == 2
    assert "stream_shards" in result.stderr


def api_answers(url: str) -> bool:
    try:
        httpx.get(f"{url}/healthz", timeout=2)
    except httpx.HTTPError:
        return False
    return True


def test_the_demo_moves_the_replay_to_the_present() -> None:
    events = [{"event_id": "a", "timestamp": 100.0}, {"event_id": "b", "timestamp": 160.0}]
    assert moved_to_now(events, now=10_000.0) == [
        {"event_id": "a", "timestamp": 9_880.0},  # the gaps kept, the newest a minute ago
        {"event_id": "b", "timestamp": 9_940.0},
    ]
    assert moved_to_now([]) == []


@pytest.mark.timeout(600)  # two whole demos (stack start, training, replay): a hang guard
def test_demo_runs_end_to_end_on_its_own_ports(tmp_path: Path) -> None:
    ports = [stack.free_port() for _ in range(3)]
    settings = Settings(
        redis_url=f"redis://127.0.0.1:{ports[0]}/0",
        aws_endpoint_url=f"http://127.0.0.1:{ports[1]}",
        api_port=ports[2],
        state_dir=tmp_path / "state",
        poll_interval_s=0.05,
    )
    env = {**os.environ, **settings.to_env(), "COLUMNS": "200"}

    def demo() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "recstream.cli", "demo", "--no-wait", "--events", "3000"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    def demo_until_sigterm() -> subprocess.CompletedProcess[str]:
        # The second run stays up serving, as `./dev demo` does, until a SIGTERM (a
        # `kill`, a closing terminal): it must stop its agents and API on the way out,
        # which Python's default SIGTERM handling (no `finally`) left running.
        process = subprocess.Popen(
            [sys.executable, "-m", "recstream.cli", "demo", "--events", "3000"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert process.stdout is not None
        lines = []
        for line in process.stdout:
            lines.append(line)
            if "serving until Ctrl-C" in line:
                process.send_signal(signal.SIGTERM)
                break
        out, err = process.communicate(timeout=60)
        return subprocess.CompletedProcess(
            process.args, process.returncode, "".join(lines) + out, err
        )

    try:
        result = demo()
        again = demo_until_sigterm()
        api_after_sigterm = api_answers(settings.api_url)
    finally:
        recstream(["down"], env)
    assert again.returncode == 143, again.stdout + again.stderr
    assert not api_after_sigterm, "the demo's API outlived its SIGTERM"
    assert "serving until Ctrl-C" in again.stdout
    assert "already replayed" in again.stdout
    assert "already serving; not retraining" in again.stdout
    assert "changed recommendations in" in again.stdout
    assert result.returncode == 0, result.stdout + result.stderr
    # A new visitor's first answer, asked once /readyz says the API is warm: popular films
    # (the replay moved to the present, so the decayed popularity is not ~0 everywhere)
    for run in (result, again):
        before = run.stdout.split("before any click", 1)[1].split("clicking live", 1)[0]
        assert before.count("popular") >= 3, before
    out = result.stdout
    assert "3000 events accepted" in out
    assert "after the clicks" in out
    after = out[out.index("after the clicks") :]
    assert "Toy Story (1995)" in after
    assert "recently interacted" in after
    assert "similar to Toy Story" in after  # the item-to-item model the demo trained
    assert "changed recommendations in" in out
