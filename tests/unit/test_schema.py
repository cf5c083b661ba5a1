from __future__ import annotations

import time

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from streams.schema import Event, Interaction, Item, problems_from

ids = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs", "Zs", "Cc")), min_size=1, max_size=256
)


@given(
    user=ids,
    item=ids,
    kind=st.sampled_from(
        ["view", "click", "add_to_cart", "purchase", "like", "share", "search_done"]
    ),
    value=st.one_of(st.none(), st.floats(allow_nan=False, allow_infinity=False)),
    ts=st.floats(min_value=631_152_000, max_value=time.time()),
)
def test_json_round_trip(user: str, item: str, kind: str, value: float | None, ts: float) -> None:
    event = Event(event_type=kind, user_id=user, item_id=item, event_value=value, timestamp=ts)
    assert Event.from_json(event.to_json()) == event


def test_server_generates_distinct_ids_and_partitions_by_actor() -> None:
    a = Event(event_type="view", user_id="u", item_id="i")
    b = Event(event_type="view", session_id="s", item_id="i")
    assert a.event_id != b.event_id
    assert (a.partition_key, b.partition_key) == ("u", "session:s")


def test_iso_timestamps_need_a_zone() -> None:
    ok = Event(event_type="view", user_id="u", item_id="i", timestamp="2024-01-31T12:00:00Z")
    assert ok.timestamp == 1706702400.0
    with pytest.raises(ValidationError) as info:
        Event(event_type="view", user_id="u", item_id="i", timestamp="2024-01-31T12:00:00")
    assert "time zone" in str(info.value)


def test_custom_types_need_no_item() -> None:
    assert Event(event_type="search", user_id="u").item_id is None


def test_properties_are_bounded() -> None:
    with pytest.raises(ValidationError) as info:
        Event(event_type="view", user_id="u", item_id="i", properties={"k": "x" * 2000})
    [problem] = problems_from(info.value)
    assert problem.field == "properties"
    assert "1024" in problem.problem


def test_catalog_rows() -> None:
    item = Item.from_csv_row({"ITEM_ID": "1", "CATEGORIES": "Comedy|Drama", "PRICE": "9.5"})
    assert item.categories == ["Comedy", "Drama"]
    assert item.price == 9.5
    row = {"USER_ID": "u", "ITEM_ID": "i", "TIMESTAMP": "1700000000", "EVENT_TYPE": "PURCHASE"}
    event = Interaction.from_csv_row(row).to_event()
    assert (event.event_type, event.user_id, event.timestamp) == ("purchase", "u", 1_700_000_000.0)


def test_user_ids_cannot_impersonate_anonymous_sessions() -> None:
    with pytest.raises(ValidationError, match="session_id instead"):
        Event(event_type="view", user_id="session:abc", item_id="i")


def test_agents_ignore_fields_a_newer_collector_added() -> None:
    from agents.windows import StoredEvent

    raw = b'{"event_type":"view","user_id":"u","item_id":"i","added_in_v2":1}'
    assert StoredEvent.from_json(raw).item_id == "i"
    with pytest.raises(ValidationError):
        Event.from_json(raw)


def test_csv_columns_are_class_constants_not_fields() -> None:
    assert Interaction.CSV_COLUMNS[0] == "USER_ID"
    assert "CSV_COLUMNS" not in Item.model_fields
