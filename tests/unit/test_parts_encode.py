"""The hot store's parts' encoding without Redis: what each event is given is what a
fresh computation gives it (`FeaturesPart`'s affinity lists, `TrendingPart`'s cached
keys)."""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis

from agents.catalog import BatchContext, ItemFacts
from agents.features import FeaturesPart
from agents.state import pack_evalsha
from agents.trending import WINDOWS, TrendingPart
from recstream.keys import keys_of
from recstream.settings import Settings
from streams.schema import Event


def flat(part: FeaturesPart, event: Event, context: BatchContext) -> list[Any]:
    return [
        x
        for (attr, value), delta in part.deltas(event, context).items()
        for x in (attr, f"a:{attr}:{value}", delta)
    ]


def test_affinity_lists_equal_a_fresh_computation() -> None:
    settings = Settings(affinity_half_life_s={"color": 86_400.0})
    part = FeaturesPart(settings)
    context = BatchContext(
        items={
            ("ns", "a"): ItemFacts(categories=("shoes", "sale"), brand="acme"),
            ("ns", "b"): ItemFacts(categories=("hats",)),
            # listed directly, or through `deltas` when a category would count twice
            ("ns", "c"): ItemFacts(categories=("x", "x"), brand="acme"),
            ("ns", "d"): ItemFacts(categories=("y" * 130 + "1", "y" * 130 + "2")),  # cut: equal
            ("ns", "e"): ItemFacts(brand="solo"),
            ("ns", "f"): ItemFacts(categories=("p", "q", "r"), brand="acme"),
        }
    )

    def event(n: int, **fields: Any) -> Event:
        base: dict[str, Any] = {"event_type": "view", "user_id": f"u{n % 3}", "namespace": "ns"}
        return Event(event_id=str(n), **(base | fields))

    events = [
        event(1, item_id="a"),
        event(2, item_id="a"),
        event(3, item_id="a", event_type="purchase"),  # another type, another weight
        event(4, item_id="a", properties={"category": "boots"}),  # the event's own category
        event(5, item_id="a", properties={"category": "boots"}),
        event(6, item_id="b", impression=["a", "b"]),  # impressions: never cached
        event(7, item_id="b", properties={"color": "red"}),  # a property attribute
        event(8, item_id="b", properties={"color": "blue"}),
        event(9, event_type="search"),  # no item
        event(10, event_type="search"),
        event(11, item_id="unknown"),
        event(12, item_id="a"),
        event(13, item_id="c"),
        event(14, item_id="d"),
        event(15, item_id="e"),
        event(16, item_id="f"),
        event(17, item_id="f", event_type="purchase"),
        event(18, item_id="f", properties={"brand": "other", "size": "xl"}),
        event(19, item_id="b", properties={"color": "red", "category": "hats"}),
    ]
    for e in events:
        _, doc = part.encode(e, context)
        assert doc["a"] == flat(part, e, context), e.event_id
        assert doc["t"] == f"n:{e.event_type}"


def test_trending_keys_equal_the_keys_built_directly() -> None:
    part = TrendingPart(Settings())
    for namespace in ("a", "b"):
        for category in (None, "shoes", "hats"):
            for ts in (1_700_000_000.0, 1_700_000_300.0, 1_700_003_600.0):
                starts = tuple(w.bucket(ts) for w in WINDOWS)
                keys = keys_of(namespace)
                expected = [keys.trend_clock, keys.popularity_decayed, keys.counts_index]
                expected += [
                    keys.counts_bucket(w.span_s, b) for w, b in zip(WINDOWS, starts, strict=True)
                ]
                if category is not None:
                    expected += [keys.popularity_category(category), keys.categories]
                    expected += [
                        keys.counts_bucket(w.span_s, b, category)
                        for w, b in zip(WINDOWS, starts, strict=True)
                    ]
                for _ in range(2):  # made, then from the cache
                    assert part._keys_of(namespace, category, starts) == tuple(expected)


def test_pack_evalsha_is_redis_py_s() -> None:
    """The hot store packs its script calls with hiredis: byte for byte what redis-py's
    own packer sends (non-ASCII keys, binary and empty arguments, a large argument that
    redis-py sends as a separate buffer)."""
    connection = Redis().connection_pool.make_connection()  # type: ignore[no-untyped-call]
    keys = ["rs:ns:win:é", "rs:ns:seen:u1", ""]
    args = [b"[1,2]", b"\x00\xff\r\n", b"", b"x" * 10_000]
    expected = b"".join(connection.pack_command("EVALSHA", "f" * 40, len(keys), *keys, *args))
    assert pack_evalsha("f" * 40, keys, args) == expected


def test_facts_of_an_event_s_own_item_are_its_own() -> None:
    """`BatchContext.facts` remembers the last event asked about (the parts ask in turn):
    each event still gets its own item's facts, its properties first."""
    context = BatchContext(items={("ns", "a"): ItemFacts(categories=("shoes",), brand="acme")})
    plain = Event(event_type="view", user_id="u", item_id="a", namespace="ns")
    tagged = Event(
        event_type="view", user_id="u", item_id="a", namespace="ns", properties={"category": "x"}
    )
    other = Event(event_type="view", user_id="u", item_id="b", namespace="ns")
    for _ in range(2):
        assert context.facts(plain) == ItemFacts(categories=("shoes",), brand="acme")
        assert context.facts(plain) == ItemFacts(categories=("shoes",), brand="acme")
        assert context.facts(tagged) == ItemFacts(categories=("x",), brand="acme")
        assert context.facts(tagged, "a") == ItemFacts(categories=("x",), brand="acme")
        assert context.facts(plain, "b") == ItemFacts()
        assert context.facts(other) == ItemFacts()
        assert context.facts(other, "a") == ItemFacts(categories=("shoes",), brand="acme")
