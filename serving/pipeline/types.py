"""The typed records the stages pass along, and the hooks other parts plug in.

A request flows through the stages in this order (serving/pipeline/ranker.py):

    state → candidates → features → filter → rank → seen → diversity → explain → log

Each stage enriches the same `Candidate` records (typed and slotted, never dicts), so a
ranking is explained by what each stage wrote.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol, runtime_checkable

from recstream.windows import WindowEntry
from streams.schema import Item

__all__ = [
    "Candidate",
    "CandidateFilter",
    "ItemCatalog",
    "RankContext",
    "Scorer",
    "UserState",
]


_NONE: Mapping[str, Any] = MappingProxyType({})


@dataclass(slots=True, init=False)
class Candidate:
    """One item under consideration for one request; stages fill it in.

    A request builds one per pooled item (≈ 150 after the shortlist, 430 before it), so
    the constructor makes only the ``sources`` dict: the other maps start as one shared,
    read-only empty mapping, and the stages that fill them assign new ones."""

    item_id: str
    sources: dict[str, float]
    """Raw score from each candidate source that proposed (or scored) the item."""
    ranks: Mapping[str, int]
    """1-based rank of the item within each source (filled for the debug view)."""
    because: str | None
    """The history item that contributed most to an item2item score (the explanation)."""
    category: str | None
    """For category popularity: the category whose list proposed the item."""
    features: Mapping[str, float]
    item: Item | None
    """Catalog metadata, when a catalog is wired and knows the item."""
    seen: bool
    """The user already interacted with the item (its window holds it)."""
    score: float
    contributions: Mapping[str, float]
    """What each source added to ``score`` (the scorer fills it), for explanations."""
    reasons: Sequence[str]

    def __init__(self, item_id: str, sources: dict[str, float] | None = None) -> None:
        self.item_id = item_id
        self.sources = {} if sources is None else sources
        self.ranks = _NONE
        self.because = None
        self.category = None
        self.features = _NONE
        self.item = None
        self.seen = False
        self.score = 0.0
        self.contributions = _NONE
        self.reasons = ()


@dataclass(slots=True)
class UserState:
    """The live state of one actor, read in one round trip (serving/pipeline/state.py)."""

    window: list[WindowEntry]
    """Newest first, as the agents keep it."""
    features: Mapping[str, str]
    """``rs:{ns}:feat:{actor}`` (agents/features), empty when absent."""
    embedding: dict[str, bytes]
    """``rs:{ns}:emb:{actor}`` (agents/features), empty when absent."""
    versions: dict[str, str]
    """Serving version of each published model, read in the same round trip."""

    @property
    def history(self) -> list[str]:
        """Item ids oldest first, the order training's models take."""
        return [e.item_id for e in reversed(self.window)]


@dataclass(frozen=True, slots=True)
class RankContext:
    """The request's context: device, hour and whatever else the caller sent."""

    values: Mapping[str, str] = field(default_factory=dict)
    hour: int | None = None
    """Hour of day 0-23: from ``context.hour`` when sent, else the server's UTC hour."""

    @property
    def device(self) -> str | None:
        return self.values.get("device")


@runtime_checkable
class CandidateFilter(Protocol):
    """A business rule (e.g. a Personalize filter expression with its values), applied to
    every candidate before the list is cut to ``num_results``."""

    def allows(
        self,
        item_id: str,
        item: Item | None,
        window: Sequence[WindowEntry],
        values: Mapping[str, str],
    ) -> bool: ...


@runtime_checkable
class ItemCatalog(Protocol):
    """Item metadata (categories for features and diversity, titles for responses)."""

    async def items(self, namespace: str, item_ids: Sequence[str]) -> Mapping[str, Item]: ...

    def cached_items(self, namespace: str, item_ids: Sequence[str]) -> Mapping[str, Item] | None:
        """What `items` would answer, from memory alone; None when any id must be read
        (the ranker's synchronous pass then awaits `items`)."""
        ...


class Scorer(Protocol):
    """Turns the candidates' sources and features into one score each (in place).

    ``weights`` are the blend's (published or default); a learned ranker may ignore them.
    Fills ``Candidate.score`` and ``Candidate.contributions``."""

    name: str

    def score(self, candidates: Sequence[Candidate], weights: Mapping[str, float]) -> None: ...
