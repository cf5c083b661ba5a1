"""What the pipeline answers: the response shape every endpoint keeps.

``{"recommendation_id", "namespace", "actor", "items": [{"item_id", "score", "reasons",
("title", "categories" when the catalog knows the item)}], "degraded", "took_ms"}``, plus
``"debug"`` when asked for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from streams.schema import Item

__all__ = ["Recommendation", "Recommendations"]


@dataclass(frozen=True, slots=True)
class Recommendation:
    item_id: str
    score: float
    reasons: tuple[str, ...]
    item: Item | None = None

    def as_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "item_id": self.item_id,
            "score": round(self.score, 6),
            "reasons": list(self.reasons),
        }
        if self.item is not None:
            if self.item.title is not None:
                doc["title"] = self.item.title
            if self.item.categories:
                doc["categories"] = list(self.item.categories)
        return doc


@dataclass
class Recommendations:
    recommendation_id: str
    namespace: str
    actor: str | None
    items: list[Recommendation]
    degraded: list[str] = field(default_factory=list)
    took_ms: float = 0.0
    debug: dict[str, Any] | None = None

    def as_json(self) -> dict[str, object]:
        doc: dict[str, object] = {
            "recommendation_id": self.recommendation_id,
            "namespace": self.namespace,
            "actor": self.actor,
            "items": [r.as_json() for r in self.items],
            "degraded": self.degraded,
            "took_ms": round(self.took_ms, 3),
        }
        if self.debug is not None:
            doc["debug"] = self.debug
        return doc
