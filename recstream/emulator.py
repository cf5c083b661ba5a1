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
* **State that survives a restart.** Every ``--snapshot-every`` seconds in which a request
  arrived, and on SIGTERM/SIGINT, the state of every moto backend in use (streams and
  their records, tables, buckets and objects, queues and messages) is pickled to
  ``<state-dir>/moto-state.pickle`` (written beside it, then renamed, so a crash never
  leaves half a file). At start-up the file is loaded back. A snapshot waits for the
  requests in flight and holds new ones while it forks; a child process pickles that
  copy-on-write image while requests go on, so the snapshot is consistent and requests
  are held for milliseconds, not for the whole dump (`Snapshots.save_forked`).

The trade-off of snapshots: a hard crash (power loss, SIGKILL) loses at most the last
interval; a clean stop or reboot (SIGTERM) loses nothing.
"""

from __future__ import annotations

import argparse
import copyreg
import functools
import gc
import io
import logging
import os
import pickle
import signal
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

__all__ = [
    "SNAPSHOT_NAME",
    "ShardRecords",
    "main",
    "patch_dispatch",
    "patch_kinesis",
    "patch_kinesis_metrics",
    "patch_models",
]

log = logging.getLogger("recstream.emulator")

SNAPSHOT_NAME = "moto-state.pickle"
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
        return records.rows

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        self.records = ShardRecords(record_class)

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
        # takes a fraction of the time a million objects would.
        state: dict[str, Any] = dict(self.__dict__)
        state["records"] = list(rows_of(self).values())
        return state

    def shard_setstate(self: Any, state: dict[str, Any]) -> None:
        rows = state.pop("records")
        self.__dict__.update(state)
        self.records = ShardRecords(record_class)
        for row in rows:
            self.records.rows[row[0]] = tuple(row)

    shard_class.__init__ = init
    shard_class.put_record = put_record
    shard_class.get_min_sequence_number = get_min_sequence_number
    shard_class.get_max_sequence_number = get_max_sequence_number
    shard_class.get_sequence_number_at = get_sequence_number_at
    shard_class.get_records = get_records
    shard_class.__getstate__ = shard_getstate
    shard_class.__setstate__ = shard_setstate


def patch_kinesis_metrics() -> None:
    """Publish a stream's IncomingBytes and IncomingRecords once a minute, as Kinesis does.

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
        timestamp = datetime.fromtimestamp(minute * 60, tz=UTC).replace(tzinfo=None)
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
        minute = int(time.time() // 60)
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


def dump_state() -> bytes:
    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL)
    pickler.dispatch_table = {**copyreg.dispatch_table, **_reducers()}
    pickler.dump(
        [(service, account, region, b.__dict__) for service, account, region, b in _backends()]
    )
    return buffer.getvalue()


def load_state(blob: bytes) -> int:
    """Put saved backends back; returns how many were restored."""
    from moto.backends import get_backend

    saved = pickle.loads(blob)
    for service, account, region, state in saved:
        backends: Any = get_backend(service)
        backends[account][region].__dict__.update(state)
        if service == "s3":
            # S3 also names each bucket's owner in a registry beside the backends; without
            # it CreateBucket would replace a restored bucket with an empty one.
            for name in state.get("buckets", {}):
                backends.bucket_accounts[name] = (region, account)
    return len(saved)


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
    """The state file: load at start, save periodically and at exit."""

    def __init__(self, state_dir: Path, gate: Gate) -> None:
        self.path = state_dir / SNAPSHOT_NAME
        self.gate = gate
        self.lock = threading.Lock()

    def load(self) -> None:
        if not self.path.exists():
            return
        started = time.monotonic()
        count = load_state(self.path.read_bytes())
        log.warning(
            "restored %d moto backends from %s in %.1f s",
            count, self.path, time.monotonic() - started,
        )  # fmt: skip

    def save_forked(self) -> None:
        """The periodic snapshot, without holding the requests while it pickles.

        Pickling in this process held every request for the whole dump, which grows with
        the state (moto's Kinesis records cost about 3 ms per thousand): a stall of
        seconds every ``--snapshot-every`` once a stream holds a million records, which
        was the agents' lag spikes in bench.ingest's long run. Instead, with no request
        in flight, the process forks (a copy-on-write image of every backend, in
        milliseconds), lets requests through again at once, and the child pickles its
        frozen image, writes the file and exits; Redis's BGSAVE works the same way."""
        if not hasattr(os, "fork"):
            self.save()
            return
        _reducers()  # made here, once: the child's cache would be thrown away with it
        with self.lock:
            child: list[int] = []

            def fork() -> None:
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
                        self._write(dump_state())
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

    def _write(self, blob: bytes) -> None:
        temporary = self.path.with_suffix(".tmp")
        with temporary.open("wb") as out:
            out.write(blob)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, self.path)

    def save(self) -> None:
        with self.lock:
            blob: list[bytes] = []

            def dump() -> None:
                for attempt in range(3):
                    try:
                        blob.append(dump_state())
                        return
                    except RuntimeError:
                        # A long poll still ran and changed a dict; try again.
                        if attempt == 2:
                            raise

            self.gate.exclusive(dump)
            self.gate.touched = False
            self._write(blob[0])

    def every(self, seconds: float) -> None:
        while True:
            time.sleep(seconds)
            if self.gate.touched:
                try:
                    self.save_forked()
                except Exception:
                    log.exception("snapshot to %s failed; the next one retries", self.path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="recstream's embedded AWS emulator (moto)")
    parser.add_argument("-H", "--host", default="127.0.0.1")
    parser.add_argument("-p", "--port", type=int, default=4566)
    parser.add_argument("--state-dir", type=Path, default=None, help="omit: keep nothing")
    parser.add_argument("--snapshot-every", type=float, default=10.0, help="seconds")
    parser.add_argument("--max-records", type=int, default=500_000, help="per Kinesis shard")
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
    patch_kinesis_metrics()
    patch_dispatch()
    gate = Gate(DomainDispatcherApplication(create_backend_app))
    snapshots = None
    if args.state_dir is not None:
        args.state_dir.mkdir(parents=True, exist_ok=True)
        snapshots = Snapshots(args.state_dir, gate)
        snapshots.load()
        threading.Thread(
            target=snapshots.every, args=(args.snapshot_every,), name="snapshots", daemon=True
        ).start()
    server = make_server(
        args.host, args.port, gate, threaded=True, request_handler=MotoRequestHandler
    )
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
