"""What the agents know about the items of a batch, read once per batch.

An item's category and brand come from the event's own properties (``category``,
``brand``) when the producer sends them, else from the catalog's hot copy in Redis
(``rs:{ns}:item:{id}``, `streams.schema.Item` JSON, written by the catalog). An item the
catalog does not know simply has no category: that is normal, not an error. The published
ALS version (``rs:{ns}:model:als:current``) is read in the same round trip, so the live
embedding uses the factors serving uses.

Every event property other than ``category`` and ``brand`` that has a half-life in
`Settings.affinity_half_life_s` becomes an affinity attribute too (e.g. ``color``).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from pydantic import ValidationError
from redis.exceptions import RedisError

from recstream.errors import StoreUnavailable
from recstream.keys import Keys, keys_of
from recstream.redisio import commands
from recstream.settings import Settings
from streams.schema import Event, Item

__all__ = ["ALS_MODEL", "BatchContext", "ItemFacts", "load_context"]

log = logging.getLogger(__name__)

ALS_MODEL = "als"
"""The published model whose item factors make the live embedding."""
MAX_CATEGORIES = 4
"""Categories of one item that receive affinity (the first one also gets its own
popularity and trend lists, as training's per-category popularity does)."""


@dataclass(frozen=True, slots=True)
class ItemFacts:
    """The attributes of one item that affinities and per-category lists use."""

    categories: tuple[str, ...] = ()
    brand: str | None = None

    @property
    def category(self) -> str | None:
        """The item's main (first) category: the one its per-category lists use."""
        return self.categories[0] if self.categories else None


_UNKNOWN = ItemFacts()


@dataclass
class BatchContext:
    """Catalog facts and published model versions for one batch of events."""

    items: dict[tuple[str, str], ItemFacts] = field(default_factory=dict)
    als_version: dict[str, str | None] = field(default_factory=dict)
    _own: dict[tuple[str, str, object, object], ItemFacts] = field(default_factory=dict)
    """Facts of events' own items with their properties applied, made once per batch (the
    parts of the hot store each ask for them)."""

    _last: tuple[Event | None, ItemFacts] = field(
        default=(None, _UNKNOWN), init=False, repr=False, compare=False
    )
    """The last event asked about with its own item, and its facts: the parts of the hot
    store ask one after the other for the same event."""

    def facts(self, event: Event, item_id: str | None = None) -> ItemFacts:
        """Facts about ``item_id`` (default: the event's item); the event's properties win
        for its own item."""
        if item_id is None:
            last, found = self._last
            if last is event:
                return found
            found = self._facts(event, event.item_id)
            self._last = (event, found)
            return found
        return self._facts(event, item_id)

    def _facts(self, event: Event, item_id: str | None) -> ItemFacts:
        item_id = item_id or event.item_id
        if item_id is None:
            return ItemFacts()
        known = self.items.get((event.namespace, item_id), _UNKNOWN)
        if item_id != event.item_id:
            return known
        category = event.properties.get("category")
        brand = event.properties.get("brand")
        if category in (None, "") and brand in (None, ""):
            return known
        cache = (event.namespace, item_id, category, brand)
        found = self._own.get(cache)
        if found is None:
            found = self._own[cache] = ItemFacts(
                categories=(str(category),) if category not in (None, "") else known.categories,
                brand=str(brand) if brand not in (None, "") else known.brand,
            )
        return found


_PARSED: OrderedDict[bytes, ItemFacts] = OrderedDict()
PARSE_CACHE = 16_384
"""Catalog entries parsed lately, by their bytes: the popular items come back in every
batch, and validating an `Item` is most of what reading the catalog costs the agent.
Keyed by content, so an entry the catalog changes is parsed afresh. The oldest goes
first, in O(1) (`agents.windows.PARSE_CACHE` says why not a dict)."""


def _facts(raw: bytes | None, namespace: str, item_id: str) -> ItemFacts:
    if raw is None:
        return _UNKNOWN
    found = _PARSED.get(raw)
    if found is not None:
        return found
    try:
        item = Item.model_validate_json(raw)
    except ValidationError as exc:
        # A broken catalog entry must not stop the stream: the item is treated as
        # unknown, and the log names the key so the catalog can be fixed.
        where = Keys(namespace).item(item_id)
        log.warning("catalog entry %s is not a valid Item, ignored: %s", where, exc)
        return _UNKNOWN
    cats = tuple(c for c in item.categories if c)[:MAX_CATEGORIES]
    found = ItemFacts(categories=cats, brand=item.brand or None)
    if len(_PARSED) >= PARSE_CACHE:
        _PARSED.popitem(last=False)
    _PARSED[raw] = found
    return found


async def load_context(
    redis: aioredis.Redis, events: Sequence[Event], settings: Settings
) -> BatchContext:
    """One round trip: the catalog entries of the batch's items (and, when implicit
    negatives are on, of their impressions) and each namespace's published ALS version."""
    wanted: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for event in events:
        ids = [event.item_id] if event.item_id is not None else []
        if event.item_id is not None and settings.impression_weight != 0:
            ids += [i for i in event.impression if i != event.item_id]
        for item_id in ids:
            key = (event.namespace, item_id)
            if key not in seen:
                seen.add(key)
                wanted.append(key)
    namespaces = sorted({e.namespace for e in events})
    batch: list[list[str]] = []
    if wanted:
        batch.append(["MGET", *(keys_of(ns).item(item) for ns, item in wanted)])
    batch += [["GET", keys_of(ns).model_pointer(ALS_MODEL)] for ns in namespaces]
    try:
        replies = await commands(redis, batch)
    except RedisError as exc:
        raise StoreUnavailable(
            f"reading the catalog of {len(events)} events failed: {exc}"
        ) from exc
    context = BatchContext()
    if wanted:
        rows = replies.pop(0)
        for (ns, item), raw in zip(wanted, rows, strict=True):
            context.items[(ns, item)] = _facts(raw, ns, item)
    for ns, version in zip(namespaces, replies, strict=True):
        context.als_version[ns] = version.decode() if isinstance(version, bytes) else version
    return context
