"""The worker's parse caches (records by content, `agents.windows`; catalog entries by
content, `agents.catalog`): bounded, the oldest entry dropped first, and what comes back
after its eviction parsed again to the same result."""

from __future__ import annotations

import pytest

from agents import catalog, windows
from agents.catalog import ItemFacts
from streams.schema import Event, Item


def test_the_record_cache_keeps_the_newest_records(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(windows, "PARSE_CACHE", 3)
    monkeypatch.setattr(windows, "_PARSED", type(windows._PARSED)())
    raws = [
        Event(event_id=f"e{n}", event_type="view", user_id="u", item_id=f"i{n}").to_json()
        for n in range(6)
    ]
    first = windows.parse_event(raws[0])
    for raw in raws[1:]:
        windows.parse_event(raw)
    assert list(windows._PARSED) == raws[3:]  # the oldest went first, one at a time
    windows.parse_event(raws[4])  # a hit: no eviction, no reordering (FIFO, not LRU)
    assert list(windows._PARSED) == raws[3:]
    again = windows.parse_event(raws[0])  # evicted: parsed afresh, the same event
    assert again == first
    assert again is not first
    assert list(windows._PARSED) == [*raws[4:], raws[0]]
    assert windows.parse_event(b"{") == windows.parse_event(b"{")  # reasons are cached too
    assert len(windows._PARSED) == 3


def test_the_catalog_cache_keeps_the_newest_entries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(catalog, "PARSE_CACHE", 2)
    monkeypatch.setattr(catalog, "_PARSED", type(catalog._PARSED)())
    raws = [
        Item(item_id=f"i{n}", categories=[f"c{n}"]).model_dump_json().encode() for n in range(4)
    ]
    for n, raw in enumerate(raws):
        assert catalog._facts(raw, "ns", f"i{n}") == ItemFacts(categories=(f"c{n}",))
    assert list(catalog._PARSED) == raws[2:]
    assert catalog._facts(raws[0], "ns", "i0") == ItemFacts(categories=("c0",))
    assert list(catalog._PARSED) == [raws[3], raws[0]]
