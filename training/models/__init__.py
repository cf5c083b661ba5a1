"""The trainable models; each implements `training.base.Model`.

``MODELS`` maps each model's ``name`` to its class.
"""

from __future__ import annotations

from training.models.als import ALS, fold_in
from training.models.blend import Blend
from training.models.common import ItemScorer, top_k
from training.models.item2item import ItemToItem
from training.models.popularity import CategoryPopularity, Popularity
from training.models.ranker import LearnedRanker
from training.models.repeat import RecentlyViewed
from training.models.segmentation import UserSegmentation
from training.models.sknn import SessionIndex, SessionKNN, score_session
from training.models.trending import Trending, trend_scores

__all__ = [
    "ALS",
    "MODELS",
    "Blend",
    "CategoryPopularity",
    "ItemScorer",
    "ItemToItem",
    "LearnedRanker",
    "Popularity",
    "RecentlyViewed",
    "SessionIndex",
    "SessionKNN",
    "Trending",
    "UserSegmentation",
    "fold_in",
    "score_session",
    "top_k",
    "trend_scores",
]

MODELS: dict[str, type[ItemScorer]] = {
    cls.name: cls
    for cls in (
        Popularity,
        CategoryPopularity,
        Trending,
        ItemToItem,
        ALS,
        SessionKNN,
        UserSegmentation,
        RecentlyViewed,
        Blend,
        LearnedRanker,
    )
}
