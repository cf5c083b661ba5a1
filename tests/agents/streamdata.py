"""Real events for the agent tests, and a straightforward recomputation of every piece of
state the agents keep, written independently of the agents' code (plain loops over the
events, in arrival order)."""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import redis.asyncio as aioredis

from recstream.keys import Keys
from recstream.scoring import trend_scores
from recstream.settings import Settings
from streams.schema import Event, Item

TAOBAO_TYPES = {"pv": "view", "cart": "add_to_cart", "buy": "purchase", "fav": "like"}
SPANS = ((3600, 300), (86400, 3600))  # (window, bucket span): the 1h and 24h trends


def taobao(shared_data: Path, namespace: str, limit: int) -> tuple[list[Event], list[Item]]:
    """The first ``limit`` rows of the Taobao UserBehavior slice as events, with explicit
    negatives and impressions added, and a catalog of their items.

    Every 11th interaction is followed by a ``dislike`` of the same item, every 5th
    carries an impression list (the item and the next rows' items: shown, not taken),
    and only even rows send their category in ``properties`` (the others rely on the
    catalog, which also gives every item a brand)."""
    path = shared_data / "taobao-userbehavior-head-dev" / "UserBehavior_head_dev.csv"
    with path.open() as handle:
        rows = [row for _, row in zip(range(limit), csv.reader(handle), strict=False)]
    events: list[Event] = []
    catalog: dict[str, Item] = {}
    for n, (user, item, category, behavior, ts) in enumerate(rows):
        catalog.setdefault(
            item, Item(item_id=item, categories=[f"c{category}"], brand=f"b{int(item) % 17}")
        )
        impression = [item] + [r[1] for r in rows[n + 1 : n + 4]] if n % 5 == 0 else []
        events.append(
            Event(
                event_id=f"tb-{n}",
                event_type=TAOBAO_TYPES[behavior],
                user_id=f"u{user}",
                item_id=item,
                timestamp=float(ts),
                properties={"category": f"c{category}"} if n % 2 == 0 else {},
                impression=impression,
                context={"page": f"p{n % 3}"} if n % 3 == 0 else {},
                namespace=namespace,
            )
        )
        if n % 11 == 0:
            events.append(
                Event(
                    event_id=f"tb-{n}-dislike",
                    event_type="dislike",
                    user_id=f"u{user}",
                    item_id=item,
                    timestamp=float(ts) + 1,
                    namespace=namespace,
                )
            )
    return events, list(catalog.values())


async def write_catalog(redis: aioredis.Redis, namespace: str, items: Iterable[Item]) -> None:
    """The catalog's hot copy, as the catalog writes it."""
    await redis.mset({Keys(namespace).item(i.item_id): i.model_dump_json() for i in items})


def factors_of(items: Sequence[str], dim: int = 8, seed: int = 7) -> dict[str, bytes]:
    """Item factors for a published ALS version: most items, not all (some are unknown)."""
    rng = np.random.default_rng(seed)
    return {
        item: rng.normal(size=dim).astype("<f4").tobytes()
        for n, item in enumerate(sorted(items))
        if n % 6 != 0
    }


async def publish_als(
    redis: aioredis.Redis, namespace: str, version: str, factors: Mapping[str, bytes]
) -> None:
    keys = Keys(namespace)
    mapping: dict[Any, Any] = dict(factors)
    await redis.hset(keys.model("als", version, "factors"), mapping=mapping)
    await redis.set(keys.model_pointer("als"), version)


# --- the recomputation --------------------------------------------------------------------


@dataclass
class Features:
    n: int = 0
    counts: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    first: float = math.inf
    last: float = -math.inf
    session: str = ""
    session_ts: float = 0.0
    session_n: int = 0
    affinity: dict[tuple[str, str], tuple[float, float]] = field(default_factory=dict)
    emb: npt.NDArray[np.float32] | None = None
    emb_w: float = 0.0
    emb_ts: float = 0.0


@dataclass
class Expected:
    windows: dict[str, list[Event]] = field(default_factory=lambda: defaultdict(list))
    features: dict[str, Features] = field(default_factory=lambda: defaultdict(Features))
    popularity: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    decayed: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    decayed_cat: dict[str, dict[str, float]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(float))
    )
    buckets: dict[tuple[int, int, str | None], dict[str, float]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(float))
    )
    clock: float = -math.inf
    applied: int = 0


def recompute(
    events: Sequence[Event],
    catalog: Mapping[str, Item],
    settings: Settings,
    factors: Mapping[str, bytes] | None = None,
) -> Expected:
    s = settings
    out = Expected()
    seen: set[str] = set()
    for event in events:
        if event.event_id in seen:
            continue
        seen.add(event.event_id)
        out.applied += 1
        ts, actor, w = event.timestamp, event.actor, s.weight(event.event_type)
        item = catalog.get(event.item_id or "")
        category = event.properties.get("category")
        categories = [str(category)] if category else (list(item.categories) if item else [])
        brand = item.brand if item else None
        # window: newest first by time, ties newest arrival first, capped
        if event.item_id is not None:
            window = [event, *out.windows[actor]]
            window.sort(key=lambda e: -e.timestamp)
            out.windows[actor] = window[: s.window_size]
        # counts and session
        f = out.features[actor]
        f.n += 1
        typed = [t for t in f.counts if t != "_other"]
        known = event.event_type in f.counts or len(typed) < s.feature_cap
        f.counts[event.event_type if known else "_other"] += 1
        f.first = min(f.first, ts)
        if f.last == -math.inf or ts - f.last > s.session_gap_s:
            f.session, f.session_ts, f.session_n = f"{actor}#{math.floor(ts)}", ts, 1
        else:
            f.session_n += 1
        f.last = max(f.last, ts)
        # affinities
        deltas: list[tuple[str, str, float]] = [("type", event.event_type, 1.0)]
        if event.item_id is not None:
            deltas += [("cat", c, w) for c in categories]
            if brand:
                deltas.append(("brand", brand, w))
            if w > 0 and s.impression_weight:
                for other in set(event.impression):  # each shown item once
                    shown = catalog.get(other)
                    if other == event.item_id or shown is None:
                        continue
                    deltas += [("cat", c, s.impression_weight) for c in shown.categories]
                    if shown.brand:
                        deltas.append(("brand", shown.brand, s.impression_weight))
        summed: dict[tuple[str, str], float] = {}  # one change per value and event
        for attr, value, delta in deltas:
            summed[(attr, value)] = summed.get((attr, value), 0.0) + delta
        for (attr, value), delta in summed.items():
            hl = s.half_life(attr)
            if (attr, value) not in f.affinity:
                f.affinity[(attr, value)] = (delta, ts)
                same = [k for k in f.affinity if k[0] == attr]
                if len(same) > s.feature_cap:
                    # evict the weakest as of this event (ties: the smallest field name)
                    strength = {
                        k: (
                            abs(f.affinity[k][0] * 2 ** (-max(0.0, ts - f.affinity[k][1]) / hl)),
                            f"a:{k[0]}:{k[1]}",
                        )
                        for k in same
                    }
                    del f.affinity[min(same, key=strength.__getitem__)]
                continue
            score, at = f.affinity[(attr, value)]
            if ts >= at:
                f.affinity[(attr, value)] = (score * 2 ** (-(ts - at) / hl) + delta, ts)
            else:
                f.affinity[(attr, value)] = (score + delta * 2 ** (-(at - ts) / hl), at)
        # embedding: decayed mean of the factors of positively weighted touches
        if factors is not None and w > 0 and event.item_id is not None and event.item_id in factors:
            y = np.frombuffer(factors[event.item_id], "<f4").astype(np.float64)
            hl = s.embedding_half_life_s
            if f.emb is None:
                f.emb, f.emb_w, f.emb_ts = y.astype(np.float32), w, ts
            else:
                x = f.emb.astype(np.float64)
                if ts >= f.emb_ts:
                    f0, g, f.emb_ts = 2 ** (-(ts - f.emb_ts) / hl), w, ts
                else:
                    f0, g = 1.0, w * 2 ** (-(f.emb_ts - ts) / hl)
                total = f.emb_w * f0 + g
                f.emb = ((x * f.emb_w * f0 + g * y) / total).astype(np.float32)
                f.emb_w = total
        # popularity and trending: positive weights only
        out.clock = max(out.clock, ts)
        if event.item_id is None or w <= 0:
            continue
        out.popularity[event.item_id] += w
        score = w * 2 ** ((ts - s.popularity_epoch_s) / s.popularity_half_life_s)
        out.decayed[event.item_id] += score
        main = categories[0] if categories else None
        if main is not None:
            out.decayed_cat[main][event.item_id] += score
        for window_s, span in SPANS:
            start = math.floor(ts / span) * span
            if out.clock >= start + 2 * window_s:
                continue  # no window will read it again
            out.buckets[(span, start, None)][event.item_id] += w
            if main is not None:
                out.buckets[(span, start, main)][event.item_id] += w
    return out


def expected_trend(
    out: Expected, window_s: int, span: int, category: str | None, gamma: float
) -> dict[str, float]:
    end = math.floor(out.clock / span) * span + span
    recent: dict[str, float] = defaultdict(float)
    previous: dict[str, float] = defaultdict(float)
    for (b_span, start, cat), counts in out.buckets.items():
        if b_span != span or cat != category:
            continue
        target = (
            recent
            if end - window_s <= start < end
            else previous
            if end - 2 * window_s <= start < end - window_s
            else None
        )
        if target is not None:
            for item, count in counts.items():
                target[item] += count
    items = sorted(set(recent) | set(previous))
    if not items:
        return {}
    trend = trend_scores(
        np.array([recent.get(i, 0.0) for i in items]),
        np.array([previous.get(i, 0.0) for i in items]),
        gamma,
    )
    return {i: float(t) for i, t in zip(items, trend, strict=True)}


async def snapshot(redis: aioredis.Redis, namespace: str) -> dict[str, object]:
    """Every key of ``namespace`` (prefix removed) with its full value, for comparing two
    runs: strings, lists, hashes and sorted sets as Python values."""
    prefix = Keys(namespace).prefix
    out: dict[str, object] = {}
    async for raw in redis.scan_iter(match=f"{prefix}*", count=1000):
        key = text(raw)
        kind = text(await redis.type(key))
        name = key[len(prefix) :]
        if kind == "string":
            out[name] = await redis.get(key)
        elif kind == "list":
            out[name] = await redis.lrange(key, 0, -1)
        elif kind == "hash":
            out[name] = await redis.hgetall(key)
        elif kind == "zset":
            # members may be keys of the namespace (the bucket index): compare them bare
            out[name] = {m.removeprefix(prefix): v for m, v in (await zscores(redis, key)).items()}
        elif kind == "set":
            out[name] = await redis.smembers(key)
    return out


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def zscores(redis: aioredis.Redis, key: str) -> dict[str, float]:
    """A sorted set as member -> score."""
    pairs: list[Any] = await redis.zrange(key, 0, -1, withscores=True)
    return {text(member): float(score) for member, score in pairs}


async def hash_of(redis: aioredis.Redis, key: str) -> dict[str, str]:
    raw: dict[Any, Any] = await redis.hgetall(key)
    return {text(k): text(v) for k, v in raw.items()}
