"""Hypothesis fuzzing of the event parser (directly) and the collector (real uvicorn).

Every generated event carries its own verdict: each field is drawn either from values
the schema promises to accept or from values it must refuse, and the test knows which.
So the checks are exact: no invalid input accepted, no valid input refused, every
rejection names the field, and nothing ever answers 500. About 10,000 inputs per run:
9,000 straight into `Event.model_validate`, ~1,400 through ``POST /v1/events``.
"""

from __future__ import annotations

import math
import time
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from recstream import stack
from recstream.settings import Settings
from serving.app import create_app
from streams.schema import (
    ITEM_EVENT_TYPES,
    MAX_ID_LENGTH,
    MAX_IMPRESSION,
    MIN_TIMESTAMP,
    Event,
    problems_from,
)
from tests.conftest import serve_in_thread
from tests.serving.test_collector import read_stream

FIELDS = frozenset(Event.model_fields)
SLOW = [HealthCheck.too_slow, HealthCheck.data_too_large]
OMIT: Any = object()
Tagged = tuple[Any, bool]  # (value or OMIT, whether the schema must accept it)

# Ids: no surrounding whitespace (the schema strips it), 1..256 characters.
_id_chars = st.characters(codec="utf-8", exclude_categories=("Cs", "Zs", "Cc", "Zl", "Zp"))
# Long ids are drawn from a few edge cases rather than generated: generating 256-character
# texts for eleven fields would make the fuzzer slow, not more thorough.
valid_id = st.one_of(
    st.text(_id_chars, min_size=1, max_size=12),
    st.sampled_from(["x" * MAX_ID_LENGTH, "\U0001f600" * MAX_ID_LENGTH, "a b", "session"]),
)
# Invalid values are drawn from lists of known-bad cases (one draw each): the generated
# part of the search is in the valid values and in how fields combine.
invalid_id = st.sampled_from(
    ["", "   ", "x" * (MAX_ID_LENGTH + 1), "\u00e9" * (MAX_ID_LENGTH + 7), 5, True, [1], {"a": 1}]
)


def tagged(valid: st.SearchStrategy[Any], invalid: st.SearchStrategy[Any], omit_ok: bool = True):  # type: ignore[no-untyped-def]
    options = [valid.map(lambda v: (v, True)), invalid.map(lambda v: (v, False))]
    options.append(st.just((OMIT, omit_ok)))
    return st.one_of(*options)


def _now() -> float:
    return time.time()


valid_ts = st.one_of(
    st.floats(min_value=MIN_TIMESTAMP, max_value=1_700_000_000.0),
    st.integers(min_value=int(MIN_TIMESTAMP), max_value=1_700_000_000),
    st.just("2024-01-31T12:00:00Z"),
    st.just("2020-06-01T00:00:00+02:00"),
    st.just("1700000000.5"),
)
invalid_ts = st.one_of(
    st.sampled_from(
        [True, 0, -5.0, 1e12, 1.7e12, "2024-01-31T12:00:00", "yesterday", None, [1], 9e18]
    ),
    st.floats(max_value=MIN_TIMESTAMP - 1, allow_nan=False, allow_infinity=False),
)
valid_value = st.one_of(
    st.none(), st.floats(allow_nan=False, allow_infinity=False), st.integers(-(10**9), 10**9)
)
invalid_value = st.sampled_from([True, False, "abc", [1.0], {"v": 1}, "inf", "1e999"])
event_type_valid = st.one_of(
    st.sampled_from(sorted(ITEM_EVENT_TYPES)),
    st.text("abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=12),
)
event_type_invalid = st.sampled_from(["", "View", "add-to-cart", "1st", "a" * 65, 7, None])
_key = st.text(_id_chars, min_size=1, max_size=20)
_scalar = st.one_of(
    st.text(_id_chars, max_size=20),
    st.integers(-(10**6), 10**6),
    st.booleans(),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
)
valid_properties = st.dictionaries(_key, _scalar, max_size=3)
invalid_properties = st.sampled_from(
    [
        {"p": {"q": 1}},
        {"p": [1, 2]},
        {"": 1},
        {"p": None},
        {f"k{n}": n for n in range(33)},
        {"big": "x" * 1100},
        {"k" * 65: 1},
        "flat",
    ]
)
valid_context = st.dictionaries(_key, st.text(_id_chars, max_size=30), max_size=2)
invalid_context = st.sampled_from(
    [{"k": "v" * (MAX_ID_LENGTH + 1)}, {"k": 3}, [["k", "v"]], {"": "v"}]
)
valid_impression = st.one_of(
    st.lists(valid_id, max_size=3), st.just([f"i{n}" for n in range(MAX_IMPRESSION)])
)
invalid_impression = st.sampled_from([["x"] * (MAX_IMPRESSION + 1), [1, 2], "a,b", [""], [None]])


# Built once: hypothesis validates a strategy the first time it is drawn from, and
# rebuilding them per example made the fuzzer twenty times slower.
FIELD_STRATEGIES: dict[str, st.SearchStrategy[Tagged]] = {
    "event_id": tagged(valid_id, invalid_id),
    "event_type": tagged(event_type_valid, event_type_invalid, omit_ok=False),
    "user_id": tagged(valid_id, invalid_id),
    "session_id": tagged(valid_id, invalid_id),
    "item_id": tagged(valid_id, invalid_id),
    "timestamp": tagged(valid_ts, invalid_ts),
    "event_value": tagged(valid_value, invalid_value),
    "recommendation_id": tagged(valid_id, invalid_id),
    "impression": tagged(valid_impression, invalid_impression),
    "properties": tagged(valid_properties, invalid_properties),
    "context": tagged(valid_context, invalid_context),
}
RARELY = st.integers(0, 20).map(lambda n: n == 0)
NOT_FINITE = st.sampled_from([(math.nan, False), (math.inf, False)])


@st.composite
def events(draw: st.DrawFn, json_safe: bool = False) -> tuple[dict[str, Any], bool]:
    """An event-like object and whether the schema must accept it."""
    fields: dict[str, Tagged] = {
        name: draw(strategy) for name, strategy in FIELD_STRATEGIES.items()
    }
    if not json_safe and draw(RARELY):
        fields["event_value"] = draw(NOT_FINITE)
    body = {name: value for name, (value, _) in fields.items() if value is not OMIT}
    ok = all(good for _, good in fields.values())
    if draw(RARELY):
        body["bogus"] = 1
        ok = False
    # The cross-field rules, on what was drawn.
    present = {name for name, (value, _) in fields.items() if value is not OMIT}
    if not present & {"user_id", "session_id"}:
        ok = False
    if isinstance(body.get("user_id"), str) and body["user_id"].startswith("session:"):
        ok = False
    if body.get("event_type") in ITEM_EVENT_TYPES and "item_id" not in body:
        ok = False
    return body, ok


def check_verdict(body: dict[str, Any], ok: bool, problems: list[dict[str, str]] | None) -> None:
    if ok:
        assert problems is None, f"a valid event was refused: {body!r} -> {problems}"
        return
    assert problems, f"an invalid event was accepted: {body!r}"
    for problem in problems:
        root = problem["field"].split(".")[0]
        # A rejection names a field of the event, one the sender sent (an unknown field),
        # or the whole body for the cross-field rule.
        assert root in FIELDS or root in body or root == "body", problem
        assert problem["problem"]
        assert problem["fix"]
        if root == "body":
            # Only the cross-field rule about who the event is may lack a field name.
            assert "user_id" in problem["problem"] or "session_id" in problem["problem"]


@pytest.mark.timeout(600)
@settings(
    max_examples=900,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(st.lists(events(), min_size=10, max_size=10))
def test_the_parser_accepts_exactly_the_valid_events(
    drawn: list[tuple[dict[str, Any], bool]],
) -> None:
    # Ten events an example (9,000 in all): hypothesis's cost is per draw, and this halves
    # its per-example overhead.
    for body, ok in drawn:
        try:
            Event.model_validate(body)
            problems = None
        except ValidationError as exc:
            problems = [p.as_dict() for p in problems_from(exc)]
        check_verdict(body, ok, problems)


@pytest.mark.timeout(600)
def test_the_collector_under_fuzzing(settings_fuzz: Settings) -> None:
    """~1,300 generated events in batches of up to 25, plus arbitrary JSON bodies,
    through a real uvicorn server onto moto's Kinesis; afterwards every accepted event
    is on the stream, and nothing else is."""
    port = stack.free_port()
    accepted_ids: list[str] = []
    with (
        serve_in_thread(create_app(settings_fuzz), port),
        httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client,
    ):

        @settings(max_examples=100, deadline=None, database=None, suppress_health_check=SLOW)
        @given(st.lists(events(json_safe=True), min_size=1, max_size=25))
        def batches(drawn: list[tuple[dict[str, Any], bool]]) -> None:
            response = client.post("/v1/events", json=[body for body, _ in drawn])
            assert response.status_code in (202, 422), response.text
            payload = response.json()
            assert payload.get("failed", []) == []
            rejected = {r["index"]: r["errors"] for r in payload.get("rejected", [])}
            accepted = {a["index"]: a["event_id"] for a in payload.get("accepted", [])}
            assert not set(rejected) & set(accepted)
            assert set(rejected) | set(accepted) == set(range(len(drawn)))
            for index, (body, ok) in enumerate(drawn):
                check_verdict(body, ok, rejected.get(index))
            accepted_ids.extend(accepted.values())

        batches()

        json_values = st.recursive(
            st.none()
            | st.booleans()
            | st.floats(allow_nan=False, allow_infinity=False)
            | st.text(max_size=10),
            lambda inner: (
                st.lists(inner, max_size=4)
                | st.dictionaries(st.text(max_size=8), inner, max_size=4)
            ),
            max_leaves=20,
        )

        @settings(max_examples=100, deadline=None, database=None, suppress_health_check=SLOW)
        @given(json_values)
        def arbitrary(body: Any) -> None:
            response = client.post("/v1/events", json=body)
            assert response.status_code in (202, 413, 422), response.text
            error = response.json().get("error")
            if response.status_code != 202:
                assert error["code"]
                assert error["message"]
            for item in response.json().get("accepted", []):
                accepted_ids.append(item["event_id"])

        arbitrary()
        assert client.get("/healthz").status_code == 200
    on_stream = sorted(event.event_id for _, event in read_stream(settings_fuzz))
    assert on_stream == sorted(accepted_ids)
