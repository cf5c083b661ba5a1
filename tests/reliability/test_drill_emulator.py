"""Drill: the AWS emulator restarts while events are being posted.

Real processes: a private moto (through `recstream.emulator`, state on disk, as `recstream
up` runs it), the API on uvicorn, a `recstream agents` worker, a private redis-server.
A client posts small batches without pause. The emulator is stopped (SIGTERM) mid-stream,
stays down while the client keeps posting, and is started again on the same port.

Checked: every answer is a 202 or a 503 carrying ``Retry-After`` (no 500, no hang);
every event id the collector acknowledged (listed under ``accepted``, whatever the
status) is applied by the agents once the emulator is back; none is applied twice.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from recstream import stack
from serving.app import create_app
from tests.conftest import serve_in_thread
from tests.reliability.drillkit import (
    Poster,
    agents,
    applied_ids,
    drill_settings,
    private_moto,
    private_redis,
    wait_for,
)

USERS = 20


@pytest.mark.timeout(240)
async def test_an_emulator_restart_answers_503_and_loses_no_acknowledged_event(
    tmp_path: Path,
) -> None:
    port = stack.free_port()
    with private_redis(tmp_path) as redis_server, private_moto(tmp_path, port) as first_moto:
        settings = drill_settings(
            f"redis://127.0.0.1:{redis_server.port}/0", first_moto.url, stream_shards=2
        )
        api_port = stack.free_port()
        log = tmp_path / "worker" / "agents.log"
        log.parent.mkdir()
        client = aioredis.from_url(settings.redis_url)
        poster = Poster(f"http://127.0.0.1:{api_port}", users=USERS)
        actors = [f"u{n}" for n in range(USERS)]
        try:
            with serve_in_thread(create_app(settings), api_port), agents(settings, log):
                posting = asyncio.create_task(poster.run())

                async def accepted_at_least(n: int) -> bool:
                    if posting.done():
                        posting.result()  # a client error fails the drill here
                    return len(poster.accepted) >= n

                await wait_for(lambda: accepted_at_least(50), "50 events accepted", 60, log)
                first_moto.stop()  # SIGTERM: the emulator saves its state and exits
                refusals_before = poster.refusals()

                async def refused_while_down() -> bool:
                    if posting.done():
                        posting.result()
                    return poster.refusals() >= refusals_before + 1

                await wait_for(refused_while_down, "503s while the emulator is down", 120, log)
                accepted_during_outage = len(poster.accepted)
                with private_moto(tmp_path, port):
                    await wait_for(
                        lambda: accepted_at_least(accepted_during_outage + 50),
                        "events accepted after the restart",
                        120,
                        log,
                    )
                    poster.stop.set()
                    await posting

                    async def all_applied() -> bool:
                        return set(poster.accepted) <= await applied_ids(
                            client, settings.namespace, actors
                        )

                    await wait_for(all_applied, "every accepted event applied", 120, log)
                    applied = await applied_ids(client, settings.namespace, actors)
        finally:
            await client.aclose()
    assert set(poster.statuses) <= {202, 503}, poster.statuses
    assert poster.missing_retry_after == 0
    assert len(poster.accepted) == len(set(poster.accepted))
    assert set(poster.accepted) <= applied
    # Some refused ids may have landed (a call that reached Kinesis but whose answer was
    # lost is reported failed); the sender would resend them, and the agents dedup by id.
    assert applied <= set(poster.accepted) | set(poster.refused)
    print(
        f"\nDRILL emulator-restart: posted {next(poster.counter)} events, "
        f"accepted {len(poster.accepted)}, refused {len(poster.refused)} "
        f"({poster.refusals()} answers 503), applied {len(applied)}, lost 0"
    )
