"""Drill: Kinesis throttles the collector's writes and the agents' reads.

Real processes: the API on uvicorn, a `recstream agents` worker (serving its /metrics),
the session's moto and Redis. Kinesis (for both) is moto, or kinesis-mock (real-style
56-digit sequence numbers), behind a test-side proxy that
answers as Kinesis does when shards are over their limits (tests/reliability/faultproxy.py;
no emulator throttles by itself). Two clients post small batches without pause while the
proxy goes through three phases, each ended by what it must show, never by a clock:

1. one hot shard: each record bound for shard 0 is refused once with
   ``ProvisionedThroughputExceededException`` inside an otherwise successful PutRecords
   (a partial failure), then accepted; until 20 such events were acknowledged;
2. every shard throttled, writes (every record of a PutRecords refused, or the whole
   call) and reads (GetRecords answers 400): until both clients
   got a 503 and the worker's /metrics counts a GetRecords that failed throttled;
3. nothing throttled: until 50 more events were acknowledged.

Checked: every answer is a 202, or a 503 carrying ``Retry-After``; records refused inside
a call are retried by the collector (events refused by the proxy were acknowledged with a
202); reading the stream back from the emulator, every acknowledged event is on it exactly
once, and nothing else but refused events; the agents, reading through throttled
GetRecords, go on and apply every acknowledged event.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import orjson
import pytest
import redis.asyncio as aioredis

from recstream import stack
from recstream.aws import async_client
from recstream.settings import Settings
from serving.app import create_app
from streams.envelope import decode
from streams.kinesis.shards import list_shards
from tests.conftest import LocalStack, serve_in_thread
from tests.reliability.drillkit import (
    Poster,
    agents,
    applied_ids,
    drill_settings,
    metric,
    scrape,
    wait_for,
)
from tests.reliability.faultproxy import THROTTLED, FaultProxy, Throttle
from tests.serving.test_collector import raw_records

USERS = 12
THROTTLED_READS = "recstream_aws_call_errors_total"
GET_RECORDS = {"service": "kinesis", "operation": "GetRecords", "error": THROTTLED}


def stream_ids(settings: Settings) -> Counter[str]:
    """How many times each event id is on the stream, read from the emulator itself."""
    return Counter(
        orjson.loads(message.value)["event_id"]
        for record in raw_records(settings)
        for message in decode(record["Data"])
    )


@pytest.mark.timeout(240)
@pytest.mark.parametrize("engine", ["moto", "kinesis-mock"])
async def test_kinesis_throttling_answers_503_and_acknowledged_events_land_once(
    local_stack: LocalStack, tmp_path: Path, engine: str
) -> None:
    direct = drill_settings(
        local_stack.redis_url,
        local_stack.moto_url,
        kinesis_endpoint_url=local_stack.kinesis_mock_url if engine == "kinesis-mock" else None,
        stream_shards=2,
    )
    async with async_client(direct, "kinesis") as kinesis:
        shard_map = await list_shards(kinesis, direct.stream_name)
    hot = min(shard_map.shards)
    proxy = FaultProxy(direct.kinesis_endpoint or "", shard_map)
    await proxy.start(stack.free_port())
    # The API and the worker see Kinesis only through the proxy; the rest is moto's.
    settings = direct.model_copy(update={"kinesis_endpoint_url": proxy.url})
    api_port, metrics_port = stack.free_port(), stack.free_port()
    log = tmp_path / "worker" / "agents.log"
    log.parent.mkdir()
    client = aioredis.from_url(settings.redis_url)
    url = f"http://127.0.0.1:{api_port}"
    posters = [Poster(url, users=USERS, prefix=f"t{n}-") for n in range(2)]
    try:
        with (
            serve_in_thread(create_app(settings), api_port),
            agents(settings, log, metrics_port=metrics_port),
        ):
            tasks = [asyncio.create_task(p.run()) for p in posters]

            def check_posting() -> None:
                for task in tasks:
                    if task.done():
                        task.result()  # a client error fails the drill here

            def accepted() -> list[str]:
                return [i for p in posters for i in p.accepted]

            # 1. one hot shard: partial failures, retried inside the collector
            proxy.throttle = Throttle(hot_shards=frozenset({hot}))

            async def retried_and_acknowledged() -> bool:
                check_posting()
                return len(set(accepted()) & set(proxy.refused_ids)) >= 20

            await wait_for(retried_and_acknowledged, "refused records acknowledged", 60, log)
            # 2. every shard throttled, reads too
            before = [p.refusals() for p in posters]
            proxy.throttle = Throttle(every_put=True, get_records=True)

            async def refused_writes_and_reads() -> bool:
                check_posting()
                if not all(p.refusals() > n for p, n in zip(posters, before, strict=True)):
                    return False
                # (botocore retries a throttled read before the reader sees it fail)
                return metric(await scrape(metrics_port), THROTTLED_READS, **GET_RECORDS) > 0

            await wait_for(
                refused_writes_and_reads, "503s and throttled reads in the worker", 90, log
            )
            # 3. throttling over
            proxy.throttle = Throttle()
            during = len(accepted())

            async def accepting_again() -> bool:
                check_posting()
                return len(accepted()) >= during + 50

            await wait_for(accepting_again, "events accepted after the throttling", 60, log)
            for poster in posters:
                poster.stop.set()
            await asyncio.gather(*tasks)
            acknowledged = set(accepted())
            actors = [f"u{n}" for n in range(USERS)]

            async def all_applied() -> bool:
                return acknowledged <= await applied_ids(client, settings.namespace, actors)

            await wait_for(all_applied, "every acknowledged event applied", 120, log)
            applied = await applied_ids(client, settings.namespace, actors)
            samples = await scrape(metrics_port)
    finally:
        await client.aclose()
        await proxy.close()
    on_stream = await asyncio.to_thread(stream_ids, direct)
    statuses = Counter(s for p in posters for s in p.statuses)
    refused = {i for p in posters for i in p.refused}
    posted = sum(next(p.counter) for p in posters)
    throttled_reads = metric(samples, THROTTLED_READS, **GET_RECORDS)
    assert set(statuses) <= {202, 503}, statuses
    assert sum(p.missing_retry_after for p in posters) == 0
    assert len(acknowledged) == sum(len(p.accepted) for p in posters)  # no id acked twice
    duplicates = {i: n for i, n in on_stream.items() if i in acknowledged and n != 1}
    assert not duplicates, f"acknowledged events not on the stream exactly once: {duplicates}"
    assert acknowledged <= set(on_stream)
    # A refused event may have landed only if its call was cut off by the collector's
    # deadline after reaching the emulator; the sender resends it, the agents dedup.
    assert set(on_stream) <= acknowledged | refused
    assert acknowledged <= applied
    assert throttled_reads > 0, "the worker's /metrics did not count the throttled reads"
    landed_refused = len(refused & set(on_stream))
    print(
        f"\nDRILL kinesis-throttling ({engine}): posted {posted} events, answers {dict(statuses)}; "
        f"acknowledged {len(acknowledged)} (each once on the stream), of which "
        f"{len(acknowledged & set(proxy.refused_ids))} after a per-record refusal; refused "
        f"{len(refused)} ({landed_refused} landed anyway); records refused by the proxy "
        f"{sum(proxy.refused_ids.values())}, calls refused whole {proxy.refused_calls}, "
        f"GetRecords refused {proxy.refused_gets} "
        f"(worker counted {throttled_reads:.0f} after botocore's retries); applied "
        f"{len(applied)}, lost 0"
    )
