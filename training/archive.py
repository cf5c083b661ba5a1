"""The S3 archive as training input: `load_archive` turns a time range of archived events
into an `InteractionLog`. The format, writer and reader live in `recstream.archive`
(shared with the agents) and are re-exported here."""

from __future__ import annotations

from collections.abc import Mapping

from recstream.archive import (
    ARCHIVE_PREFIX,
    decode_events,
    encode_events,
    object_key,
    partition_prefix,
    read_events,
    write_events,
)
from recstream.settings import Settings
from training.data import DEFAULT_SESSION_GAP_S, InteractionLog, LogBuilder

__all__ = [
    "ARCHIVE_PREFIX",
    "decode_events",
    "encode_events",
    "load_archive",
    "object_key",
    "partition_prefix",
    "read_events",
    "write_events",
]


def load_archive(
    settings: Settings,
    start: float,
    end: float,
    *,
    namespace: str | None = None,
    weights: Mapping[str, float] | None = None,
    session_gap_s: float = DEFAULT_SESSION_GAP_S,
) -> InteractionLog:
    """The archived events of ``[start, end)`` as an `InteractionLog`, weighted by
    ``weights`` (default: `Settings.event_weights`). Events without an item are skipped;
    anonymous events count under the user ``session:{session_id}``."""
    namespace = namespace or settings.namespace
    builder = LogBuilder(
        settings.event_weights if weights is None else weights,
        session_gap_s=session_gap_s,
        source=f"s3://{settings.bucket}/{ARCHIVE_PREFIX}/{namespace}",
    )
    for event in read_events(settings, start, end, namespace=namespace):
        builder.add_event(event)
    return builder.build()
