"""The attribution counters' keys and notes are remembered per strategy, variant and UTC
day (recstream/served.py `counter_targets`): what is remembered is exactly what a
fresh computation gives, on both sides of midnight and per namespace, strategy, variant
and day TTL."""

from __future__ import annotations

import calendar

from hypothesis import given, settings
from hypothesis import strategies as st

from recstream.served import _make_counter_targets, counter_targets
from recstream.settings import Settings

MIDNIGHT = calendar.timegm((2026, 11, 30, 0, 0, 0))


@settings(max_examples=200, deadline=None)
@given(
    namespace=st.sampled_from(["default", "shop"]),
    strategy=st.sampled_from(["recommendations", "related_items"]),
    variant=st.sampled_from([None, "", "blend@v1", "lightgbm@v2"]),
    offset=st.sampled_from([-86_400.5, -1.0, -0.001, 0.0, 0.001, 1.0, 86_399.9, 86_400.0]),
    ttl=st.sampled_from([86_400, 7 * 86_400]),
)
def test_remembered_targets_equal_fresh_ones(
    namespace: str, strategy: str, variant: str | None, offset: float, ttl: int
) -> None:
    config = Settings(attribution_day_ttl_s=ttl)
    ts = MIDNIGHT + offset
    for _ in range(2):  # made, then remembered
        assert counter_targets(config, namespace, strategy, variant, ts) == (
            _make_counter_targets(config, namespace, strategy, variant, ts)
        )
