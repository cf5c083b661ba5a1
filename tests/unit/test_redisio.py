"""`recstream.redisio`: hot-path round trips packed by hiredis (the agents', serving's state
read and served log), against a real
Redis: the same replies a redis-py pipeline gets, error replies raised once every reply
is read, and the connection usable afterwards; and the feature copies' read through it."""

from __future__ import annotations

import asyncio
import math
import random

import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from agents.features import _hashes
from recstream.keys import Keys
from recstream.published import Lua, run_lua
from recstream.redisio import commands, exact, pack, pairs, send_packed
from recstream.settings import Settings
from tests.conftest import unique


def test_pack_is_redis_py_s() -> None:
    """Byte for byte what redis-py's packer sends, for str, bytes and int arguments."""
    connection = aioredis.Redis().connection_pool.make_connection()  # type: ignore[no-untyped-call]
    for command in (
        ("LRANGE", "rs:ns:win:é", 0, 49),
        ("MGET", "a", "", "b" * 10_000),
        ("HSET", b"k", b"\x00\xff\r\n", -17),
    ):
        assert pack(*command) == b"".join(connection.pack_command(*command))


# floats of every form: exponents both ways, subnormals, the extremes, integers, and
# the trending part's decayed scores' magnitudes
_FLOATS = [
    0.0, -0.0, 1.0, 3.0, 0.1, 1 / 3, 123.456, 1e16, 1e22, 1.5e-7, 1e-5, 2.0**60, 5e-324,
    2.2250738585072014e-308, 1.7976931348623157e308, 1.152921504606847e18,
    *(random.Random(7).uniform(0, 1) * 10.0 ** random.Random(n).randint(-12, 24)
      for n in range(300)),
]  # fmt: skip


def test_exact_reads_back_as_the_same_float() -> None:
    for x in _FLOATS:
        assert float(exact(x)) == x
        assert math.copysign(1, float(exact(x))) == math.copysign(1, x)
    # orjson would write these as null
    assert [exact(math.inf), exact(-math.inf), exact(math.nan)] == ["inf", "-inf", "nan"]


async def test_exact_is_the_score_repr_gives(redis_client: aioredis.Redis) -> None:
    """Redis parses ``exact``'s text into the score it parses ``repr``'s into: the
    trending part's increments store the same doubles as before (session 11)."""
    a, b = unique("za"), unique("zb")
    # (as the script gives them: the increment's text as it is)
    await commands(
        redis_client,
        [
            ("ZINCRBY", key, text(x), str(n))
            for n, x in enumerate(_FLOATS)
            for key, text in ((a, exact), (b, repr))
        ],
    )
    assert await redis_client.zrange(a, 0, -1, withscores=True) == await redis_client.zrange(
        b, 0, -1, withscores=True
    )
    assert len(await redis_client.zrange(a, 0, -1)) == len(_FLOATS)


async def test_commands_reply_as_a_pipeline(redis_client: aioredis.Redis) -> None:
    key, hash_key, missing = unique("l"), unique("h"), unique("m")
    await redis_client.rpush(key, b"a", b"b", b"c")
    await redis_client.hset(hash_key, mapping={"x": b"1", "y": b"\x00"})
    pipe = redis_client.pipeline(transaction=False)
    pipe.lrange(key, 0, 1)
    pipe.hgetall(hash_key)
    pipe.hgetall(missing)
    pipe.mget([key + "nope", missing])
    lrange, hgetall, empty, mget = await pipe.execute()
    got = await commands(
        redis_client,
        [
            ("LRANGE", key, 0, 1),
            ("HGETALL", hash_key),
            ("HGETALL", missing),
            ("MGET", key + "nope", missing),
        ],
    )
    assert got[0] == lrange
    assert dict(pairs(got[1])) == hgetall
    assert dict(pairs(got[2])) == empty == {}
    assert got[3] == mget
    assert await commands(redis_client, []) == []


async def test_an_error_reply_is_raised_after_every_reply_is_read(
    redis_client: aioredis.Redis,
) -> None:
    text, counter = unique("s"), unique("c")
    await redis_client.set(text, "not a list")
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await send_packed(
            redis_client,
            [(pack("LRANGE", text, 0, 1) + pack("INCR", counter), 2), (pack("INCR", counter), 1)],
        )
    # the commands after the error ran, and the client goes on as before
    assert await redis_client.get(counter) == b"2"
    assert await commands(redis_client, [("INCR", counter)]) == [3]


async def test_feature_copies_read_the_same_through_either_client(
    redis_client: aioredis.Redis, settings: Settings
) -> None:
    """The durable copies' read of feature hashes gives str fields and bytes embedding
    values, whether the client replies with bytes (the agents') or decodes them."""
    ns, actor = settings.namespace, unique("u")
    keys = Keys(ns)
    await redis_client.hset(keys.features(actor), mapping={"n": "3", "a:cat:é": "1.5@10"})
    await redis_client.hset(keys.embedding(actor), mapping={"v": "v1", "x": "abc"})
    expected = [({"n": "3", "a:cat:é": "1.5@10"}, {"v": b"v1", "x": b"abc"})]
    assert await _hashes(redis_client, [(ns, actor)]) == expected
    decoding = aioredis.from_url(settings.redis_url, decode_responses=True)
    try:
        assert await _hashes(decoding, [(ns, actor)]) == expected
    finally:
        await decoding.aclose()


async def test_round_trips_are_timed_as_pipelines(redis_client: aioredis.Redis) -> None:
    """Each round trip counts in ``recstream_redis_call_seconds`` as a PIPELINE, and an
    error reply in ``recstream_redis_call_errors_total``, as a redis-py pipeline's do."""

    def sample(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    timed = sample("recstream_redis_call_seconds_count", command="PIPELINE")
    failed = sample("recstream_redis_call_errors_total", command="PIPELINE", error="ResponseError")
    key = unique("t")
    await commands(redis_client, [("SET", key, "1"), ("GET", key)])
    assert sample("recstream_redis_call_seconds_count", command="PIPELINE") == timed + 1
    with pytest.raises(ResponseError):
        await commands(redis_client, [("LRANGE", key, 0, 1)])  # a string: WRONGTYPE
    assert sample("recstream_redis_call_seconds_count", command="PIPELINE") == timed + 2
    assert (
        sample("recstream_redis_call_errors_total", command="PIPELINE", error="ResponseError")
        == failed + 1
    )


async def test_run_lua_runs_a_script_the_server_does_not_know_yet(
    redis_client: aioredis.Redis,
) -> None:
    """NOSCRIPT falls back to EVAL, which caches the script; later calls go by its SHA.
    (A script of its own, so no other test's scripts are flushed.)"""
    script = Lua(f"-- {unique('script')}\nreturn {{KEYS[1], ARGV[1]}}")
    assert await redis_client.script_exists(script.sha) == [False]
    assert await run_lua(redis_client, script, 1, "k", 7) == [b"k", b"7"]
    assert await redis_client.script_exists(script.sha) == [True]
    assert await run_lua(redis_client, script, 1, "k", 8) == [b"k", b"8"]


async def test_errors_can_be_returned_in_their_places(redis_client: aioredis.Redis) -> None:
    """Without ``raise_on_error`` an error reply comes back where its command was (the
    served log's flusher looks for NOSCRIPT among them), and the others are read."""
    key = unique("t")
    replies = await send_packed(
        redis_client,
        [(pack("SET", key, "1") + pack("LRANGE", key, 0, 1) + pack("GET", key), 3)],
        raise_on_error=False,
    )
    assert replies[0] is True or replies[0] == b"OK"
    assert isinstance(replies[1], ResponseError)
    assert replies[2] == b"1"
    assert await redis_client.get(key) == b"1"  # the connection went back usable


async def test_a_connection_its_server_dropped_is_replaced_once(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    """A pooled connection the server closed (as a restart does) fails at its first
    write or read: a list of commands is sent again on a new one, as redis-py's own
    commands are; writes made as they go are not (their caller retries)."""
    client = aioredis.from_url(settings.redis_url)
    try:
        for replayable in (True, False):
            (own_id,) = await commands(client, [("CLIENT", "ID")])  # the one pooled
            await commands(redis_client, [("CLIENT", "KILL", "ID", own_id)])
            writes = [(pack("PING"), 1)]
            if replayable:
                assert await send_packed(client, writes) == [b"PONG"]
            else:
                with pytest.raises(RedisConnectionError):
                    await send_packed(client, iter(writes))
    finally:
        await client.aclose()


async def test_connections_are_kept_between_round_trips(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    """Round trips reuse the connection they leased (no pool lock, no socket check per
    trip), concurrent ones each get their own, and a connection error gives every kept
    connection back to the pool, disconnected."""
    client = aioredis.from_url(settings.redis_url)
    try:
        ((first,),) = [await commands(client, [("CLIENT", "ID")])]
        ((again,),) = [await commands(client, [("CLIENT", "ID")])]
        assert again == first
        pool = client.connection_pool
        assert len(pool._in_use_connections) == 1  # leased, not returned
        ids = await asyncio.gather(*(commands(client, [("CLIENT", "ID")]) for _ in range(3)))
        assert len({i for (i,) in ids}) == 3
        assert len(pool._in_use_connections) == 3
        # every server side gone, as after a restart
        await commands(redis_client, [("CLIENT", "KILL", "ID", i) for (i,) in ids])
        with pytest.raises(RedisConnectionError):
            await send_packed(client, iter([(pack("PING"), 1)]))
        assert len(pool._in_use_connections) == 0
        assert await commands(client, [("PING",)]) == [b"PONG"]  # the pool reconnects
    finally:
        await client.aclose()


async def test_a_round_trip_gives_up_after_the_socket_timeout(settings: Settings) -> None:
    """The client's socket timeout bounds the whole trip (one deadline, not one per
    write and reply): a reply that does not come (a blocking pop on an empty list)
    raises redis-py's TimeoutError, and the connection, its reply unread, is not used
    again."""
    client = aioredis.from_url(settings.redis_url, socket_timeout=0.3)
    try:
        ((before,),) = [await commands(client, [("CLIENT", "ID")])]
        loop = asyncio.get_running_loop()
        began = loop.time()
        with pytest.raises(RedisTimeoutError):
            await commands(client, [("BLPOP", unique("empty"), 2)])
        assert 0.25 < loop.time() - began < 1.5
        ((after,),) = [await commands(client, [("CLIENT", "ID")])]
        assert after != before
        pool = client.connection_pool
        # every connection, the one given back to the pool too, has its timeout back
        connections = [*pool._available_connections, *pool._in_use_connections]
        assert connections
        assert all(c.socket_timeout == 0.3 for c in connections)
    finally:
        await client.aclose()
