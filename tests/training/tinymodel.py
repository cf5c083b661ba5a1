"""A tiny model that implements `training.base.Model`, for the publishing and CLI tests.

It counts items, and can be told to fail part-way through its records, so publishing can
be tested independently of the real models.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar, Self

from training.base import RedisRecord

Interaction = tuple[str, str, float]
"""(user, item, unix time)"""


class Crash(RuntimeError):
    """Raised by a TinyModel told to fail part-way through its records."""


class TinyModel:
    """Popularity by count; records: zset ``top``, hash ``meta``, string ``blob``, and
    ``extra`` zsets ``n:{i}`` (to make a publish span several pipeline chunks)."""

    name: ClassVar[str] = "tiny"

    def __init__(
        self,
        *,
        fail_after: int | None = None,
        extra: int = 0,
        hook: Callable[[int], None] | None = None,
    ) -> None:
        self.counts: Counter[str] = Counter()
        self.fail_after = fail_after
        self.extra = extra
        self.hook = hook
        """Called with the record's index before each record is produced."""

    def fit(self, log: Any) -> Self:
        # Any: the Model protocol says InteractionLog; this model takes (user, item, time)s.
        rows: Iterable[Interaction] = log
        self.counts = Counter(item for _, item, _ in rows)
        return self

    def recommend(
        self, history: list[str], k: int, *, user_id: str | None = None, now: float | None = None
    ) -> list[tuple[str, float]]:
        return [(item, float(n)) for item, n in self.counts.most_common(k)]

    def save(self, directory: Path) -> None:
        (directory / "counts.json").write_text(json.dumps(dict(self.counts)))
        (directory / "nested").mkdir()
        (directory / "nested" / "params.json").write_text(json.dumps(self.params()))

    @classmethod
    def load(cls, directory: Path) -> Self:
        model = cls(**json.loads((directory / "nested" / "params.json").read_text()))
        model.counts = Counter(json.loads((directory / "counts.json").read_text()))
        return model

    def params(self) -> dict[str, Any]:
        return {"fail_after": self.fail_after, "extra": self.extra}

    def redis_records(self) -> Iterator[RedisRecord]:
        records = [
            RedisRecord("top", "zset", {k: float(v) for k, v in self.counts.items()}),
            RedisRecord("meta", "hash", {"items": str(len(self.counts)).encode(), "x": b"1"}),
            RedisRecord("blob", "string", b"\x00\x01binary"),
        ]
        records += [
            RedisRecord(f"n:{i}", "zset", {f"item{j}": float(j) for j in range(50)})
            for i in range(self.extra)
        ]
        for produced, record in enumerate(records):
            if self.hook is not None:
                self.hook(produced)
            if self.fail_after is not None and produced >= self.fail_after:
                raise Crash(f"tiny model told to fail after {self.fail_after} records")
            yield record


class OtherTiny(TinyModel):
    name: ClassVar[str] = "other"
