"""Reading the serving version of a published model: shared by serving and training.

Training (training/publish.py) writes each model version's records under
``rs:{ns}:model:{name}:{version}:{suffix}`` and flips ``rs:{ns}:model:{name}:current``.
Serving reads the pointer and the records in one atomic Lua call (`read_current`,
`read_current_many`), so a request never mixes two versions nor reads one that garbage
collection is deleting. This module lives in recstream/ because serving must not import
training; training re-exports these names from `training.publish`.

It also holds what serving needs to rebuild the registry after Redis lost it
(`recstream.model_restore`) without training's code: the format of a version's record
dump in S3 (``redis-records.jsonl.gz``, the exact records publishing wrote), the durable
copy of each namespace's serving pointer (``model-pointers/{namespace}/{name}.json``),
and the registry's bookkeeping scripts (claim, complete, promote).
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import orjson
import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from recstream import redisio
from recstream.keys import Keys

__all__ = [
    "BYTES_PER_COMMAND",
    "CLAIM",
    "COMPLETE",
    "MEMBERS_PER_COMMAND",
    "PROMOTE",
    "REDIS_RECORDS",
    "SERVING_PREFIX",
    "CurrentRecord",
    "Lua",
    "as_text",
    "current_version",
    "decode_records",
    "encode_record",
    "queue_record",
    "read_current",
    "read_current_many",
    "run_lua",
    "serving_pointer_key",
]


@dataclass(frozen=True, slots=True)
class Lua:
    """A Lua script, run by its SHA1 so the hot path does not resend its text."""

    text: str
    sha: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.text.encode()).hexdigest())


async def run_lua(redis: aioredis.Redis, script: Lua, numkeys: int, *args: Any) -> Any:
    """EVALSHA, falling back to EVAL (which caches the script) on a fresh server.

    One command packed by hiredis on a pooled connection (`recstream.redisio`): redis-py
    packs each argument in Python, and serving's state read, one script call a request,
    paid a tenth of its CPU for it (docs/serving-speed.md, session 12). Timed as
    ``EVALSHA`` (or ``EVAL``), as the client's own call is."""
    try:
        command = redisio.pack("EVALSHA", script.sha, numkeys, *args)
        reply = await redisio.send_packed(redis, [(command, 1)], name="EVALSHA")
    except NoScriptError:
        command = redisio.pack("EVAL", script.text, numkeys, *args)
        reply = await redisio.send_packed(redis, [(command, 1)], name="EVAL")
    return reply[0]


# Reads the pointer and the record it points at in one atomic step, so a reader never
# mixes versions and never sees a version that GC is deleting.
# KEYS: current  ARGV: key prefix up to the version, suffix, limit (-1 = all), fields...
_READ = Lua("""
local v = redis.call('GET', KEYS[1])
if not v then return false end
local key = ARGV[1] .. v .. ':' .. ARGV[2]
local kind = redis.call('TYPE', key)['ok']
if kind == 'zset' then
  return {v, kind, redis.call('ZREVRANGE', key, 0, tonumber(ARGV[3]), 'WITHSCORES')}
elseif kind == 'hash' then
  if #ARGV > 3 then
    return {v, kind, redis.call('HMGET', key, unpack(ARGV, 4))}
  end
  return {v, kind, redis.call('HGETALL', key)}
elseif kind == 'string' then
  return {v, kind, {redis.call('GET', key)}}
end
return {v, 'none', {}}
""")

# KEYS: current  ARGV: key prefix up to the version, limit (-1 = all), suffixes...
_READ_MANY = Lua("""
local v = redis.call('GET', KEYS[1])
if not v then return false end
local out = {v}
for i = 3, #ARGV do
  local key = ARGV[1] .. v .. ':' .. ARGV[i]
  local kind = redis.call('TYPE', key)['ok']
  if kind == 'zset' then
    out[#out + 1] = {kind, redis.call('ZREVRANGE', key, 0, tonumber(ARGV[2]), 'WITHSCORES')}
  elseif kind == 'hash' then
    out[#out + 1] = {kind, redis.call('HGETALL', key)}
  elseif kind == 'string' then
    out[#out + 1] = {kind, {redis.call('GET', key)}}
  else
    out[#out + 1] = {'none', {}}
  end
end
return out
""")


def as_text(value: bytes | str) -> str:
    """A Redis reply (bytes, or str from a decoding client) as text."""
    return value.decode() if isinstance(value, bytes) else value


async def current_version(redis: aioredis.Redis, keys: Keys, name: str) -> str | None:
    """The version of model ``name`` that serving should read, or None if none is live."""
    raw = await redis.get(keys.model_pointer(name))
    return None if raw is None else as_text(raw)


@dataclass(frozen=True, slots=True)
class CurrentRecord:
    """One record of the serving version. ``value`` depends on ``kind``:
    zset → [(member, score), ...] highest first; hash → {field: bytes} (only the fields
    asked for that exist); string → bytes; none → None (the version has no such record)."""

    version: str
    kind: Literal["zset", "hash", "string", "none"]
    value: list[tuple[str, float]] | dict[str, bytes] | bytes | None


def _count(limit: int | None) -> int:
    if limit is None:
        return -1
    if limit < 1:
        raise ValueError(f"limit must be at least 1, not {limit}")
    return limit - 1


def _record(version: str, kind: str, body: list[Any], fields: Sequence[str] = ()) -> CurrentRecord:
    if kind == "zset":
        pairs = [(as_text(body[i]), float(body[i + 1])) for i in range(0, len(body), 2)]
        return CurrentRecord(version, "zset", pairs)
    if kind == "hash":
        if fields:
            found = {f: v for f, v in zip(fields, body, strict=True) if v is not None}
        else:
            found = {as_text(body[i]): body[i + 1] for i in range(0, len(body), 2)}
        return CurrentRecord(version, "hash", found)
    if kind == "string":
        return CurrentRecord(version, "string", body[0])
    return CurrentRecord(version, "none", None)


async def read_current(
    redis: aioredis.Redis,
    keys: Keys,
    name: str,
    suffix: str,
    *,
    limit: int | None = None,
    fields: Sequence[str] = (),
) -> CurrentRecord | None:
    """Read record ``suffix`` of model ``name``'s serving version in one round trip.

    Returns None when the model has no serving version. ``limit`` caps a zset's members
    (highest scores first); ``fields`` selects hash fields (all when empty).
    """
    prefix = keys.model(name, "", "")[:-1]  # "rs:{ns}:model:{name}:"
    reply = await run_lua(
        redis, _READ, 1, keys.model_pointer(name), prefix, suffix, _count(limit), *fields
    )
    if reply is None:
        return None
    return _record(as_text(reply[0]), as_text(reply[1]), reply[2], fields)


async def read_current_many(
    redis: aioredis.Redis,
    keys: Keys,
    name: str,
    suffixes: Sequence[str],
    *,
    limit: int | None = None,
) -> dict[str, CurrentRecord] | None:
    """Several records of the serving version (e.g. the neighbours of each item in a
    history) in one round trip, all from the same version. None when nothing serves."""
    prefix = keys.model(name, "", "")[:-1]
    reply = await run_lua(
        redis, _READ_MANY, 1, keys.model_pointer(name), prefix, _count(limit), *suffixes
    )
    if reply is None:
        return None
    version = as_text(reply[0])
    return {
        suffix: _record(version, as_text(kind), body)
        for suffix, (kind, body) in zip(suffixes, reply[1:], strict=True)
    }


# --- what a restore needs, shared by training (publish) and serving (automatic restore) ---

REDIS_RECORDS = "redis-records.jsonl.gz"
"""Beside a version's manifest: every record it wrote to Redis, one JSON line each
(`encode_record`), so the registry can be rebuilt without loading the model."""
SERVING_PREFIX = "model-pointers/"
"""S3 prefix of the durable serving pointers (model names start with a letter or a digit,
so no model's own prefix can collide with it)."""


def serving_pointer_key(namespace: str, name: str) -> str:
    """S3 key of the copy of ``rs:{namespace}:model:{name}:current``."""
    return f"{SERVING_PREFIX}{namespace}/{name}.json"


def encode_record(suffix: str, kind: str, value: Any) -> bytes:
    """One line of a record dump: zset members with scores, hash fields and strings as
    base64 (they are bytes: float vectors, serialized indexes)."""
    doc: dict[str, Any] = {"s": suffix, "k": kind}
    if kind == "zset":
        doc["v"] = [[str(m), float(score)] for m, score in cast(Mapping[str, float], value).items()]
    elif kind == "hash":
        doc["v"] = {str(f): base64.b64encode(_bytes(v)).decode() for f, v in value.items()}
    elif kind == "string":
        doc["v"] = base64.b64encode(_bytes(value)).decode()
    else:
        raise TypeError(f"record {suffix!r} has unknown kind {kind!r}")
    return orjson.dumps(doc) + b"\n"


def decode_records(lines: bytes) -> Iterator[tuple[str, str, Any]]:
    """(suffix, kind, value) of every record in a dump's (decompressed) lines."""
    for line in lines.splitlines():
        if not line.strip():
            continue
        doc = orjson.loads(line)
        kind = str(doc["k"])
        value: Any
        if kind == "zset":
            value = {str(m): float(score) for m, score in doc["v"]}
        elif kind == "hash":
            value = {str(f): base64.b64decode(v) for f, v in doc["v"].items()}
        else:
            value = base64.b64decode(doc["v"])
        yield str(doc["s"]), kind, value


def _bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


MEMBERS_PER_COMMAND = 1_000
"""Most members one ZADD or HSET carries: a model's record may hold hundreds of thousands
(ALS factors of every item), and one command that large blocks Redis for every client
while it runs (and can pass its query-buffer limit)."""
BYTES_PER_COMMAND = 512 * 1024
"""Largest piece of a string record one SET or APPEND carries, for the same reason."""


def queue_record(pipe: Any, key: str, suffix: str, kind: str, value: Any) -> int:
    """Add one record's writes to ``pipe`` (in bounded commands: the key is a version's,
    which nothing reads before the pointer switch, so the pieces need no atomicity);
    returns how many members it carries."""
    if kind == "string":
        if not isinstance(value, bytes):
            raise TypeError(f"record {suffix!r} is a string record but its value is not bytes")
        pipe.set(key, value[:BYTES_PER_COMMAND])
        for start in range(BYTES_PER_COMMAND, len(value), BYTES_PER_COMMAND):
            pipe.append(key, value[start : start + BYTES_PER_COMMAND])
        return 1
    if not isinstance(value, Mapping):
        raise TypeError(f"record {suffix!r} is a {kind} but its value is not a mapping")
    if not value:
        return 0  # Redis has no empty zset or hash; a missing key reads as empty.
    if kind not in ("zset", "hash"):
        raise TypeError(f"record {suffix!r} has unknown kind {kind!r}")
    items = list(value.items())
    for start in range(0, len(items), MEMBERS_PER_COMMAND):
        piece = items[start : start + MEMBERS_PER_COMMAND]
        if kind == "zset":
            pipe.zadd(key, {str(k): float(cast(float, v)) for k, v in piece})
        else:
            pipe.hset(key, mapping=dict(piece))
    return len(value)


# The registry's bookkeeping (docs/publishing.md); training/publish.py holds the others.
# Claim a version's publish (or restore) lease, unless the id is in use anywhere: reusing
# a live id would let the failure path delete the serving version's data.
# KEYS: pending, versions, doomed  ARGV: version, lease deadline
CLAIM = Lua("""
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return 0 end
if redis.call('SISMEMBER', KEYS[3], ARGV[1]) == 1 then return 0 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
return 1
""")
# KEYS: pending, versions  ARGV: version, summary
COMPLETE = Lua("""
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return 1
""")
# KEYS: versions, current  ARGV: version
PROMOTE = Lua("""
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('SET', KEYS[2], ARGV[1])
return 1
""")
