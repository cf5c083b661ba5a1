"""The embedded AWS emulator: moto's server, fixed for a day of traffic, with its state on disk.

    python -m recstream.emulator --port 4566 --state-dir .recstream/moto

`recstream up` and the test suite start this module instead of ``python -m moto.server``.
It patches moto in this process only (site-packages stay untouched), then serves moto's
own WSGI application:

* **Kinesis in O(1) per record.** moto's ``Shard.put_record`` asks
  ``get_max_sequence_number``, which builds ``list(self.records.keys())`` on every put,
  and ``Shard.get_records`` walks the shard from its first record to find the iterator's
  position: both cost O(records in the shard), so ingestion slowed from 383 to 122
  events/s within 70,000 events. moto numbers a shard's records 1, 2, 3, … without gaps,
  so a record is found by its number and the newest is the dict's last key.
* **A retention trim.** moto never drops a record; real Kinesis drops them after the
  retention period. We drop them after the retention period too, and also beyond
  ``--max-records`` per shard, so memory stays bounded at any event rate (the oldest
  records go first, exactly as they would age out on AWS).
* **No object kept for nothing, few objects for the collector.** moto's ``BaseModel``
  appends every instance it ever makes to a class-wide list (for its test-reset API):
  every Kinesis record, even trimmed ones, and every DynamoDB item written, replaced or
  not, so memory grew by ~6.5 KB per event without bound and Python's full garbage
  collections, which walk every live object, grew with it to seconds with the whole
  server stopped (session 6). That list is no longer filled, and a shard keeps its records
  as plain tuples (`ShardRecords`), which the collector does not walk; moto still sees
  its ``Record`` objects, made for the records a request reads. moto also published two
  CloudWatch data points (IncomingBytes, IncomingRecords) for every PutRecord(s) call, kept
  forever; like Kinesis itself, the emulator publishes them once a minute per stream
  (`patch_kinesis_metrics`).
* **Less per request** (session 7). Connections are kept alive (`keep_alive_handler`;
  werkzeug closed each after one answer, so every call paid a TCP connection and a
  thread); PutRecords and GetRecords are answered without moto's generic serializer, the
  same bytes (`patch_kinesis_responses`); a new DynamoDB item is sized once, not once per
  attribute (`patch_dynamodb_items`).
* **State that survives a restart.** Every ``--snapshot-every`` seconds in which a request
  arrived, and on SIGTERM/SIGINT, the state of every moto backend in use (streams, tables,
  buckets and objects, queues and messages) is pickled to ``<state-dir>/moto-state.pickle``
  (written beside it, then renamed, so a crash never leaves half a file), except the
  Kinesis records: the records put since the last snapshot are appended to
  ``<state-dir>/kinesis-records.<n>.log``, which the pickle names, and which is rewritten
  with only the records kept once the trim has made most of it obsolete (`Snapshots`).
  At start-up both are loaded back. A snapshot waits for the requests in flight and holds
  new ones while it forks; a child process writes that copy-on-write image while requests
  go on, so the snapshot is consistent and requests are held for milliseconds, not for
  the whole dump (`Snapshots.save_forked`).

The trade-off of snapshots: a hard crash (power loss, SIGKILL) loses at most the last
interval; a clean stop or reboot (SIGTERM) loses nothing.
"""

from __future__ import annotations

import argparse
import base64
import copyreg
import functools
import gc
import io
import json
import logging
import os
import pickle
import signal
import socket
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "SNAPSHOT_NAME",
    "ShardRecords",
    "keep_alive_handler",
    "main",
    "patch_dispatch",
    "patch_dynamodb_items",
    "patch_kinesis",
    "patch_kinesis_metrics",
    "patch_kinesis_responses",
    "patch_models",
]

log = logging.getLogger("recstream.emulator")

SNAPSHOT_NAME = "moto-state.pickle"
LOG_PREFIX = "kinesis-records"
_RECORDS_IN_LOG = threading.Event()
"""Set while a snapshot that writes the records log pickles the backends."""
_PUT_LOCK = threading.Lock()
"""moto's put_record says it is "not safe for concurrency"; the server is threaded."""


# --- moto's instance registry -------------------------------------------------------------


def patch_models() -> None:
    """Stop moto's ``BaseModel`` from keeping every instance it ever made.

    moto appends each model object to ``cls.instances_tracked`` so that its test-only
    ``/moto-api/reset`` can find them; nothing else reads the lists, and recstream never
    calls that API. In a long-running server they kept every Kinesis record past the
    retention trim and every DynamoDB ``Item`` ever written (a new one per PutItem or
    UpdateItem, ~5 more objects each): 6.5 KB per event in bench.ingest, 6.5 GB after a
    million events, and Python's full collections walked all of it with the server
    stopped, longer each time (0.2 s at 40,000 events, 0.55 s at 70,000, seconds at a
    million)."""
    from moto.core.common_models import BaseModel

    base: Any = BaseModel

    def untracked_new(cls: Any, *args: Any, **kwargs: Any) -> Any:
        following: Any = super(BaseModel, cls)  # what BaseModel.__new__ itself calls
        return following.__new__(cls)

    base.__new__ = staticmethod(untracked_new)


# --- Kinesis: O(1) puts and reads, and a retention trim ---------------------------------

Row = tuple[int, str, str, str | None, float]
"""A stored record: (sequence number, partition key, data as moto keeps it (base64 text),
explicit hash key, arrival time in seconds since the epoch). Also the snapshot's format."""


class ShardRecords(MutableMapping[int, Any]):
    """A shard's records, keyed by sequence number, kept as `Row` tuples.

    moto keeps a ``Record`` object per record; a million of them are a million objects the
    garbage collector walks on every full collection, holding the server for a second or
    more. A tuple of strings and numbers is untracked by the collector after its first
    look, and smaller. moto's own code (resharding, AT_TIMESTAMP iterators, responses) still
    reads and writes ``Record`` objects through this mapping; the hot paths (`patch_kinesis`)
    read `rows` directly and make objects only for the records a GetRecords returns."""

    __slots__ = ("record_class", "rows")

    def __init__(self, record_class: Any) -> None:
        self.record_class: Any = record_class
        """moto's ``Record``, passed in: this module imports moto only inside functions."""
        # OrderedDict, not dict: the trim pops from the front, O(1) here but a scan over
        # the deleted slots in a dict.
        self.rows: OrderedDict[int, Row] = OrderedDict()

    def record(self, row: Row) -> Any:
        """The moto ``Record`` for a row (made now; nothing keeps it)."""
        sequence_number, partition_key, data, explicit_hash_key, created_at = row
        record = self.record_class.__new__(self.record_class)
        record.partition_key = partition_key
        record.data = data
        record.sequence_number = sequence_number
        record.explicit_hash_key = explicit_hash_key
        record.created_at = created_at
        record.created_at_datetime = _utc(created_at)
        return record

    def __getitem__(self, sequence_number: int) -> Any:
        return self.record(self.rows[sequence_number])

    def __setitem__(self, sequence_number: int, record: Any) -> None:
        self.rows[sequence_number] = (
            sequence_number, record.partition_key, record.data, record.explicit_hash_key,
            record.created_at,
        )  # fmt: skip

    def __delitem__(self, sequence_number: int) -> None:
        del self.rows[sequence_number]

    def __iter__(self) -> Iterator[int]:
        return iter(self.rows)

    def __reversed__(self) -> Iterator[int]:
        return reversed(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __contains__(self, sequence_number: object) -> bool:
        return sequence_number in self.rows

    def __reduce__(self) -> Any:
        raise TypeError("ShardRecords are pickled by their shard (shard_getstate)")


def patch_kinesis(max_records_per_shard: int) -> None:
    """Replace the O(n) methods of moto's Kinesis ``Shard`` in this process, and keep its
    records as `ShardRecords`."""
    from moto.kinesis import models

    shard_class: Any = models.Shard
    record_class: Any = models.Record
    original_init = shard_class.__init__

    def rows_of(shard: Any) -> OrderedDict[int, Row]:
        # moto's split_shard gives the parent shard a fresh OrderedDict; adopt whatever
        # it put there so every shard stores rows.
        records = shard.records
        if not isinstance(records, ShardRecords):
            compact = ShardRecords(record_class)
            for sequence_number, record in list(records.items()):
                compact[sequence_number] = record
            shard.records = compact
            records = compact
            # Its records were replaced, not appended to: the records log must not give
            # the old ones back, so the shard's rows are logged afresh under a new name.
            shard.recstream_log_id = _new_log_id()
        return records.rows

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        self.records = ShardRecords(record_class)
        self.recstream_log_id = _new_log_id()

    def last_sequence(shard: Any, rows: OrderedDict[int, Row]) -> int:
        # Remembered apart from the records so that numbering continues after a trim or
        # a reshard emptied the dict (a repeated number would break every checkpoint).
        if rows:
            return next(reversed(rows))
        return int(getattr(shard, "recstream_last_sequence", 0))

    def put_record(self: Any, partition_key: str, data: str, explicit_hash_key: str) -> str:
        with _PUT_LOCK:
            rows = rows_of(self)
            sequence_number = last_sequence(self, rows) + 1
            rows[sequence_number] = (
                sequence_number, partition_key, data, explicit_hash_key, time.time(),
            )  # fmt: skip
            self.recstream_last_sequence = sequence_number
            trim(rows, retention_hours=getattr(self, "recstream_retention_hours", 24))
        return str(sequence_number)

    def trim(rows: OrderedDict[int, Row], retention_hours: float) -> None:
        while len(rows) > max_records_per_shard:
            rows.popitem(last=False)
        oldest_allowed = time.time() - retention_hours * 3600
        while rows and rows[next(iter(rows))][4] < oldest_allowed:
            rows.popitem(last=False)

    def get_min_sequence_number(self: Any) -> int:
        rows = rows_of(self)
        return next(iter(rows)) if rows else 0

    def get_max_sequence_number(self: Any) -> int:
        return last_sequence(self, rows_of(self))

    def get_sequence_number_at(self: Any, at_timestamp: float) -> int:
        # moto built a list of every record here; arrival times only grow, so scan back
        # from the newest.
        rows = rows_of(self)
        if not rows or at_timestamp <= rows[next(iter(rows))][4]:
            return 0
        for sequence_number in reversed(rows):
            if rows[sequence_number][4] < at_timestamp:
                return sequence_number
        return 0

    def get_records(self: Any, last_sequence_id: str, limit: int | None) -> tuple[Any, int, int]:
        after = int(last_sequence_id)
        rows = rows_of(self)
        if not rows:
            return [], after, 0
        newest = next(reversed(rows))
        # An iterator older than the trim horizon reads from the oldest record kept, as
        # on AWS once records aged out.
        number = max(after + 1, next(iter(rows)))
        found: list[Row] = []
        wanted = limit or 10_000
        while number <= newest and len(found) < wanted:
            row = rows.get(number)
            if row is not None:
                found.append(row)
            number += 1
        if not found:
            return [], after, 0
        behind = rows[newest][4] - found[-1][4]
        records = self.records
        return [records.record(row) for row in found], found[-1][0], int(behind * 1000)

    def shard_getstate(self: Any) -> dict[str, Any]:
        # Records as the list of their rows: pickling a million tuples of str/int/float
        # takes a fraction of the time a million objects would. A snapshot with a records
        # log (`Snapshots`) leaves them out: the log has them.
        state: dict[str, Any] = dict(self.__dict__)
        state["records"] = [] if _RECORDS_IN_LOG.is_set() else list(rows_of(self).values())
        return state

    def shard_setstate(self: Any, state: dict[str, Any]) -> None:
        rows = state.pop("records")
        self.__dict__.update(state)
        self.records = ShardRecords(record_class)
        for row in rows:
            self.records.rows[row[0]] = tuple(row)

    def shard_rows(self: Any) -> OrderedDict[int, Row]:
        return rows_of(self)

    def shard_trim(self: Any) -> None:
        trim(rows_of(self), retention_hours=getattr(self, "recstream_retention_hours", 24))

    shard_class.__init__ = init
    shard_class.recstream_rows = shard_rows
    shard_class.recstream_trim = shard_trim
    shard_class.put_record = put_record
    shard_class.get_min_sequence_number = get_min_sequence_number
    shard_class.get_max_sequence_number = get_max_sequence_number
    shard_class.get_sequence_number_at = get_sequence_number_at
    shard_class.get_records = get_records
    shard_class.__getstate__ = shard_getstate
    shard_class.__setstate__ = shard_setstate


def patch_kinesis_metrics(period_s: float = 60.0) -> None:
    """Publish a stream's IncomingBytes and IncomingRecords once a minute, as Kinesis does
    (``period_s``: shorter only in tests, which would otherwise wait for a minute to end).

    moto put two CloudWatch data points (four objects, kept forever) per PutRecord(s) call:
    about 100,000 calls and 400,000 objects per million events in bench.ingest, for figures
    nothing in recstream reads. Here each call adds to its stream's totals for the current
    minute, published as one data point per metric (SampleCount, Sum, Minimum, Maximum
    over the calls, which is what GetMetricStatistics returns from per-call points) by the
    first call in a later minute."""
    from datetime import UTC, datetime

    from moto.cloudwatch.models import cloudwatch_backends
    from moto.kinesis.models import KinesisBackend

    backend_class: Any = KinesisBackend
    lock = threading.Lock()
    # (account, region, stream) -> [minute, calls, bytes sum/min/max, records sum/min/max]
    minutes: dict[tuple[str, str, str], list[Any]] = {}

    def publish(account: str, region: str, stream: str, totals: list[Any]) -> None:
        minute, calls, *stats = totals
        dimensions = [{"Name": "StreamName", "Value": stream}]
        timestamp = datetime.fromtimestamp(minute * period_s, tz=UTC).replace(tzinfo=None)
        cloudwatch_backends[account][region].put_metric_data(
            namespace="AWS/Kinesis",
            metric_data=[
                {
                    "MetricName": name,
                    "Unit": unit,
                    "Dimensions": dimensions,
                    "Timestamp": timestamp,
                    "StatisticValues": {
                        "SampleCount": calls,
                        "Sum": total,
                        "Minimum": low,
                        "Maximum": high,
                    },
                }
                for name, unit, (total, low, high) in (
                    ("IncomingBytes", "Bytes", stats[0:3]),
                    ("IncomingRecords", "Count", stats[3:6]),
                )
            ],
        )

    def send_stream_metrics(
        self: Any, stream_name: str, incoming_bytes: int, incoming_records: int
    ) -> None:
        key = (self.account_id, self.region_name, stream_name)
        minute = int(time.time() // period_s)
        with lock:
            totals = minutes.get(key)
            finished = totals if totals is not None and totals[0] != minute else None
            if totals is None or finished is not None:
                totals = minutes[key] = [minute, 0, 0, incoming_bytes, 0, 0, incoming_records, 0]
            totals[1] += 1
            totals[2] += incoming_bytes
            totals[3] = min(totals[3], incoming_bytes)
            totals[4] = max(totals[4], incoming_bytes)
            totals[5] += incoming_records
            totals[6] = min(totals[6], incoming_records)
            totals[7] = max(totals[7], incoming_records)
        if finished is not None:
            publish(*key, finished)

    backend_class._send_stream_metrics = send_stream_metrics


def patch_kinesis_responses() -> None:
    """Write the answers of PutRecords and GetRecords, the calls every event makes, without
    moto's generic serializer.

    moto turns an answer into JSON by walking botocore's model of the output shape member by
    member, looking each one up in the result under several spellings: 40 % of a 16-record
    PutRecords' CPU and most of a GetRecords' (session 7, cProfile). These two answers are
    plain: the same members, in the shape's order, with None left out, the record's data as
    base64 and its arrival time in epoch seconds truncated to the millisecond, as moto's
    serializer writes them (tests/integration/test_emulator_http.py compares the two byte
    for byte). Errors still go through moto (the backend raises before either answer)."""
    from moto.core.responses import ActionResult
    from moto.core.serialize import TimestampSerializer
    from moto.kinesis.responses import KinesisResponse

    response_class: Any = KinesisResponse
    serializer: Any = TimestampSerializer
    epoch_ms = serializer._timestamp_unixtimestamp
    b64encode, b64decode = base64.b64encode, base64.b64decode

    class JsonAnswer(ActionResult):
        """An answer already in the JSON protocol's form: dumped as it is."""

        def execute_result(self, context: Any) -> Any:
            body = json.dumps(self.result)
            return 200, {"Content-Type": "application/x-amz-json-1.1"}, body

    def put_records(self: Any) -> ActionResult:
        answer = self.kinesis_backend.put_records(
            self._get_param("StreamARN"), self._get_param("StreamName"), self._get_param("Records")
        )
        return JsonAnswer(
            {
                "FailedRecordCount": answer["FailedRecordCount"],
                "Records": [
                    {key: value for key, value in entry.items() if value is not None}
                    for entry in answer["Records"]
                ],
            }
        )

    def get_records(self: Any) -> ActionResult:
        next_iterator, records, millis_behind = self.kinesis_backend.get_records(
            self._get_param("StreamARN"), self._get_param("ShardIterator"), self._get_param("Limit")
        )
        answer: dict[str, Any] = {
            "Records": [
                {
                    "SequenceNumber": str(record.sequence_number),
                    "ApproximateArrivalTimestamp": epoch_ms(record.created_at_datetime),
                    "Data": b64encode(b64decode(record.data)).decode(),
                    "PartitionKey": record.partition_key,
                }
                for record in records
            ]
        }
        if next_iterator is not None:
            answer["NextShardIterator"] = next_iterator
        if millis_behind is not None:
            answer["MillisBehindLatest"] = int(millis_behind)
        return JsonAnswer(answer)

    response_class.put_records = put_records
    response_class.get_records = get_records


def patch_dynamodb_items() -> None:
    """Size a new DynamoDB item once, not once per attribute.

    moto's ``Item`` puts each attribute into a ``LimitedSizeDict``, whose every
    ``__setitem__`` re-sizes all the attributes already in it (UTF-8-encoding each string
    again) to refuse an item over DynamoDB's 400 KB: quadratic in the attributes, and 15 %
    of a BatchWriteItem of the agents' durable copies (a 5 KB window each; session 7,
    cProfile). The item is new here, so a running total of the same sizes, checked after
    each attribute, refuses exactly the items moto refuses, with the same error."""
    from moto.dynamodb.exceptions import ItemSizeTooLarge
    from moto.dynamodb.models import dynamo_type
    from moto.dynamodb.models.utilities import bytesize

    item_class: Any = dynamo_type.Item
    typed, limited = dynamo_type.DynamoType, dynamo_type.LimitedSizeDict
    limit = 405_000  # LimitedSizeDict's own (between DynamoDB's measured 409 and 410 KB)

    def init(self: Any, hash_key: Any, range_key: Any, attrs: dict[str, Any]) -> None:
        self.hash_key = hash_key
        self.range_key = range_key
        self.attrs = limited()
        size = 0
        for key, value in attrs.items():
            attribute = typed(value)
            size += bytesize(key) + attribute.size()
            if size > limit:
                raise ItemSizeTooLarge
            dict.__setitem__(self.attrs, key, attribute)

    item_class.__init__ = init


def _new_log_id() -> str:
    return os.urandom(8).hex()


def _kinesis_shards() -> Iterator[Any]:
    for service, _, _, backend in _backends():
        if service == "kinesis":
            for stream in list(backend.streams.values()):
                yield from list(stream.shards.values())


def _utc(timestamp: float) -> Any:
    # moto's records carry a naive UTC datetime (moto.core.utils.utcnow).
    from datetime import UTC, datetime

    return datetime.fromtimestamp(timestamp, tz=UTC).replace(tzinfo=None)


# --- per-request overhead --------------------------------------------------------------


def patch_dispatch() -> None:
    """Cache what moto recomputes on every request: the list of its service modules (a
    listdir and ~175 stat calls: a third of a PutRecords' CPU) and each response class's
    method names."""
    from moto import backends
    from moto.core import responses

    modules = frozenset(backends.list_of_moto_modules())
    backends.list_of_moto_modules = lambda: modules
    # inspect.getmembers over the response class, on every request, for the same answer.
    responses.method_names_from_class = functools.cache(  # type: ignore[attr-defined]
        responses.method_names_from_class  # type: ignore[attr-defined]
    )
    # One log line per request would write a gigabyte a day at 1,000 events/s.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)


KEEP_ALIVE_IDLE_S = 75.0
"""How long a kept-alive connection may wait for its next request; longer than aiobotocore
keeps an idle connection (12 s), so the client, not the server, ends it: a connection the
server closed under a client about to reuse it would fail that request."""


def keep_alive_handler(base: type[Any]) -> type[Any]:
    """``base`` (moto's request handler) answering many requests per connection.

    werkzeug's development server sends ``Connection: close`` with every response, so each
    AWS call opened a TCP connection and the server started a thread for it: at 1,000
    events/s about 80 connections a second between the API, the agents and the emulator,
    each paid for on both sides (the agents spent ~13 % of their CPU in aiohttp's connection
    set-up, py-spy, session 7). werkzeug closes them because it cannot tell where a body it
    did not read ends; here the body is limited to its ``Content-Length`` and whatever the
    application left unread is drained before the next request, every response carries its
    ``Content-Length``, and a chunked request body (which botocore does not send) still
    closes the connection as before. The response goes out in one write."""
    from werkzeug.exceptions import InternalServerError
    from werkzeug.wsgi import LimitedStream

    class KeepAliveHandler(base):  # type: ignore[misc]
        protocol_version = "HTTP/1.1"
        timeout = KEEP_ALIVE_IDLE_S
        wbufsize = -1
        """Buffered: the status line, headers and body leave in one send."""

        def setup(self) -> None:
            super().setup()
            # A response larger than the buffer goes out in more than one write; without
            # this the second would wait for the client's delayed ACK.
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def handle_expect_100(self) -> bool:
            return True  # run_wsgi answers 100-continue, as werkzeug's does

        def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
            pass  # the access log is off (patch_dispatch); skip formatting its line

        def log_error(self, format: str, *args: Any) -> None:
            if not format.startswith("Request timed out"):  # an idle connection ending
                super().log_error(format, *args)

        def run_wsgi(self) -> None:
            if self.headers.get("Expect", "").lower().strip(" \t") == "100-continue":
                self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                self.wfile.flush()
            environ = self.environ = self.make_environ()
            body: LimitedStream | None = None
            if environ.get("wsgi.input_terminated"):
                self.close_connection = True  # chunked: werkzeug's reader, no reuse
            else:
                length = environ.get("CONTENT_LENGTH", "")
                if length and not length.isdigit():
                    self.close_connection = True
                    length = "0"
                body = LimitedStream(self.rfile, int(length or 0))
                environ["wsgi.input"] = body
                environ["wsgi.input_terminated"] = True  # werkzeug needs no limit of its own
            started: list[Any] = []

            def start_response(
                status: str, headers: list[tuple[str, str]], exc_info: Any = None
            ) -> Callable[[bytes], None]:
                if exc_info is not None and started:
                    raise exc_info[1].with_traceback(exc_info[2])
                started[:] = [status, headers]
                return chunks.append

            chunks: list[bytes] = []
            try:
                result = self.server.app(environ, start_response)
                try:
                    chunks.extend(result)
                finally:
                    if hasattr(result, "close"):
                        result.close()
            except Exception:
                if self.server.passthrough_errors:
                    raise
                log.exception("error on request %s %s", self.command, self.path)
                chunks.clear()
                result = InternalServerError()(environ, start_response)
                chunks.extend(result)
            if body is not None:
                while body.read(65536):  # what the application did not read
                    pass
            self._respond(environ, started[0], started[1], b"".join(chunks))

        def _respond(
            self, environ: dict[str, Any], status: str, headers: list[tuple[str, str]],
            data: bytes,
        ) -> None:  # fmt: skip
            code_text, _, message = status.partition(" ")
            code = int(code_text)
            self.send_response(code, message)
            bodiless = environ["REQUEST_METHOD"] == "HEAD" or code < 200 or code in {204, 304}
            for key, value in headers:
                lowered = key.lower()
                if lowered == "connection" or (lowered == "content-length" and not bodiless):
                    continue
                self.send_header(key, value)
            if not bodiless:
                self.send_header("Content-Length", str(len(data)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if data and not bodiless:
                self.wfile.write(data)
            self.wfile.flush()

    return KeepAliveHandler


# --- snapshots of every backend in use ----------------------------------------------------


def _backends() -> Iterable[tuple[str, str, str, Any]]:
    """(backend dict class, account, region, backend) of every moto backend in use."""
    from moto.core.base_backend import BackendDict

    instances: list[Any] = list(BackendDict._instances)  # type: ignore[misc]
    for backend_dict in instances:
        for account, per_account in list(backend_dict.items()):
            for region, backend in list(per_account.items()):
                yield backend_dict.service_name, account, region, backend


def _raw_dict(
    cls: type[dict[Any, Any]], items: list[tuple[Any, Any]], attrs: dict[str, Any]
) -> Any:
    """Rebuild a dict subclass without its ``__setitem__`` (see `_reducers`)."""
    obj = cls()
    for key, value in items:
        dict.__setitem__(obj, key, value)
    obj.__dict__.update(attrs)
    return obj


def _pem_private_key(pem: bytes) -> Any:
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    return load_pem_private_key(pem, password=None)


def _key_reducer(key: Any) -> tuple[Any, tuple[Any, ...]]:
    from cryptography.hazmat.primitives import serialization

    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return _pem_private_key, (pem,)


@functools.cache
def _reducers() -> dict[type, Callable[[Any], tuple[Any, tuple[Any, ...]]]]:
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from moto.s3.utils import _VersionedKeyStore

    # Locks cannot be pickled (moto's SQS queues hold some); a restored backend gets
    # fresh, unlocked ones, which is what a fresh process would have.
    lock, rlock = threading.Lock, threading.RLock
    return {
        type(lock()): lambda _: (lock, ()),
        type(rlock()): lambda _: (rlock, ()),
        # S3 keeps each bucket's objects in a dict whose __setitem__ appends a version;
        # pickle's default rebuild goes through __setitem__ and would nest every list.
        _VersionedKeyStore: lambda store: (
            _raw_dict,
            (type(store), list(dict.items(store)), dict(vars(store))),
        ),
        # KMS keys (moto makes one when a table or bucket asks for server-side encryption,
        # as the init script does) hold private keys that pickle cannot take: keep them as PEM.
        **{
            type(key): _key_reducer
            for key in (
                rsa.generate_private_key(public_exponent=65537, key_size=1024),
                ec.generate_private_key(ec.SECP256R1()),
            )
        },
    }


def _spilled_s3_buffers() -> Iterator[Any]:
    """The buffers of S3 objects (every version, every multipart upload's parts) that
    moto spilled from memory to a temporary file."""
    for service, _, _, backend in _backends():
        if service != "s3":
            continue
        for bucket in list(getattr(backend, "buckets", {}).values()):
            keys: list[Any] = []
            for versions in list(dict.values(bucket.keys)):
                keys += versions if isinstance(versions, list) else [versions]
            for upload in list(getattr(bucket, "multiparts", {}).values()):
                keys += list(getattr(upload, "parts", {}).values())
            for key in keys:
                buffer = getattr(key, "_value_buffer", None)
                if buffer is not None and getattr(buffer, "_rolled", False):
                    yield buffer


def dump_state(records_log: tuple[str, int] | None = None) -> bytes:
    """Every backend in use, pickled. With ``records_log`` (the name and valid length of the
    records log written with it), the Kinesis records are left to that log."""
    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL)
    pickler.dispatch_table = {**copyreg.dispatch_table, **_reducers()}
    backends = [
        (service, account, region, b.__dict__) for service, account, region, b in _backends()
    ]
    if records_log is None:
        pickler.dump(backends)  # records inside, as every snapshot before session 6
        return buffer.getvalue()
    _RECORDS_IN_LOG.set()
    try:
        pickler.dump({"backends": backends, "records_log": records_log})
    finally:
        _RECORDS_IN_LOG.clear()
    return buffer.getvalue()


def load_state(blob: bytes) -> tuple[int, tuple[str, int] | None]:
    """Put saved backends back; returns how many were restored, and the records log the
    snapshot names (None: its records were inside)."""
    from moto.backends import get_backend

    saved = pickle.loads(blob)
    records_log = None
    if isinstance(saved, dict):
        saved, records_log = saved["backends"], saved["records_log"]
    for service, account, region, state in saved:
        backends: Any = get_backend(service)
        backends[account][region].__dict__.update(state)
        if service == "s3":
            # S3 also names each bucket's owner in a registry beside the backends; without
            # it CreateBucket would replace a restored bucket with an empty one.
            for name in state.get("buckets", {}):
                backends.bucket_accounts[name] = (region, account)
    for shard in _kinesis_shards():
        if not hasattr(shard, "recstream_log_id"):  # saved before session 6
            shard.recstream_log_id = _new_log_id()
    return len(saved), records_log


@dataclass
class _Plan:
    """What one snapshot writes to the records log, fixed with no request in flight."""

    log_name: str
    compact: bool
    """A new log of every record kept, instead of an append to the current one."""
    shards: list[tuple[Any, str, int, int]]
    """(shard, its log id, the last sequence number already logged, the newest now)."""


class Gate:
    """WSGI middleware that lets a snapshot wait for requests in flight and hold new ones."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.condition = threading.Condition()
        self.active = 0
        self.closed = False
        self.touched = False
        """A request arrived since the last snapshot."""

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        with self.condition:
            while self.closed:
                self.condition.wait()
            self.active += 1
            self.touched = True
        try:
            # moto builds whole responses (no streaming), so the list is cheap.
            return list(self.app(environ, start_response))
        finally:
            with self.condition:
                self.active -= 1
                self.condition.notify_all()

    def exclusive(self, action: Callable[[], None], wait_s: float = 5.0) -> None:
        """Run ``action`` with no request in flight (or after ``wait_s``, e.g. a long poll)."""
        with self.condition:
            self.closed = True
            deadline = time.monotonic() + wait_s
            while self.active and time.monotonic() < deadline:
                self.condition.wait(deadline - time.monotonic())
            try:
                action()
            finally:
                self.closed = False
                self.condition.notify_all()


class Snapshots:
    """The state on disk: load at start, save periodically and at exit.

    Two files: ``moto-state.pickle``, every backend but the Kinesis records, rewritten by
    each snapshot (written beside it, then renamed); and ``kinesis-records.<n>.log``, an
    append-only log of the records: each snapshot appends the records put since the last
    one. At a million records a full pickle was ~400 MB and a core for seconds every
    ``--snapshot-every``; an append is the last interval's records. The pickle names the
    log and the length of it that is valid, and is written after the append is on disk,
    so a crash between the two loses that interval, never more, and a torn append is cut
    off at the next start. The log also keeps records the retention trim has dropped
    since, so once it holds more than twice the records kept plus ``--log-slack``
    (100,000), a snapshot writes a fresh log of what is kept instead (compaction), the
    pickle switches to it, and the old log is deleted. Loading replays the log into the
    restored shards and trims them."""

    def __init__(self, state_dir: Path, gate: Gate, log_slack: int = 100_000) -> None:
        self.dir = state_dir
        self.log_slack = log_slack
        """Obsolete records the log may hold beyond as many as are kept, before compaction."""
        self.path = state_dir / SNAPSHOT_NAME
        self.gate = gate
        self.lock = threading.Lock()
        self.log_name: str | None = None
        """The records log the last snapshot wrote; None: none yet (the next compacts)."""
        self.log_length = 0
        self.rows_in_log = 0
        self.logged: dict[str, int] = {}
        """Shard log id -> the last sequence number in the records log."""

    def load(self) -> None:
        if not self.path.exists():
            self._remove_logs(keep=None)
            return
        started = time.monotonic()
        count, records_log = load_state(self.path.read_bytes())
        if records_log is not None:
            self._replay(*records_log)
        self._remove_logs(keep=self.log_name)
        kept = 0
        for shard in _kinesis_shards():
            shard.recstream_trim()
            rows = shard.recstream_rows()
            self.logged[shard.recstream_log_id] = next(reversed(rows)) if rows else 0
            kept += len(rows)
        log.warning(
            "restored %d moto backends and %d Kinesis records from %s in %.1f s",
            count, kept, self.dir, time.monotonic() - started,
        )  # fmt: skip

    def _replay(self, name: str, length: int) -> None:
        shards = {shard.recstream_log_id: shard for shard in _kinesis_shards()}
        path = self.dir / name
        if not path.exists() or path.stat().st_size < length:
            raise RuntimeError(
                f"{self.path} names {length} bytes of Kinesis records in {path}, which "
                f"{'is missing' if not path.exists() else 'is shorter'}: restore that file "
                "beside it, or start clean with `recstream down --wipe`"
            )
        with path.open("r+b") as records:
            while records.tell() < length:
                for log_id, rows in pickle.load(records):
                    self.rows_in_log += len(rows)
                    shard = shards.get(log_id)
                    if shard is None:  # a deleted stream's, or a resharded shard's old name
                        continue
                    target = shard.recstream_rows()
                    for row in rows:
                        target[row[0]] = row
            records.truncate(length)  # an append the pickle never named: a crash's
        self.log_name, self.log_length = name, length

    def _remove_logs(self, keep: str | None) -> None:
        for stale in self.dir.glob(f"{LOG_PREFIX}.*.log"):
            if stale.name != keep:
                stale.unlink()

    def _plan(self) -> _Plan:
        """Run with no request in flight: which records this snapshot logs."""
        shards: list[tuple[Any, str, int, int]] = []
        kept = 0
        for shard in _kinesis_shards():
            rows = shard.recstream_rows()  # first: it may rename a resharded shard
            kept += len(rows)
            newest = next(reversed(rows)) if rows else 0
            log_id = shard.recstream_log_id
            shards.append((shard, log_id, self.logged.get(log_id, 0), newest))
        compact = self.log_name is None or self.rows_in_log > 2 * kept + self.log_slack
        if not compact:
            return _Plan(str(self.log_name), False, shards)
        name = f"{LOG_PREFIX}.{time.time_ns()}.log"
        return _Plan(name, True, [(shard, i, 0, newest) for shard, i, _, newest in shards])

    def _persist(self, plan: _Plan) -> None:
        """Append to (or write) the records log, then write the pickle that names it."""
        path = self.dir / plan.log_name
        with path.open("wb" if plan.compact else "r+b") as records:
            if not plan.compact:
                records.truncate(self.log_length)  # what a failed snapshot left
                records.seek(self.log_length)
            chunk = [(log_id, _rows_after(shard, after)) for shard, log_id, after, _ in plan.shards]
            pickle.dump(chunk, records, protocol=pickle.HIGHEST_PROTOCOL)
            records.flush()
            os.fsync(records.fileno())
            length = records.tell()
        self._write(dump_state(records_log=(plan.log_name, length)))

    def _commit(self, plan: _Plan) -> None:
        """After a snapshot is on disk: remember what the log now holds."""
        logged = sum(max(0, newest - after) for _, _, after, newest in plan.shards)
        self.rows_in_log = logged if plan.compact else self.rows_in_log + logged
        for _, log_id, _, newest in plan.shards:
            self.logged[log_id] = newest
        self.log_name = plan.log_name
        self.log_length = (self.dir / plan.log_name).stat().st_size
        if plan.compact:
            self._remove_logs(keep=plan.log_name)

    def save_forked(self) -> None:
        """The periodic snapshot, without holding the requests while it is written.

        Pickling in this process held every request for the whole dump, which grows with
        the state (moto's Kinesis records cost about 3 ms per thousand): a stall of
        seconds every ``--snapshot-every`` once a stream holds a million records. Instead,
        with no request in flight, the process fixes what the records log gets and forks
        (a copy-on-write image of every backend, in milliseconds), lets requests through
        again at once, and the child writes the files from its frozen image and exits;
        Redis's BGSAVE works the same way."""
        if not hasattr(os, "fork"):
            self.save()
            return
        _reducers()  # made here, once: the child's cache would be thrown away with it
        with self.lock:
            child: list[int] = []
            plans: list[_Plan] = []

            def fork() -> None:
                plans.append(self._plan())
                # S3 objects beyond moto's in-memory size live in temporary files, whose
                # file offset a forked child would share: their pending writes go to the
                # file first, and the child reads them through descriptions of its own.
                for spilled in _spilled_s3_buffers():
                    spilled.flush()
                child.append(os.fork())
                if child[0] == 0:  # the child: only this thread exists here
                    code = 1
                    try:
                        for spilled in _spilled_s3_buffers():
                            own = f"/proc/self/fd/{spilled.fileno()}"  # a new open file
                            spilled._file = open(own, "rb")  # noqa: SIM115 (the buffer's now)
                        self._persist(plans[0])
                        code = 0
                    except BaseException as exc:
                        os.write(2, f"emulator snapshot failed: {exc!r}\n".encode())
                    finally:
                        os._exit(code)

            self.gate.exclusive(fork)
            self.gate.touched = False
            _, status = os.waitpid(child[0], 0)
            if os.waitstatus_to_exitcode(status) != 0:
                raise RuntimeError(f"the snapshot process exited with status {status}")
            self._commit(plans[0])

    def _write(self, blob: bytes) -> None:
        temporary = self.path.with_suffix(".tmp")
        with temporary.open("wb") as out:
            out.write(blob)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, self.path)

    def save(self) -> None:
        """A snapshot in this process, with requests held: at a clean stop."""
        with self.lock:
            plans: list[_Plan] = []

            def dump() -> None:
                for attempt in range(3):
                    try:
                        plans[:] = [self._plan()]
                        self._persist(plans[0])
                        return
                    except RuntimeError:
                        # A long poll still ran and changed a dict; try again.
                        if attempt == 2:
                            raise

            self.gate.exclusive(dump)
            self.gate.touched = False
            self._commit(plans[0])

    def every(self, seconds: float) -> None:
        while True:
            time.sleep(seconds)
            if self.gate.touched:
                try:
                    self.save_forked()
                except Exception:
                    log.exception("snapshot to %s failed; the next one retries", self.path)


def _rows_after(shard: Any, after: int) -> list[Row]:
    """A shard's rows with sequence numbers above ``after``, oldest first."""
    rows = shard.recstream_rows()
    picked: list[Row] = []
    for sequence_number in reversed(rows):
        if sequence_number <= after:
            break
        picked.append(rows[sequence_number])
    picked.reverse()
    return picked


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="recstream's embedded AWS emulator (moto)")
    parser.add_argument("-H", "--host", default="127.0.0.1")
    parser.add_argument("-p", "--port", type=int, default=4566)
    parser.add_argument("--state-dir", type=Path, default=None, help="omit: keep nothing")
    parser.add_argument("--snapshot-every", type=float, default=10.0, help="seconds")
    parser.add_argument("--max-records", type=int, default=500_000, help="per Kinesis shard")
    parser.add_argument(
        "--log-slack",
        type=int,
        default=100_000,
        help="obsolete records the records log may hold beyond twice those kept (tests: few)",
    )
    parser.add_argument(
        "--close-connections",
        action="store_true",
        help="one request per connection, as werkzeug serves (for comparisons)",
    )
    parser.add_argument(
        "--metrics-period",
        type=float,
        default=60.0,
        help="seconds per Kinesis CloudWatch data point (Kinesis: 60; tests: shorter)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault("MOTO_PORT", str(args.port))  # moto builds some URLs from it

    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    patch_models()
    patch_kinesis(args.max_records)
    patch_kinesis_metrics(args.metrics_period)
    patch_kinesis_responses()
    patch_dynamodb_items()
    patch_dispatch()
    gate = Gate(DomainDispatcherApplication(create_backend_app))
    snapshots = None
    if args.state_dir is not None:
        args.state_dir.mkdir(parents=True, exist_ok=True)
        snapshots = Snapshots(args.state_dir, gate, args.log_slack)
        snapshots.load()
        threading.Thread(
            target=snapshots.every, args=(args.snapshot_every,), name="snapshots", daemon=True
        ).start()
    handler = (
        MotoRequestHandler if args.close_connections else keep_alive_handler(MotoRequestHandler)
    )
    server = make_server(args.host, args.port, gate, threaded=True, request_handler=handler)
    # moto's modules (~200,000 objects) and a restored state live as long as the process:
    # frozen, they are no longer walked by every full collection, which stops the server.
    # (Frozen objects that die later are still freed by their reference counts; only one
    # caught in a reference cycle would stay until the process exits.)
    gc.collect()
    gc.freeze()

    def stop(signum: int, frame: object) -> None:
        # shutdown() waits for serve_forever to return, so it runs on another thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        server.serve_forever()
    finally:
        if snapshots is not None:
            snapshots.save()
            log.warning("saved the emulator's state to %s", snapshots.path)
    sys.exit(0)


if __name__ == "__main__":
    main()
