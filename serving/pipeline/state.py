"""Stage 1: the actor's live state in ONE Redis round trip, with the durable fallback.

One script call reads the window (``rs:{ns}:win:{actor}``), the feature hash
(``rs:{ns}:feat:{actor}``) and the live embedding (``rs:{ns}:emb:{actor}``), both written
by agents/features and empty until it runs, and the serving pointer of every published
model (``rs:{ns}:model:{name}:current``), so the candidate sources know which versions
to use without another trip. (A pipeline of the four commands read the same; as one
command redis-py packs one request and parses one reply, and a recommendation costs
4-8 % fewer CPU instructions: docs/serving-speed.md, session 9.)

When Redis holds no window, the durable copy in DynamoDB tells a new actor from one whose
window Redis lost; a found window is merged back into Redis off the request path.
`RecentMisses` remembers actors found in neither store, so a stream of requests from new
visitors does not cost a DynamoDB read each. `DurableActorState` is that durable store as
serving uses it: it reads the actor's feature vector's copy (`recstream.features`, which
agents/features writes) beside the window, and puts the vector back in Redis when Redis
lost it, so an actor whose state Redis lost gets back the affinities and live embedding
the agents had built, without waiting for their next event.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import pickle
import time
from collections import OrderedDict
from collections.abc import ItemsView, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from recstream.errors import RecstreamError, StoreUnavailable
from recstream.features import DynamoFeatures, FeatureCopy
from recstream.keys import Keys
from recstream.published import Lua, as_text, run_lua
from recstream.redisio import pairs
from recstream.settings import Settings
from recstream.windows import Actor, DurableWindows, WindowEntry
from serving.pipeline.models import MODEL_NAMES
from serving.pipeline.types import UserState

__all__ = [
    "DurableActorState",
    "RawState",
    "RecentMisses",
    "read_raw_state",
    "read_state",
    "read_versions",
    "restore_features",
]

log = logging.getLogger(__name__)

# Put a feature vector's durable copy back, only where Redis has none: if the agents
# created the hash meanwhile (an event arrived), they merge the copy themselves
# (agents.features.recover_lost_features), and writing it here too would count it twice.
# KEYS: feat, emb  ARGV: ttl, n feature fields, fields and values..., embedding fields...
_RESTORE_FEATURES = Lua("""
local n = tonumber(ARGV[2])
local wrote = 0
if n > 0 and redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], unpack(ARGV, 3, 2 + 2 * n))
  redis.call('EXPIRE', KEYS[1], ARGV[1])
  wrote = 1
end
if #ARGV > 2 + 2 * n and redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('HSET', KEYS[2], unpack(ARGV, 3 + 2 * n))
  redis.call('EXPIRE', KEYS[2], ARGV[1])
  wrote = wrote + 2
end
return wrote
""")


# The live state of one actor in one command (`read_raw_state`).
# KEYS: window, feat, emb, the model pointers  ARGV: the window's last index
_READ_STATE = Lua("""
return {
  redis.call('LRANGE', KEYS[1], 0, ARGV[1]),
  redis.call('HGETALL', KEYS[2]),
  redis.call('HGETALL', KEYS[3]),
  redis.call('MGET', unpack(KEYS, 4))
}
""")


async def restore_features(
    redis: aioredis.Redis, settings: Settings, namespace: str, actor: str, copy: FeatureCopy
) -> bool:
    """Write ``copy`` back as the actor's ``feat``/``emb`` hashes where Redis has none."""
    keys = Keys(namespace)
    args: list[str | bytes | int] = [settings.window_ttl_s, len(copy.features)]
    for field, value in copy.features.items():
        args += [field, value]
    for field, raw in copy.embedding.items():
        args += [field, raw]
    written = await run_lua(
        redis, _RESTORE_FEATURES, 2, keys.features(actor), keys.embedding(actor), *args
    )
    return bool(written)


class DurableActorState:
    """The durable copies of an actor, as serving falls back on them (`DurableWindows`):
    the window, and beside it the feature vector, put back in Redis when Redis lost it."""

    def __init__(
        self,
        windows: DurableWindows,
        features: DynamoFeatures,
        redis: aioredis.Redis,
        settings: Settings,
    ) -> None:
        self.windows = windows
        self.features = features
        self.redis = redis
        self.settings = settings

    async def put(self, windows: Mapping[Actor, Sequence[WindowEntry]]) -> None:
        await self.windows.put(windows)

    async def get_many(self, actors: Sequence[Actor]) -> dict[Actor, list[WindowEntry]]:
        return await self.windows.get_many(actors)

    async def get(self, namespace: str, actor: str) -> list[WindowEntry] | None:
        window, _ = await asyncio.gather(
            self.windows.get(namespace, actor), self._features(namespace, actor)
        )
        return window

    async def _features(self, namespace: str, actor: str) -> None:
        # Best effort: the window is what the request waits for.
        try:
            copy = (await self.features.get_many([(namespace, actor)])).get((namespace, actor))
            if copy is not None and copy.features:
                await restore_features(self.redis, self.settings, namespace, actor, copy)
        except (RecstreamError, RedisError, OSError) as exc:
            log.warning("restoring the features of %s/%s failed: %s", namespace, actor, exc)


class RecentMisses:
    """Actors recently found in neither store. Bounded in size and age; Redis is still
    read first on every request, so an actor who starts clicking is seen at once."""

    def __init__(self, ttl: float = 60.0, size: int = 100_000) -> None:
        self.ttl = ttl
        self.size = size
        self._at: OrderedDict[tuple[str, str], float] = OrderedDict()

    def __contains__(self, key: tuple[str, str]) -> bool:
        at = self._at.get(key)
        return at is not None and time.monotonic() - at < self.ttl

    def add(self, key: tuple[str, str]) -> None:
        self._at[key] = time.monotonic()
        self._at.move_to_end(key)
        while len(self._at) > self.size:
            self._at.popitem(last=False)

    def discard(self, key: tuple[str, str]) -> None:
        self._at.pop(key, None)


def _hash(raw: dict[bytes, bytes] | dict[str, str]) -> dict[str, bytes]:
    return {as_text(k): v if isinstance(v, bytes) else v.encode() for k, v in raw.items()}


_ENTRIES: dict[bytes, WindowEntry] = {}
_MAX_ENTRIES = 100_000
"""Window entries parsed, by their bytes. A window changes by one entry per event, and
an active actor asks again and again, so most of a request's ~50 entries were parsed
before: a dict lookup instead of a JSON parse and an object each (about 3 % of a
request's CPU). Entries are immutable. Bounded (≈ 30 MB at most) and emptied when
full: simpler than LRU order, and refilled within a few requests' worth of parsing."""


class _TextHash(Mapping[str, str]):
    """A hash as the state read returns it (bytes), decoded to text when first read. The
    feature hash is read for the answer cache's fingerprint and for category popularity's
    fallback (its ``a:cat:*`` affinities, used only when the catalog knows no category of
    the history); decoding its ~30 fields on every request cost ~50 µs for nothing."""

    __slots__ = ("_raw", "_text")

    def __init__(self, raw: Mapping[bytes, bytes]) -> None:
        self._raw = raw
        self._text: dict[str, str] | None = None

    def _decoded(self) -> dict[str, str]:
        if self._text is None:
            self._text = {as_text(k): as_text(v) for k, v in self._raw.items()}
        return self._text

    def __getitem__(self, key: str) -> str:
        return self._decoded()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._decoded())

    def __len__(self) -> int:
        return len(self._raw)

    def items(self) -> ItemsView[str, str]:
        return self._decoded().items()


def _entry(raw: bytes) -> WindowEntry:
    entry = _ENTRIES.get(raw)
    if entry is None:
        if len(_ENTRIES) >= _MAX_ENTRIES:
            _ENTRIES.clear()
        entry = _ENTRIES[raw] = WindowEntry.loads(raw)
    return entry


class RawState(NamedTuple):
    """The replies of `read_state`'s round trip, before parsing: what the answer cache
    (serving/pipeline/memo.py) fingerprints, so a reused answer parses nothing."""

    actor: str | None
    replies: list[Any]

    def fingerprint(self) -> bytes:
        """A 16-byte digest of everything read: equal digests, equal live state."""
        return hashlib.blake2b(pickle.dumps(self.replies, 5), digest_size=16).digest()

    def parse(self) -> UserState:
        pointers = self.replies[-1]
        versions = {
            name: as_text(v) for name, v in zip(MODEL_NAMES, pointers, strict=True) if v is not None
        }
        if self.actor is None:
            return UserState([], {}, {}, versions)
        replies = self.replies
        known = _ENTRIES.get  # (most entries were parsed before: no call for those)
        window = [known(raw) or _entry(raw) for raw in replies[0]]
        return UserState(window, _TextHash(replies[1]), _hash(replies[2]), versions)


async def read_raw_state(
    redis: aioredis.Redis, namespace: str, actor: str | None, window_size: int
) -> RawState:
    """`read_state`'s one round trip, unparsed."""
    keys = Keys(namespace)
    pointers = [keys.model_pointer(name) for name in MODEL_NAMES]
    try:
        if actor is None:
            return RawState(actor, [await redis.mget(pointers)])
        window, features, embedding, found = await run_lua(
            redis,
            _READ_STATE,
            3 + len(pointers),
            keys.window(actor),
            keys.features(actor),
            keys.embedding(actor),
            *pointers,
            window_size - 1,
        )
    except RedisError as exc:
        raise StoreUnavailable(f"reading the live state of {actor!r} failed: {exc}") from exc
    # (a hash comes out of a script flat: field, value, field, ...)
    return RawState(actor, [window, dict(pairs(features)), dict(pairs(embedding)), found])


async def read_state(
    redis: aioredis.Redis, namespace: str, actor: str | None, window_size: int
) -> UserState:
    """The actor's window, features, embedding and the model pointers, in one round trip.
    ``actor`` None (related items, trending) reads only the pointers."""
    return (await read_raw_state(redis, namespace, actor, window_size)).parse()


async def read_versions(redis: aioredis.Redis, namespace: str) -> dict[str, str]:
    return (await read_state(redis, namespace, None, 1)).versions
