"""Stage 6: diversity, off by default (it was not measured to help on the datasets).

- ``Settings.diversity_category_cap``: at most that many items of one category (the
  first of the catalog's categories); items beyond the cap move after the others.
- ``Settings.diversity_mmr_lambda``: maximal marginal relevance, greedily choosing
  ``λ · relevance - (1 - λ) · max similarity to the items already chosen``, with
  similarity 1 between items sharing a category, else 0, and relevance the score
  scaled to [0, 1].

Both need categories (an `ItemCatalog`); items without one are never capped.
"""

from __future__ import annotations

from serving.pipeline.types import Candidate

__all__ = ["category_cap", "mmr"]


def _category(candidate: Candidate) -> str | None:
    if candidate.item is not None and candidate.item.categories:
        return candidate.item.categories[0]
    return candidate.category


def category_cap(ranked: list[Candidate], cap: int) -> list[Candidate]:
    counts: dict[str, int] = {}
    head: list[Candidate] = []
    tail: list[Candidate] = []
    for candidate in ranked:
        category = _category(candidate)
        if category is None:
            head.append(candidate)
            continue
        counts[category] = counts.get(category, 0) + 1
        (head if counts[category] <= cap else tail).append(candidate)
    return head + tail


def mmr(ranked: list[Candidate], lam: float, n: int) -> list[Candidate]:
    if not ranked:
        return ranked
    top = max(abs(c.score) for c in ranked) or 1.0
    pool = list(ranked)
    chosen: list[Candidate] = []
    shown: set[str] = set()
    while pool and len(chosen) < n:
        best_index, best_value = 0, float("-inf")
        for index, candidate in enumerate(pool):
            category = _category(candidate)
            similar = 1.0 if category is not None and category in shown else 0.0
            value = lam * candidate.score / top - (1 - lam) * similar
            if value > best_value:
                best_index, best_value = index, value
        picked = pool.pop(best_index)
        chosen.append(picked)
        category = _category(picked)
        if category is not None:
            shown.add(category)
    return chosen + pool
