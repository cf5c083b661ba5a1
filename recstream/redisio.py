"""Redis round trips of the hot paths, packed by hiredis and sent on one connection.

redis-py packs every argument of every command in Python (`Encoder.encode`, a length
and a join each) and gives a pipeline's every reply its own timeout, callback and
bookkeeping: for a batch's reads of a few hundred small commands (the catalog's entries,
the windows and feature hashes of the durable copies) that was most of what reading
cost the agent (session 10 in docs/agents.md), and serving's state read and served log
paid the same per request (session 12 in docs/serving-speed.md). Here the commands are
packed in C (`hiredis.pack_command`, the same bytes), written back to back, and the
replies read as the parser gives them (no callbacks: an ``HGETALL`` is a flat list in
RESP2, `pairs` reads it).

What the caller gets is what a pipeline without ``raise_on_error`` would give, but
raised: a connection or timeout error (redis-py's own), or the first error reply once
every reply was read, as a pipeline raises it (or, with ``raise_on_error=False``, the
error replies in their places). Each round trip is timed under its name, a
``PIPELINE`` unless told (`recstream.tracing.timed_redis`):
`recstream.tracing.instrument_redis` times the client's commands and pipelines, which
these calls do not go through.

Connections are leased from the client's pool once and kept here between round trips
(`_lease`, `_give_back`): redis-py 8's ``get_connection`` and ``release`` take the pool's
lock, record observability counters, dispatch an event and test the socket for unread
data, ~60 µs of a serving request's CPU for each round trip (session 13 in
docs/serving-speed.md). A leased connection stays "in use" to the pool, so its
``max_connections`` still bounds them all, and closing the client disconnects them. What
the pool's check guarded against is handled where it happens: a round trip that fails
drops its connection (its replies may be unread), and a connection error (a restarted
server kills every connection) drops every connection kept for that pool. The client's
socket timeout bounds each round trip as a whole, one deadline, where redis-py wraps
each write in `asyncio.wait_for` (a task) and each reply in a timer; a trip that runs
out raises redis-py's `TimeoutError`, as its own calls do.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import weakref
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import hiredis
import orjson
import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from recstream import tracing

__all__ = ["commands", "exact", "pack", "pairs", "send_packed"]

Arg = str | bytes | int


def pack(*command: Arg) -> bytes:
    """One command in the Redis protocol: byte for byte what redis-py sends for ``str``,
    ``bytes`` and ``int`` arguments (`test_pack_is_redis_py_s`)."""
    # (hiredis's stub types the tuple as one element long)
    packed: bytes = hiredis.pack_command(command)  # type: ignore[arg-type]
    return packed


def exact(x: float) -> str:
    """``x`` as the shortest decimal that reads back as exactly ``x`` (what `repr` gives,
    up to the exponent's form: ``1.5e-7`` for ``1.5e-07``), for a score Redis parses as
    it is. orjson's Ryu makes it in a few hundred instructions where CPython's `repr`
    (dtoa's multi-precision loop) takes thousands: one per event of the trending part,
    1.5 % of the worker's instructions (session 11 in docs/agents.md). orjson writes an
    infinity or a NaN as ``null``, so those go through `repr`."""
    if math.isfinite(x):
        return orjson.dumps(x).decode()
    return repr(x)


async def send_packed(
    redis: aioredis.Redis,
    writes: Iterable[tuple[bytes, int]],
    *,
    name: str = "PIPELINE",
    raise_on_error: bool = True,
) -> list[Any]:
    """Write each ``(packed commands, how many)`` on ONE connection as soon as it is
    produced (so Redis runs the first while the next is made), then read every reply,
    in order. Raises the first error reply once all replies are read (or, without
    ``raise_on_error``, returns it in its place). Timed as ``name`` in
    ``recstream_redis_call_seconds``: a ``PIPELINE``, as a redis-py pipeline is, unless
    the trip is one command of another name.

    ``writes`` given as a list or tuple are sent again, once, on a new connection after
    redis-py's `ConnectionError`: a connection the pool kept dies with its server
    (a restart), which shows at its first write or read, and redis-py's own commands and
    pipelines reconnect and retry once then. Every caller's list is reads or idempotent
    writes (the served log skips an id logged before). Writes made as they go (the
    agents' chunks) cannot be sent again: their callers retry (agents/retry.py)."""
    call = tracing.timed_redis(name)
    attempts = 2 if isinstance(writes, list | tuple) else 1
    for attempt in range(attempts):
        try:
            replies, error = await _round_trip(redis, writes)
        except RedisConnectionError:
            if attempt + 1 < attempts:
                continue  # (the dead connection was dropped: the pool opens a new one)
            call.done("ConnectionError")
            raise
        except BaseException as exc:
            call.done(type(exc).__name__)
            raise
        call.done(None if error is None else type(error).__name__)
        if error is not None and raise_on_error:
            raise error
        return replies
    raise AssertionError("unreachable: the last attempt returns or raises")


_kept: weakref.WeakKeyDictionary[ConnectionPool, list[AbstractConnection]] = (
    weakref.WeakKeyDictionary()
)
"""Each pool's connections leased by `_lease` and idle between round trips."""


async def _lease(pool: ConnectionPool) -> AbstractConnection:
    kept = _kept.get(pool)
    if kept:
        return kept.pop()
    connection: AbstractConnection = await pool.get_connection()  # type: ignore[no-untyped-call]
    return connection


def _give_back(pool: ConnectionPool, connection: AbstractConnection) -> None:
    kept = _kept.get(pool)
    if kept is None:
        kept = _kept[pool] = []
    kept.append(connection)


async def _drop_kept(pool: ConnectionPool) -> None:
    """Every connection kept for ``pool`` back to it, disconnected: after a connection
    error the others are likely dead too (a restarted server), and the pool's own checks
    reconnect what it hands out next."""
    for connection in _kept.pop(pool, []):
        await _discard(pool, connection)


async def _discard(pool: ConnectionPool, connection: AbstractConnection) -> None:
    await connection.disconnect()
    # (not in use any more when the pool was reset meanwhile: nothing to give back)
    with contextlib.suppress(KeyError):
        await pool.release(connection)


async def _round_trip(
    redis: aioredis.Redis, writes: Iterable[tuple[bytes, int]]
) -> tuple[list[Any], ResponseError | None]:
    """`send_packed`'s exchange on one leased connection: the replies (error replies in
    their places) and the first error reply."""
    pool = redis.connection_pool
    connection = await _lease(pool)
    limit = connection.socket_timeout
    # One deadline for the whole trip, the client's socket timeout: redis-py applies it
    # to each write (`asyncio.wait_for`, a task each) and each reply (a timer each).
    connection.socket_timeout = None
    try:
        async with asyncio.timeout(limit):
            expected = 0
            for data, count in writes:
                await connection.send_packed_command(data, check_health=expected == 0)
                expected += count
            replies: list[Any] = []
            error: ResponseError | None = None
            for _ in range(expected):
                try:
                    replies.append(await connection.read_response())
                except ResponseError as exc:  # read the others, then report the first
                    error = error or exc
                    replies.append(exc)
    except BaseException as exc:
        # Replies may be left unread (a failed encoding, a cancellation, a lost server):
        # the connection cannot be reused.
        await _discard(pool, connection)
        if isinstance(exc, RedisConnectionError):
            await _drop_kept(pool)
        if isinstance(exc, TimeoutError):
            raise RedisTimeoutError(f"Redis did not answer within {limit} s") from exc
        raise
    finally:
        connection.socket_timeout = limit
    _give_back(pool, connection)
    return replies, error


async def commands(redis: aioredis.Redis, batch: Sequence[Sequence[Arg]]) -> list[Any]:
    """The replies of ``batch`` (commands as argument lists), in one write."""
    if not batch:
        return []
    return await send_packed(redis, [(b"".join(pack(*c) for c in batch), len(batch))])


def pairs(reply: Any) -> Iterator[tuple[Any, Any]]:
    """The (field, value) pairs of an ``HGETALL`` reply: a flat list in RESP2, a map in
    RESP3."""
    if isinstance(reply, dict):
        return iter(reply.items())
    it = iter(reply)
    return zip(it, it, strict=True)
