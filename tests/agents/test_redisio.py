"""`agents.redisio`: the agents' hot-path round trips, packed by hiredis, against a real
Redis: the same replies a redis-py pipeline gets, error replies raised once every reply
is read, and the connection usable afterwards; and the feature copies' read through it."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY
from redis.exceptions import ResponseError

from agents.features import _hashes
from agents.redisio import commands, pack, pairs, send_packed
from recstream.keys import Keys
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
