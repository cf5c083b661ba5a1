"""serving/pipeline/cache.py: the item-level TTL cache's `get_all` (item-to-item's rows of
a request, the clock read once) answers as `get` key by key would."""

from __future__ import annotations

from serving.pipeline.cache import TTLCache


def test_get_all_is_every_get_or_none() -> None:
    now = [100.0]
    cache: TTLCache[str, int] = TTLCache(10.0, clock=lambda: now[0])
    cache.put("a", 1)
    now[0] = 105.0
    cache.put("b", 2)
    assert cache.get_all(["a", "b", "a"]) == {"a": 1, "b": 2}
    assert cache.get_all([]) == {}
    assert cache.get_all(["a", "c"]) is None  # one missing: the caller reads them
    now[0] = 110.0  # "a" is 10 s old: expired, as `get` says
    assert cache.get("b") == 2
    assert cache.get_all(["b", "a"]) is None
    assert cache.get("a") is None
    assert cache.get_all(["b"]) == {"b": 2}
