"""Faults in front of a real emulator: a test-side HTTP proxy (Kinesis throttling, calls
left unanswered).

Neither emulator throttles: moto has no shard limits, and kinesis-mock's PutRecords only
refuses records over the size limit (it declares ``ProvisionedThroughputExceededException``
and never returns it). This proxy forwards every call to the real emulator and, while
told to, answers as Kinesis does when shards are over their limits, in Kinesis's wire
format (JSON 1.1):

* PutRecords, partial failure: the records bound for a throttled shard are not sent on;
  the answer is a 200 whose ``Records`` carry, in their places, ``{"ErrorCode":
  "ProvisionedThroughputExceededException", "ErrorMessage": "Rate exceeded for shard
  …"}``, and ``FailedRecordCount`` counts them. The other records go to the emulator
  (their results are the emulator's own).
* PutRecords, the whole call: a 400 ``ProvisionedThroughputExceededException`` (as the
  API reference lists for PutRecords), alternating with the partial failure of every
  record while every shard is throttled, so both of the producer's paths are taken.
* GetRecords: a 400 whose body is ``{"__type": "ProvisionedThroughputExceededException",
  "message": "Rate exceeded for shard …"}``, as for a reader over 5 calls or 2 MB a second.

It can also hold calls unanswered (``FaultProxy.hold``, chosen by operation, path, body):
the connection is accepted and nothing comes back, as from a store that went silent,
but only for the calls chosen (SIGSTOP of the emulator silences all of them at once).

A PutRecords the proxy trims reaches the emulator with a body that no longer matches its
SigV4 signature; the emulators do not check signatures. Everything else (and every call
while nothing is throttled) passes through byte for byte.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from streams.envelope import EnvelopeError, decode
from streams.kinesis.shards import ShardMap

__all__ = ["THROTTLED", "Call", "FaultProxy", "Throttle"]

THROTTLED = "ProvisionedThroughputExceededException"
JSON_11 = "application/x-amz-json-1.1"
_HOP = {"content-length", "transfer-encoding", "connection", "keep-alive", "date", "server"}


@dataclass
class Throttle:
    """What the proxy refuses right now (the test changes it between phases)."""

    hot_shards: frozenset[str] = frozenset()
    """PutRecords: records bound for these shards are refused ``refusals`` times each,
    then accepted (a shard over its 1,000 records/s, for the moment a backoff takes)."""
    refusals: int = 1
    every_put: bool = False
    """PutRecords: every record refused, every time (shards throttled for long); every
    other call is refused whole."""
    get_records: bool = False
    """GetRecords: every call refused."""


@dataclass(frozen=True)
class Call:
    """One request as the proxy sees it, for `FaultProxy.hold` to choose."""

    operation: str
    """The JSON protocols' operation (``X-Amz-Target``: ``UpdateItem``, ``GetRecords``);
    empty for REST services (S3), which ``method`` and ``path`` tell apart."""
    method: str
    path: str
    """With the query string."""
    body: bytes


Hold = Callable[[Call], bool]
"""Whether to leave a call unanswered."""


@dataclass
class FaultProxy:
    """``await start(port)``; ``url`` is the endpoint to give the clients. Throttling
    needs the stream's ``shard_map`` (to route records to shards as Kinesis does)."""

    upstream: str
    shard_map: ShardMap | None = None
    account: str = "000000000000"
    throttle: Throttle = field(default_factory=Throttle)
    hold: Hold | None = None
    held: int = 0
    calls: Counter[str] = field(default_factory=Counter)
    """Calls received, by operation (the HTTP method for REST services)."""
    """Calls left unanswered so far."""
    refused_ids: Counter[str] = field(default_factory=Counter)
    """Event id -> how many times the proxy refused its record."""
    refused_gets: int = 0
    refused_calls: int = 0
    """PutRecords calls refused whole."""
    forwarded_puts: int = 0
    url: str = ""
    _seen: Counter[bytes] = field(default_factory=Counter)
    _puts_throttled: int = 0
    _held_ops: Counter[str] = field(default_factory=Counter)
    _closing: asyncio.Event = field(default_factory=asyncio.Event)
    _runner: web.AppRunner | None = None
    _session: aiohttp.ClientSession | None = None

    async def start(self, port: int) -> None:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._session = aiohttp.ClientSession(auto_decompress=False)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    def held_by(self, operation: str) -> int:
        """Calls of ``operation`` (or HTTP method, for REST) left unanswered so far."""
        return self._held_ops[operation]

    # --- the proxy ----------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        operation = request.headers.get("X-Amz-Target", "").rpartition(".")[2]
        self.calls[operation or request.method] += 1
        call = Call(operation, request.method, request.path_qs, body)
        if self.hold is not None and self.hold(call):
            self.held += 1
            self._held_ops[operation or request.method] += 1
            # Until the client gives up (the handler is then cancelled) or the proxy closes.
            await self._closing.wait()
            return web.Response(status=503)
        throttle = self.throttle
        if operation == "GetRecords" and throttle.get_records:
            self.refused_gets += 1
            iterator = orjson.loads(body).get("ShardIterator", "")
            return self._error(400, THROTTLED, self._rate_exceeded(f"iterator {iterator[:16]}…"))
        if operation == "PutRecords" and throttle.every_put:
            self._puts_throttled += 1
            if self._puts_throttled % 2:
                self.refused_calls += 1
                stream = orjson.loads(body).get("StreamName", "?")
                return self._error(400, THROTTLED, self._rate_exceeded("(all)", stream))
        if operation == "PutRecords" and (throttle.every_put or throttle.hot_shards):
            return await self._put_records(request, body)
        status, headers, answer = await self._forward(request, body)
        return web.Response(status=status, headers=headers, body=answer)

    async def _forward(
        self, request: web.Request, body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP | {"host"}}
        async with self._session.request(
            request.method, self.upstream + request.path_qs, headers=headers, data=body
        ) as answer:
            payload = await answer.read()
            kept = {k: v for k, v in answer.headers.items() if k.lower() not in _HOP}
            return answer.status, kept, payload

    async def _put_records(self, request: web.Request, body: bytes) -> web.Response:
        call: dict[str, Any] = orjson.loads(body)
        stream = call.get("StreamName", "?")
        records: list[dict[str, Any]] = call["Records"]
        refused: dict[int, str] = {}  # index -> shard id
        for index, record in enumerate(records):
            shard = self._shard_of(record)
            if self._refuse(record, shard):
                refused[index] = shard
                for event_id in _event_ids(record):
                    self.refused_ids[event_id] += 1
        passed = [r for i, r in enumerate(records) if i not in refused]
        results: list[dict[str, Any]] = []
        failed = 0
        encryption: dict[str, Any] = {}
        if passed:
            self.forwarded_puts += 1
            status, _, answer = await self._forward(
                request, orjson.dumps({**call, "Records": passed})
            )
            if status != 200:
                # The emulator refused the call itself: that is its answer to give.
                return web.Response(status=status, body=answer, content_type=JSON_11)
            upstream: dict[str, Any] = orjson.loads(answer)
            results = list(upstream["Records"])
            failed = int(upstream.get("FailedRecordCount", 0))
            if "EncryptionType" in upstream:
                encryption = {"EncryptionType": upstream["EncryptionType"]}
        merged: list[dict[str, Any]] = []
        forwarded = iter(results)
        for index in range(len(records)):
            if index in refused:
                merged.append(
                    {
                        "ErrorCode": THROTTLED,
                        "ErrorMessage": self._rate_exceeded(refused[index], stream),
                    }
                )
            else:
                merged.append(next(forwarded))
        payload = {"FailedRecordCount": failed + len(refused), "Records": merged, **encryption}
        return web.Response(
            status=200,
            body=orjson.dumps(payload),
            content_type=JSON_11,
            headers={"x-amzn-RequestId": str(uuid.uuid4())},
        )

    # --- helpers ------------------------------------------------------------------------

    def _shard_of(self, record: dict[str, Any]) -> str:
        if self.shard_map is None:
            raise RuntimeError("throttling PutRecords needs the stream's shard map")
        explicit = record.get("ExplicitHashKey")
        if explicit is not None:
            return self.shard_map.shard_for_hash(int(explicit)).shard_id
        return self.shard_map.shard_for_key(record["PartitionKey"]).shard_id

    def _refuse(self, record: dict[str, Any], shard: str) -> bool:
        throttle = self.throttle
        if throttle.every_put:
            return True
        if shard not in throttle.hot_shards:
            return False
        key = hashlib.sha256(f"{record['PartitionKey']}\0{record['Data']}".encode()).digest()
        self._seen[key] += 1
        return self._seen[key] <= throttle.refusals

    def _rate_exceeded(self, shard: str, stream: str = "") -> str:
        where = f" in stream {stream}" if stream else ""
        return f"Rate exceeded for shard {shard}{where} under account {self.account}."

    @staticmethod
    def _error(status: int, code: str, message: str) -> web.Response:
        return web.Response(
            status=status,
            body=orjson.dumps({"__type": code, "message": message}),
            content_type=JSON_11,
            headers={"x-amzn-RequestId": str(uuid.uuid4())},
        )


def _event_ids(record: dict[str, Any]) -> list[str]:
    """The event ids inside one PutRecords entry (its envelope's messages)."""
    try:
        messages = decode(base64.b64decode(record["Data"]))
    except (EnvelopeError, ValueError):
        return []
    ids = []
    for message in messages:
        value = orjson.loads(message.value)
        if isinstance(value, dict) and "event_id" in value:
            ids.append(str(value["event_id"]))
    return ids
