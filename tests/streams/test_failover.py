"""Two worker processes share four shards; one is SIGKILLed and the other takes over.

Every worker records each event it processes (worker, partition, event id) in a Redis
list, so the test can check that nothing is lost and that the only duplicates are the
killed worker's last, uncommitted messages on each of its shards.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from recstream.settings import Settings
from streams.leases import DynamoDBLeaseStore, LeaseInfo
from tests.conftest import REPO, LocalStack, make_settings
from tests.streams.kinesis_helpers import make_events, owner_name, put_events
from tests.streams.worker_apps import APP_ID, processed_key


class Workers:
    """Worker subprocesses (``python -m streams.kinesis``) started by one test."""

    def __init__(self, settings: Settings, logdir: Path) -> None:
        self.settings = settings
        self.logdir = logdir
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, worker_id: str) -> None:
        env = {**os.environ, **self.settings.to_env(), "RECSTREAM_WORKER_ID": worker_id}
        with (self.logdir / f"{worker_id}.log").open("wb") as log:
            self.processes[worker_id] = subprocess.Popen(
                [
                    sys.executable, "-m", "streams.kinesis",
                    "tests.streams.worker_apps:recording_app", "--log-level", "INFO",
                ],
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def log(self, worker_id: str, tail: int = 3000) -> str:
        return (self.logdir / f"{worker_id}.log").read_text(errors="replace")[-tail:]

    def stop_all(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


@pytest.fixture
def workers_factory(tmp_path: Path) -> Iterator[list[Workers]]:
    made: list[Workers] = []
    yield made
    for workers in made:
        workers.stop_all()


async def leases_of(settings: Settings) -> list[LeaseInfo]:
    async with DynamoDBLeaseStore(settings) as store:
        return await store.list_leases(f"{APP_ID}#{settings.stream_name}")


@pytest.mark.parametrize("kinesis_mock", [False, True], ids=["moto", "kinesis_mock"])
async def test_a_sigkilled_workers_shards_are_taken_over_without_loss(
    local_stack: LocalStack,
    workers_factory: list[Workers],
    tmp_path: Path,
    kinesis_mock: bool,
) -> None:
    settings = make_settings(
        local_stack,
        kinesis_mock=kinesis_mock,
        stream_shards=4,
        lease_duration_s=2.0,
        poll_interval_s=0.05,
    )
    workers = Workers(settings, tmp_path)
    workers_factory.append(workers)
    redis = aioredis.from_url(settings.redis_url)
    key = processed_key(settings)

    async def processed() -> list[tuple[str, int, str]]:
        rows = await redis.lrange(key, 0, -1)
        out = []
        for row in rows:
            text = row.decode() if isinstance(row, bytes) else row
            worker, partition, event_id = text.split()
            out.append((worker, int(partition), event_id))
        return out

    try:
        workers.start("w1")
        workers.start("w2")
        owners: Counter[str | None] = Counter()

        async def balanced() -> bool:
            owners.clear()
            owners.update(owner_name(lease.owner) for lease in await leases_of(settings))
            return owners == Counter({"w1": 2, "w2": 2})

        await _wait_async(balanced, 60, lambda: f"2+2 leases (now {owners})", workers)
        # A worker whose lease was just stolen reads on until its next renew refuses; wait
        # until every lease was renewed a few times, so no such overlap is left.
        counters = {lease.shard_id: lease.counter for lease in await leases_of(settings)}

        async def settled() -> bool:
            leases = await leases_of(settings)
            return all(lease.counter >= counters[lease.shard_id] + 3 for lease in leases) and (
                await balanced()
            )

        await _wait_async(settled, 60, lambda: "the leases to settle", workers)

        first = make_events(800, users=40, prefix="a")
        landed = await put_events(settings, first)
        last_of_first: dict[str, int] = {}
        for where in landed:
            number = int(where.sequence_number)
            last_of_first[where.shard_id] = max(number, last_of_first.get(where.shard_id, 0))
        rows: list[tuple[str, int, str]] = []

        async def first_processed_and_checkpointed() -> bool:
            # Every shard's checkpoint is at (or past) the last record of the first batch.
            rows[:] = await processed()
            return all(
                lease.shard_id not in last_of_first
                or (
                    lease.checkpoint.sequence_number.isdigit()
                    and int(lease.checkpoint.sequence_number) >= last_of_first[lease.shard_id]
                )
                for lease in await leases_of(settings)
            )

        await _wait_async(
            first_processed_and_checkpointed, 60, lambda: "the first batch committed", workers
        )
        second = make_events(800, users=40, prefix="b")
        await put_events(settings, second)

        async def some_of_second_processed_by_w1() -> bool:
            rows[:] = await processed()
            return sum(1 for w, _, e in rows if w == "w1" and e.startswith("b")) >= 100

        await _wait_async(
            some_of_second_processed_by_w1, 60, lambda: "w1 to process events", workers
        )
        workers.processes["w1"].send_signal(signal.SIGKILL)
        workers.processes["w1"].wait(10)
        w1_shards = {
            lease.shard_id for lease in await leases_of(settings) if owner_name(lease.owner) == "w1"
        }
        assert len(w1_shards) == 2

        third = make_events(400, users=40, prefix="c")
        await put_events(settings, third)
        sent = {e.event_id for e in first + second + third}

        async def all_processed() -> bool:
            rows[:] = await processed()
            return {event_id for _, _, event_id in rows} >= sent

        await _wait_async(all_processed, 90, lambda: "every event to be processed", workers)
        assert {owner_name(lease.owner) for lease in await leases_of(settings)} == {"w2"}
    finally:
        await redis.aclose()

    counts = Counter(event_id for _, _, event_id in rows)
    assert set(counts) == sent
    duplicated = {event_id for event_id, n in counts.items() if n > 1}
    # What was checkpointed before the kill is never processed again ...
    repeated = Counter((w, p) for w, p, e in rows if e in duplicated and e.startswith("a"))
    assert not repeated, f"checkpointed events processed again: {repeated}\n" + "\n".join(
        f"--- {w}\n{workers.log(w)}" for w in workers.processes
    )
    # The survivor never processes an event twice ...
    survivor = Counter(e for w, _, e in rows if w == "w2")
    assert max(survivor.values()) == 1
    # ... and the killed worker's duplicates are, per shard, a suffix of what it
    # processed: the batch acked after its last checkpoint.
    per_partition: dict[int, list[str]] = defaultdict(list)
    for worker, partition, event_id in rows:
        if worker == "w1":
            per_partition[partition].append(event_id)
    for partition, ids in per_partition.items():
        flags = [event_id in duplicated for event_id in ids]
        first_dup = flags.index(True) if True in flags else len(flags)
        assert all(flags[first_dup:]), f"partition {partition}: a duplicate before a checkpoint"
    assert duplicated <= {e for w, _, e in rows if w == "w1"}


async def _wait_async(check: object, timeout: float, what: object, workers: Workers) -> None:  # noqa: ASYNC109
    import asyncio

    assert callable(check)
    assert callable(what)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        for worker_id, process in workers.processes.items():
            if process.poll() is not None and process.returncode != -signal.SIGKILL:
                raise AssertionError(f"worker {worker_id} died:\n{workers.log(worker_id)}")
        if loop.time() > deadline:
            logs = "\n".join(f"--- {w}\n{workers.log(w)}" for w in workers.processes)
            raise AssertionError(f"timed out waiting for {what()}\n{logs}")
        await asyncio.sleep(0.2)


def test_a_worker_for_a_missing_stream_exits_saying_so(settings: Settings, tmp_path: Path) -> None:
    missing = settings.model_copy(update={"stream_name": f"{settings.stream_name}-missing"})
    result = subprocess.run(
        [sys.executable, "-m", "streams.kinesis", "tests.streams.worker_apps:recording_app"],
        cwd=REPO,
        env={**os.environ, **missing.to_env(), "RECSTREAM_WORKER_ID": "w"},
        capture_output=True,
        timeout=60,
        check=False,
    )
    output = (result.stdout + result.stderr).decode(errors="replace")
    assert result.returncode != 0, output
    assert f"{missing.stream_name!r}" in output
    assert "not found" in output
