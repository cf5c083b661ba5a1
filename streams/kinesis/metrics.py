"""Prometheus metrics of the stream runtime (default registry).

A worker that wants them served calls ``prometheus_client.start_http_server(port)``.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge

__all__ = ["CHECKPOINTS", "MESSAGES", "MILLIS_BEHIND", "REBALANCES", "SHARDS_OWNED"]

MILLIS_BEHIND = Gauge(
    "recstream_stream_millis_behind_latest",
    "MillisBehindLatest of the last GetRecords on each shard this worker reads.",
    ["stream", "shard"],
)
MESSAGES = Counter(
    "recstream_stream_messages_total",
    "Messages handed to faust by the Kinesis consumer.",
    ["stream"],
)
CHECKPOINTS = Counter(
    "recstream_stream_checkpoints_total",
    "Checkpoint writes, by outcome (written, refused: lease lost, failed: store error).",
    ["stream", "outcome"],
)
REBALANCES = Counter(
    "recstream_stream_rebalances_total", "faust rebalances driven by lease changes."
)
SHARDS_OWNED = Gauge(
    "recstream_stream_shards_owned", "Shards this worker holds a lease on.", ["stream"]
)
