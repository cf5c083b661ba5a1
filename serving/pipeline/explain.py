"""Stage 7: the reasons of each item, strongest contribution first, and the debug view.

=======================  =========================================
source                   reason
=======================  =========================================
recently_viewed          ``recently_interacted``
item2item                ``similar_to:{history item}``
sknn                     ``session_neighbours``
als                      ``als``
trending                 ``trending``
popularity               ``popular``
category_popularity      ``popular_in:{category}``
=======================  =========================================
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from serving.pipeline.types import Candidate

__all__ = ["debug_view", "explain", "reason_of"]

_REASONS = {
    "recently_viewed": "recently_interacted",
    "sknn": "session_neighbours",
    "als": "als",
    "trending": "trending",
    "popularity": "popular",
}


def reason_of(candidate: Candidate, source: str) -> str:
    if source == "item2item":
        return f"similar_to:{candidate.because}" if candidate.because else "similar_items"
    if source == "category_popularity":
        return f"popular_in:{candidate.category}" if candidate.category else "popular_in_category"
    return _REASONS.get(source, source)


def explain(candidates: Sequence[Candidate]) -> None:
    for candidate in candidates:
        parts = candidate.contributions or dict.fromkeys(candidate.sources, 0.0)
        # (most items have one source: nothing to sort)
        order = list(parts) if len(parts) < 2 else sorted(parts, key=lambda s: (-parts[s], s))
        candidate.reasons = [reason_of(candidate, source) for source in order]


def debug_view(candidate: Candidate) -> dict[str, Any]:
    return {
        "item_id": candidate.item_id,
        "score": round(candidate.score, 6),
        "sources": {
            source: {"score": round(value, 6), "rank": candidate.ranks.get(source)}
            for source, value in candidate.sources.items()
        },
        "contributions": {k: round(v, 6) for k, v in candidate.contributions.items()},
        "features": {k: round(v, 6) for k, v in candidate.features.items()},
        "seen": candidate.seen,
        "reasons": candidate.reasons,
    }
