"""Stage 1: the actor's live state in ONE Redis round trip, with the durable fallback.

One non-transactional pipeline reads the window (``rs:{ns}:win:{actor}``), the feature
hash (``rs:{ns}:feat:{actor}``) and the live embedding (``rs:{ns}:emb:{actor}``), both
written by agents/features and empty until it runs, and the serving pointer of every
published model (``rs:{ns}:model:{name}:current``), so the candidate sources know which
versions to use without another trip.

When Redis holds no window, the durable copy in DynamoDB tells a new actor from one whose
window Redis lost; a found window is merged back into Redis off the request path.
`RecentMisses` remembers actors found in neither store, so a stream of requests from new
visitors does not cost a DynamoDB read each.
"""

from __future__ import annotations

import time
from collections import OrderedDict

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from agents.state import WindowEntry
from recstream.errors import StoreUnavailable
from recstream.keys import Keys
from recstream.published import as_text
from serving.pipeline.models import MODEL_NAMES
from serving.pipeline.types import UserState

__all__ = ["RecentMisses", "read_state", "read_versions"]


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


async def read_state(
    redis: aioredis.Redis, namespace: str, actor: str | None, window_size: int
) -> UserState:
    """The actor's window, features, embedding and the model pointers, in one round trip.
    ``actor`` None (related items, trending) reads only the pointers."""
    keys = Keys(namespace)
    pipe = redis.pipeline(transaction=False)
    if actor is not None:
        pipe.lrange(keys.window(actor), 0, window_size - 1)
        pipe.hgetall(keys.features(actor))
        pipe.hgetall(keys.embedding(actor))
    pipe.mget([keys.model_pointer(name) for name in MODEL_NAMES])
    try:
        replies = await pipe.execute()
    except RedisError as exc:
        raise StoreUnavailable(f"reading the live state of {actor!r} failed: {exc}") from exc
    pointers = replies[-1]
    versions = {
        name: as_text(v) for name, v in zip(MODEL_NAMES, pointers, strict=True) if v is not None
    }
    if actor is None:
        return UserState([], {}, {}, versions)
    window = [WindowEntry.loads(raw) for raw in replies[0]]
    features = {k: as_text(v) for k, v in _hash(replies[1]).items()}
    return UserState(window, features, _hash(replies[2]), versions)


async def read_versions(redis: aioredis.Redis, namespace: str) -> dict[str, str]:
    return (await read_state(redis, namespace, None, 1)).versions
