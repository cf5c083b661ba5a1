"""Reading the serving version of a published model: shared by serving and training.

Training (training/publish.py) writes each model version's records under
``rs:{ns}:model:{name}:{version}:{suffix}`` and flips ``rs:{ns}:model:{name}:current``.
Serving reads the pointer and the records in one atomic Lua call (`read_current`,
`read_current_many`), so a request never mixes two versions nor reads one that garbage
collection is deleting. This module lives in recstream/ because serving must not import
training; training re-exports these names from `training.publish`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from recstream.keys import Keys

__all__ = [
    "CurrentRecord",
    "Lua",
    "as_text",
    "current_version",
    "read_current",
    "read_current_many",
    "run_lua",
]


@dataclass(frozen=True, slots=True)
class Lua:
    """A Lua script, run by its SHA1 so the hot path does not resend its text."""

    text: str
    sha: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.text.encode()).hexdigest())


async def run_lua(redis: aioredis.Redis, script: Lua, numkeys: int, *args: Any) -> Any:
    """EVALSHA, falling back to EVAL (which caches the script) on a fresh server."""
    try:
        return await redis.evalsha(script.sha, numkeys, *args)
    except NoScriptError:
        return await redis.eval(script.text, numkeys, *args)


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
