"""`recstream serve --workers 2`: two API processes on one port, answering as one, with
one /metrics for both (prometheus-client's multiprocess mode)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from recstream import prom, stack
from tests.conftest import LocalStack, make_settings


async def test_two_workers_answer_and_share_their_metrics(
    local_stack: LocalStack, tmp_path: Path
) -> None:
    settings = make_settings(local_stack, state_dir=tmp_path)
    port = stack.free_port()
    log = (tmp_path / "serve.log").open("wb")
    server = subprocess.Popen(  # noqa: ASYNC220 (a server for the test to talk to)
        [sys.executable, "-m", "recstream.cli", "serve", "--port", str(port), "--workers", "2"],
        env={**os.environ, **settings.to_env()},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            await _ready(client, server, tmp_path / "serve.log")
            # separate connections, so the kernel spreads them over both processes
            for n in range(40):
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as fresh:
                    response = await fresh.get("/v1/recommendations", params={"user_id": f"u{n}"})
                    assert response.status_code == 200, response.text
            # each process adds its observations to the shared files once a second
            # (recstream/prom.py); the one answering /metrics adds its own at once
            await asyncio.sleep(prom.FLUSH_EVERY_S + 0.5)
            scrapes = []
            for _ in range(6):
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as fresh:
                    scrapes.append(_count((await fresh.get("/metrics")).text))
        # whichever process answered /metrics counted the requests of both
        assert min(scrapes) >= 40, scrapes
        files = list((tmp_path / "metrics" / str(port)).glob("histogram_*.db"))
        assert len({f.stem.rsplit("_", 1)[1] for f in files}) >= 2  # two processes wrote
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(5)
        log.close()


def _count(metrics: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("recstream_http_request_seconds_count")
        and 'route="/v1/recommendations"' in line
    )


async def _ready(client: httpx.AsyncClient, server: subprocess.Popen[bytes], log: Path) -> None:
    for _ in range(600):
        if server.poll() is not None:
            raise AssertionError(f"recstream serve exited:\n{log.read_text()[-3000:]}")  # noqa: ASYNC240
        try:
            if (await client.get("/healthz")).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError("the API did not start within 60 s")
