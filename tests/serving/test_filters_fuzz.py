"""Fuzzing the filter parser: 12,000 generated inputs in all.

Whatever the input, parsing ends (pytest-timeout catches a hang) with a filter or a
FilterSyntaxError, never another exception; every valid filter generated from the grammar
renders to text that parses back to the same tree, and evaluates without error.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from serving.filters import (
    MAX_EXPRESSION_LENGTH,
    MAX_FIELDS,
    MAX_PARAMETERS,
    Condition,
    Expression,
    FilterSyntaxError,
    FilterValuesError,
    Param,
    Ref,
    Value,
    compile_filter,
    parse_filter,
    parse_filter_values,
    render,
)
from streams.schema import Item


def fuzz(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,  # no timing assertions; a hang is caught by pytest-timeout instead
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        database=None,
    )


# --- valid filters, generated from the grammar -------------------------------------------

NUMBER = st.one_of(
    st.integers(-(10**12), 10**12).map(str),
    st.builds("{}.{}".format, st.integers(-999, 999), st.integers(0, 999)),
    st.sampled_from(["1e3", "-2.5E-2", "0"]),
)
STRING = st.text(max_size=8)
PARAM = st.sampled_from(["CATEGORY", "P", "max_price", "Event_Type", "X1", "9"]).map(Param)
USER_FIELD = st.sampled_from(["AGE", "TIER", "MEMBERSHIP", "IN", "COUNTRY_2"])
REF = st.one_of(
    st.builds(Ref, st.just("CurrentUser"), USER_FIELD),
    st.builds(Ref, st.just("CurrentItem"), st.sampled_from(["PRICE", "GENRE", "BRAND"])),
)
ITEM_LIST_FIELDS = ["ITEM_ID", "CATEGORY", "CATEGORIES", "GENRE", "GENRES", "BRAND", "CATEGORY_L2"]
ITEM_NUMBER_FIELDS = ["PRICE", "CREATION_TIMESTAMP"]
# Strategies are built once, here: building them inside a draw makes hypothesis slow.
ANY_VALUE = st.one_of(STRING.map(Value), NUMBER.map(lambda n: Value(n, number=True)))
VALUE = ANY_VALUE.filter(lambda v: v.number or v.text != "*")
LITERALS = st.lists(VALUE, min_size=1, max_size=3).map(tuple)
LITERALS_STAR = st.lists(ANY_VALUE, min_size=1, max_size=3).map(tuple)
ONE_VALUE = VALUE.map(lambda v: (v,))
ONE_NUMBER = NUMBER.map(lambda n: (Value(n, number=True),))
COMPARISONS = st.sampled_from(["<", "<=", ">", ">="])


def cond(
    dataset: str, fields: list[str], ops: st.SearchStrategy[str], operand: st.SearchStrategy[object]
) -> st.SearchStrategy[Condition]:
    return st.builds(Condition, st.just(dataset), st.sampled_from(fields), ops, operand)


ITEM_FIELDS = ITEM_LIST_FIELDS + ITEM_NUMBER_FIELDS
ITEM_CONDITION = st.one_of(
    cond("Items", ITEM_FIELDS, st.just("IN"), st.one_of(LITERALS, PARAM, REF)),
    cond("Items", ITEM_FIELDS, st.just("NOT IN"), st.one_of(LITERALS, REF)),
    cond("Items", ITEM_FIELDS, st.just("="), st.one_of(ONE_VALUE, PARAM, REF)),
    cond("Items", ITEM_NUMBER_FIELDS, COMPARISONS, st.one_of(ONE_NUMBER, PARAM, REF)),
)
INTERACTION_CONDITION = st.one_of(
    cond("Interactions", ["EVENT_TYPE"], st.just("IN"), st.one_of(LITERALS_STAR, PARAM)),
    cond("Interactions", ["EVENT_TYPE"], st.just("NOT IN"), LITERALS_STAR),
)
USER_FIELDS = ["AGE", "TIER", "MEMBERSHIP", "IN", "COUNTRY_2"]
USER_CONDITION = st.one_of(
    cond("CurrentUser", USER_FIELDS, st.just("IN"), st.one_of(LITERALS, PARAM)),
    cond("CurrentUser", USER_FIELDS, st.just("NOT IN"), LITERALS),
    cond("CurrentUser", USER_FIELDS, st.sampled_from(["=", "<", "<=", ">", ">="]),
         st.one_of(ONE_NUMBER, PARAM)),
)  # fmt: skip


def where(
    condition: st.SearchStrategy[Condition],
) -> st.SearchStrategy[tuple[tuple[Condition, ...], ...]]:
    conjunction = st.lists(condition, min_size=1, max_size=2).map(tuple)
    return st.lists(conjunction, min_size=1, max_size=2).map(tuple)


EXPRESSION = st.builds(
    Expression,
    st.sampled_from(["INCLUDE", "EXCLUDE"]),
    st.one_of(where(ITEM_CONDITION), where(INTERACTION_CONDITION)),
    st.lists(USER_CONDITION, max_size=2).map(tuple),
)


def within_limits(expressions: tuple[Expression, ...]) -> bool:
    conditions = [c for e in expressions for c in e.conditions]
    fields = {(c.dataset, c.field) for c in conditions}
    fields |= {
        (c.operand.dataset, c.operand.field) for c in conditions if isinstance(c.operand, Ref)
    }
    params = {c.operand.name for c in conditions if isinstance(c.operand, Param)}
    return len(fields) <= MAX_FIELDS and len(params) <= MAX_PARAMETERS


FILTERS = st.lists(EXPRESSION, min_size=1, max_size=3).map(tuple)
SAMPLE_ITEMS = [
    Item(item_id="a", categories=["x", "y"], brand="b", price=3.5, creation_timestamp=10),
    Item(item_id="*"),
    None,
]


@fuzz(700)
@given(FILTERS)
def test_valid_filters_round_trip_and_evaluate(expressions: tuple[Expression, ...]) -> None:
    assume(within_limits(expressions))
    text = render(expressions)
    assume(len(text) <= MAX_EXPRESSION_LENGTH)
    assert parse_filter(text) == expressions
    compiled = compile_filter(text)
    assert compiled.canonical() == text
    # Every parameter given a value that suits both lists and comparisons.
    values = {p: "1" for p in compiled.params}
    current = SAMPLE_ITEMS[0]
    for item in SAMPLE_ITEMS:
        item_id = item.item_id if item else "ghost"
        result = compiled.allows(item_id, item, [], values, user={"age": "3"}, current_item=current)
        assert isinstance(result, bool)


# --- anything at all ----------------------------------------------------------------------


def parses_or_fails_cleanly(text: str) -> None:
    error: FilterSyntaxError | None = None
    try:
        expressions = parse_filter(text)
    except FilterSyntaxError as exc:
        error = exc
    if error is not None:
        assert 0 <= error.position <= max(len(text), MAX_EXPRESSION_LENGTH)
        assert error.problem
        assert error.fix
        return
    # Whatever parsed must round-trip through its canonical text.
    assert parse_filter(render(expressions)) == expressions


@fuzz(5000)
@given(st.text(max_size=200))
def test_arbitrary_text_never_crashes_the_parser(text: str) -> None:
    parses_or_fails_cleanly(text)


VOCABULARY = [
    "INCLUDE", "EXCLUDE", "include", "ItemID", "UserID", "WHERE", "AND", "OR", "IF", "IN",
    "NOT", "Items", "Interactions", "CurrentUser", "CurrentItem", ".", "CATEGORY", "PRICE",
    "EVENT_TYPE", "GENRE", "AGE", "(", ")", ",", "|", "=", "<", "<=", ">", ">=", "$P", "$Q",
    '"a"', '"*"', '"x\\"y"', "3", "-2.5", "1e3", "'a'", "!", "\"", "\\", "$", "==",
]  # fmt: skip


@fuzz(4500)
@given(st.lists(st.sampled_from(VOCABULARY), max_size=25), st.sampled_from([" ", ""]))
def test_token_soup_fails_cleanly_or_round_trips(tokens: list[str], sep: str) -> None:
    parses_or_fails_cleanly(sep.join(tokens))


@fuzz(800)
@given(
    FILTERS,
    st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from([*VOCABULARY, "", " "])), max_size=3),
)
def test_mutated_valid_filters_fail_cleanly(
    expressions: tuple[Expression, ...], edits: list[tuple[int, str]]
) -> None:
    text = render(expressions)
    for at, insert in edits:
        at %= len(text) + 1
        text = text[:at] + insert + text[at + 1 :]  # replace one character (or delete it)
    parses_or_fails_cleanly(text)


@fuzz(1000)
@given(st.text(max_size=80))
def test_arbitrary_filter_values_fail_cleanly(text: str) -> None:
    message = ""
    try:
        assert parse_filter_values("P", text)
    except FilterValuesError as exc:
        message = str(exc)
    assert not message or "'P'" in message


@pytest.mark.parametrize("n", [10, 1000])
def test_deep_chains_do_not_recurse(n: int) -> None:
    # The parser loops over AND/OR/| rather than recursing, so long chains cannot overflow.
    text = " OR ".join(["Items.PRICE > 1"] * n)
    text = f"EXCLUDE ItemID WHERE {text}"
    if len(text) > MAX_EXPRESSION_LENGTH:
        with pytest.raises(FilterSyntaxError, match="characters"):
            parse_filter(text)
    else:
        assert len(parse_filter(text)[0].where) == n
