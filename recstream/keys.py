"""The Redis key layout, in one place. docs/architecture.md lists who writes and reads each.

Every key starts with ``rs:{namespace}:`` so one Redis can serve several sites or
surfaces, and every key has a cap or a TTL so memory stays bounded:

    rs:{ns}:win:{actor}                 LIST  recent interactions, newest first   cap + TTL
    rs:{ns}:seen:{actor}                ZSET  event ids applied (idempotence)      cap + TTL
    rs:{ns}:pop                         ZSET  item -> weighted interaction count  cap
    rs:{ns}:pop:touched                 ZSET  item -> last counted (evicts LRU)   cap
    rs:{ns}:model:{name}:current        STR   serving version of a trained model  one per model
    rs:{ns}:model:{name}:{version}:...  *     that version's published data       last K versions

``actor`` is the user id, or ``session:{session_id}`` for anonymous visitors.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Keys"]


@dataclass(frozen=True, slots=True)
class Keys:
    namespace: str = "default"

    @property
    def prefix(self) -> str:
        return f"rs:{self.namespace}:"

    def window(self, actor: str) -> str:
        return f"{self.prefix}win:{actor}"

    def seen(self, actor: str) -> str:
        return f"{self.prefix}seen:{actor}"

    @property
    def popularity(self) -> str:
        return f"{self.prefix}pop"

    @property
    def popularity_touched(self) -> str:
        """item -> when last counted; the popularity cap evicts the least recent."""
        return f"{self.prefix}pop:touched"

    def model_pointer(self, name: str) -> str:
        return f"{self.prefix}model:{name}:current"

    def model(self, name: str, version: str, suffix: str) -> str:
        return f"{self.prefix}model:{name}:{version}:{suffix}"
