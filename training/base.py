"""What every trained model provides, and what publishing writes to Redis for serving.

A model is fitted offline, saved as files (uploaded to S3 under
``models/<name>/<version>/``), and exports the data that serving reads at request time as
`RedisRecord`s. Publishing writes each record under a versioned key,

    rs:{namespace}:model:{name}:{version}:{suffix}

and then flips ``rs:{namespace}:model:{name}:current`` to the version in one atomic write,
so serving never sees a half-published model.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, Self

if TYPE_CHECKING:
    from training.data import InteractionLog

__all__ = ["Model", "RedisRecord"]


@dataclass(frozen=True, slots=True)
class RedisRecord:
    """One key that serving reads; ``suffix`` is appended to the version's key prefix."""

    suffix: str
    kind: Literal["zset", "hash", "string"]
    value: Mapping[str, float] | Mapping[str, bytes] | bytes


class Model(Protocol):
    """fit / recommend / save / load, plus what serving needs from Redis."""

    name: ClassVar[str]

    def fit(self, log: InteractionLog) -> Self: ...

    def recommend(
        self, history: list[str], k: int, *, user_id: str | None = None, now: float | None = None
    ) -> list[tuple[str, float]]:
        """Top-k (item_id, score) for a user or session whose recent items are ``history``
        (oldest first)."""
        ...

    def save(self, directory: Path) -> None: ...

    @classmethod
    def load(cls, directory: Path) -> Self: ...

    def params(self) -> dict[str, Any]:
        """Hyper-parameters, recorded in the version's manifest."""
        ...

    def redis_records(self) -> Iterator[RedisRecord]: ...
