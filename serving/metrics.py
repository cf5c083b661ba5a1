"""Prometheus metrics of the API, served at ``GET /metrics`` (docs/observability.md).

Besides the counters and histograms below, two families are computed when scraped, from
the running app (so a model version or a shard that is gone is gone from the scrape):

* `ModelVersions`: ``recstream_serving_model_info{namespace, model, version} 1`` for
  every model version this process holds in memory and serves.
* `StreamPositions`: the agents' lag and checkpoint age per shard, read by the API from
  the lease table and Kinesis every ``RECSTREAM_STREAM_STATUS_INTERVAL_S``. Read here
  rather than reported by the workers because the case that matters most is the one in
  which no worker is running to report anything: a dead fleet shows a growing lag and
  checkpoint age instead of silence. (Each worker's own view, MillisBehindLatest of its
  reads, is ``recstream_stream_millis_behind_latest`` on its metrics port.)

The Redis and AWS call latencies are recstream/tracing.py's (shared with any process
that instruments its clients).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from botocore.exceptions import BotoCoreError, ClientError
from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from recstream.aws import async_client
from recstream.errors import RecstreamError
from recstream.settings import Settings
from streams.leases import SHARD_END, TRIM_HORIZON, DynamoDBLeaseStore, LeaseInfo

if TYPE_CHECKING:
    from types_aiobotocore_dynamodb import DynamoDBClient
    from types_aiobotocore_kinesis import KinesisClient

__all__ = [
    "ANSWER_CACHE",
    "EVENTS",
    "FRESHNESS",
    "LIVE",
    "RANK_DEGRADED",
    "RANK_LATENCY",
    "SERVED_LOG_DROPPED",
    "SOURCE_LATENCY",
    "STREAM_STATUS_ERRORS",
    "ModelVersions",
    "ShardPosition",
    "StreamPositions",
    "stream_positions",
    "watch_models",
]

log = logging.getLogger(__name__)

EVENTS = Counter(
    "recstream_collector_events_total",
    "Events posted to the collector, by outcome (accepted, rejected, failed).",
    ["outcome"],
)
RANK_LATENCY = Histogram(
    "recstream_ranking_seconds",
    "Time to answer one recommendation request.",
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0),
)
RANK_DEGRADED = Counter(
    "recstream_ranking_degraded_total",
    "Recommendation requests answered without a store that missed its deadline.",
    ["store"],
)
ANSWER_CACHE = Counter(
    "recstream_answer_cache_total",
    "Recommendation answers looked up in the answer cache (serving/pipeline/memo.py): a hit "
    "is served again with a new recommendation id, a miss is computed.",
    ["result"],
)
SERVED_LOG_DROPPED = Counter(
    "recstream_served_log_dropped_total",
    "Served lists not recorded for attribution (too many writes pending, or Redis failed).",
)
FRESHNESS = Histogram(
    "recstream_freshness_seconds",
    "Time from a click's acceptance by the stream to the first recommendation response that "
    "reflects it.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0),
)
FRESHNESS_RECENT = Gauge(
    "recstream_freshness_recent_seconds",
    "Freshness (as recstream_freshness_seconds) at quantile 0.5 and 0.95 over this API "
    "process's newest observations (the last 1,024 within 5 minutes); updated at most once "
    "a second, as responses reflect new clicks.",
    ["quantile"],
    multiprocess_mode="liveall",
)
SOURCE_LATENCY = Histogram(
    "recstream_candidate_source_seconds",
    "Time one candidate source took (including the ones that missed their deadline).",
    ["source"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1),
)
STREAM_STATUS_ERRORS = Counter(
    "recstream_agent_positions_errors_total",
    "Reads of the agents' positions (lease table, Kinesis) that failed; the gauges keep "
    "the last values read, and recstream_agent_positions_read_timestamp_seconds says when.",
)


# --- model versions ------------------------------------------------------------------------


class _LoadedModels(Protocol):
    def loaded_versions(self, namespace: str) -> dict[str, str]: ...


class ModelVersions:
    """The model versions one ranker serves: those it holds in memory for the namespaces
    this deployment serves (``RECSTREAM_NAMESPACES``, else ``RECSTREAM_NAMESPACE``)."""

    def __init__(self, models: _LoadedModels, settings: Settings) -> None:
        self.models = models
        self.namespaces = tuple(dict.fromkeys([*settings.namespaces, settings.namespace]))

    def samples(self) -> Iterator[tuple[str, str, str]]:
        """(namespace, model, version) of every version in use."""
        for namespace in self.namespaces:
            for model, version in sorted(self.models.loaded_versions(namespace).items()):
                yield namespace, model, version


# --- the agents' positions -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ShardPosition:
    """Where one app's checkpoint of one shard stands."""

    app_id: str
    shard_id: str
    lag_s: float
    """Kinesis's MillisBehindLatest for a read just after the checkpoint: how far the
    committed position trails the tip of the shard."""
    checkpoint_age_s: float
    """How long the oldest record past the checkpoint has waited (its approximate arrival
    time to now); 0 when nothing waits. Chosen over "time since the checkpoint was last
    written" because an idle stream's checkpoint rightly never moves, and that must not
    look like a stuck agent."""
    lease_age_s: float
    """Seconds since the lease's owner last wrote it (renewals every few seconds): grows
    without bound when no worker holds the shard."""


async def _position(
    kinesis: KinesisClient, stream: str, app_id: str, lease: LeaseInfo, now: float
) -> ShardPosition | None:
    checkpoint = lease.checkpoint
    if checkpoint.sequence_number == SHARD_END:
        return None  # finished: nothing left to lag behind
    args: dict[str, Any] = {"ShardIteratorType": "TRIM_HORIZON"}
    if checkpoint.sequence_number != TRIM_HORIZON:
        # (A checkpoint inside an aggregated record counts the rest of that record as
        # done: less than one record of error.)
        args = {
            "ShardIteratorType": "AFTER_SEQUENCE_NUMBER",
            "StartingSequenceNumber": checkpoint.sequence_number,
        }
    try:
        iterator = await kinesis.get_shard_iterator(
            StreamName=stream, ShardId=lease.shard_id, **args
        )
        response = await kinesis.get_records(ShardIterator=iterator["ShardIterator"], Limit=1)
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("ResourceNotFoundException", "InvalidArgumentException"):
            return None  # the shard aged out, or the checkpoint is past the retention
        raise
    waiting = response.get("Records", [])
    age = 0.0
    if waiting:
        arrival = waiting[0].get("ApproximateArrivalTimestamp")
        if arrival is not None:
            age = max(0.0, now - arrival.timestamp())
    return ShardPosition(
        app_id=app_id,
        shard_id=lease.shard_id,
        lag_s=response.get("MillisBehindLatest", 0) / 1000,
        checkpoint_age_s=age,
        lease_age_s=max(0.0, now - lease.last_renewed),
    )


class StreamPositions:
    """Reads every app's shard positions on ``settings.stream_name`` every
    ``settings.stream_status_interval_s`` (`run`, a background task of the lifespan) and
    keeps the last read for the scrape. A failed read is logged and counted; the last
    good values stay, with their timestamp."""

    def __init__(self, settings: Settings, kinesis: KinesisClient) -> None:
        self.settings = settings
        self.kinesis = kinesis
        self.rows: list[ShardPosition] = []
        self.read_at: float | None = None

    async def read(
        self, store: DynamoDBLeaseStore, dynamodb: DynamoDBClient
    ) -> list[ShardPosition]:
        from streams.kinesis.status import app_ids

        stream = self.settings.stream_name
        now = time.time()
        rows: list[ShardPosition] = []
        for app_id in await app_ids(self.settings, dynamodb):
            for lease in await store.list_leases(f"{app_id}#{stream}"):
                row = await _position(self.kinesis, stream, app_id, lease, now)
                if row is not None:
                    rows.append(row)
        self.rows = rows
        self.read_at = time.time()
        return rows

    async def run(self) -> None:
        # The clients live as long as the task: making a botocore client costs tens of
        # milliseconds of CPU, a stall of the API's event loop at every read.
        async with (
            DynamoDBLeaseStore(self.settings) as store,
            async_client(self.settings, "dynamodb") as dynamodb,
        ):
            await self._poll(store, dynamodb)

    async def _poll(self, store: DynamoDBLeaseStore, dynamodb: DynamoDBClient) -> None:
        interval = self.settings.stream_status_interval_s
        while True:
            try:
                await self.read(store, dynamodb)
            except (RecstreamError, BotoCoreError, ClientError, OSError) as exc:
                STREAM_STATUS_ERRORS.inc()
                log.warning(
                    "reading the agents' positions on stream %r failed: %s",
                    self.settings.stream_name,
                    exc,
                )
            await asyncio.sleep(interval)


# --- the scrape-time collector ---------------------------------------------------------------


class _Live(Collector):
    """The families computed at scrape time, over every app alive in this process (one
    in production; tests start several)."""

    def __init__(self) -> None:
        self.models: weakref.WeakSet[ModelVersions] = weakref.WeakSet()
        self.positions: weakref.WeakSet[StreamPositions] = weakref.WeakSet()

    def _families(self) -> dict[str, GaugeMetricFamily]:
        shard = ["app", "shard"]
        return {
            "model": GaugeMetricFamily(
                "recstream_serving_model_info",
                "Model versions this process serves (1 per namespace, model and version).",
                labels=["namespace", "model", "version"],
            ),
            "lag": GaugeMetricFamily(
                "recstream_agent_lag_seconds",
                "How far each app's checkpoint trails the tip of each shard "
                "(MillisBehindLatest just after the checkpoint).",
                labels=shard,
            ),
            "age": GaugeMetricFamily(
                "recstream_agent_checkpoint_age_seconds",
                "How long the oldest record past each app's checkpoint has waited (0: none).",
                labels=shard,
            ),
            "lease": GaugeMetricFamily(
                "recstream_agent_lease_age_seconds",
                "Seconds since the holder of each shard's lease last wrote it.",
                labels=shard,
            ),
            "read": GaugeMetricFamily(
                "recstream_agent_positions_read_timestamp_seconds",
                "When the agents' positions were last read (unix seconds).",
            ),
        }

    def describe(self) -> Iterable[GaugeMetricFamily]:
        # Names only: registering must not call collect() before any app exists.
        return list(self._families().values())

    def collect(self) -> Iterable[GaugeMetricFamily]:
        families = self._families()
        for versions in list(self.models):
            for namespace, model, version in versions.samples():
                families["model"].add_metric([namespace, model, version], 1.0)
        newest: float | None = None
        for positions in list(self.positions):
            for row in positions.rows:
                labels = [row.app_id, row.shard_id]
                families["lag"].add_metric(labels, row.lag_s)
                families["age"].add_metric(labels, row.checkpoint_age_s)
                families["lease"].add_metric(labels, row.lease_age_s)
            if positions.read_at is not None:
                newest = max(newest or 0.0, positions.read_at)
        if newest is not None:
            families["read"].add_metric([], newest)
        return list(families.values())


LIVE = _Live()
REGISTRY.register(LIVE)


def watch_models(versions: ModelVersions) -> None:
    """Report ``versions`` in /metrics for as long as it is alive."""
    LIVE.models.add(versions)


@contextlib.asynccontextmanager
async def stream_positions(
    settings: Settings, kinesis: KinesisClient
) -> AsyncIterator[StreamPositions | None]:
    """Read the agents' positions in the background for the app's lifetime (nothing when
    ``stream_status_interval_s`` is 0)."""
    if settings.stream_status_interval_s <= 0:
        yield None
        return
    positions = StreamPositions(settings, kinesis)
    LIVE.positions.add(positions)
    task = asyncio.create_task(positions.run(), name="stream-positions")
    try:
        yield positions
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        LIVE.positions.discard(positions)
