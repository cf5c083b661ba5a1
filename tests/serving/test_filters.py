# ruff: noqa: E501  (the table of malformed expressions reads best one case per line)
"""Every filter form on hand-made items and windows, and every malformed form's error."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pytest

from recstream.windows import WindowEntry
from serving.filters import (
    MAX_EXPRESSION_LENGTH,
    CompiledFilter,
    FilterSyntaxError,
    FilterValuesError,
    compile_filter,
    parse_filter,
    parse_filter_values,
    validate_filter_values,
)
from streams.schema import Item

ITEMS = {
    "boot": Item(item_id="boot", categories=["shoe", "boot"], brand="acme", price=80.0,
                 creation_timestamp=1_700_000_000),
    "sandal": Item(item_id="sandal", categories=["shoe", "sandal"], brand="sunny", price=25.0,
                   creation_timestamp=1_600_000_000),
    "cap": Item(item_id="cap", categories=["hat"], brand="acme", price=15.0),
    "drama": Item(item_id="drama", categories=["Drama"], title="A film"),
    "42": Item(item_id="42"),
}  # fmt: skip
UNKNOWN = "ghost"  # a candidate with no catalog record
WINDOW = [
    WindowEntry("boot", "Purchase", 30.0, "e3"),
    WindowEntry("cap", "click", 20.0, "e2"),
    WindowEntry("boot", "view", 10.0, "e1"),
]


def allowed(
    expression: str | CompiledFilter,
    values: Mapping[str, str] | None = None,
    window: Sequence[WindowEntry] = WINDOW,
    **kw: object,
) -> list[str]:
    f = compile_filter(expression) if isinstance(expression, str) else expression
    ids = [*ITEMS, UNKNOWN]
    return [i for i in ids if f.allows(i, ITEMS.get(i), window, values or {}, **kw)]  # type: ignore[arg-type]


ALL = [*ITEMS, UNKNOWN]


# --- interactions ------------------------------------------------------------------------


def test_exclude_purchased_items_matches_event_types_case_insensitively() -> None:
    assert allowed('EXCLUDE ItemID WHERE Interactions.EVENT_TYPE IN ("purchase")') == [
        i for i in ALL if i != "boot"
    ]


def test_include_only_clicked_items() -> None:
    assert allowed('INCLUDE ItemID WHERE Interactions.EVENT_TYPE IN ("CLICK")') == ["cap"]


def test_star_means_any_interaction() -> None:
    f = 'EXCLUDE ItemID WHERE Interactions.EVENT_TYPE IN ("*")'
    assert allowed(f) == [i for i in ALL if i not in ("boot", "cap")]
    assert allowed(f, window=[]) == ALL


def test_interactions_not_in_means_an_interaction_of_another_type() -> None:
    # boot was purchased and viewed, cap only clicked.
    f = 'INCLUDE ItemID WHERE Interactions.EVENT_TYPE NOT IN ("click")'
    assert allowed(f) == ["boot"]


def test_event_type_parameter() -> None:
    f = compile_filter("EXCLUDE ItemID WHERE Interactions.EVENT_TYPE IN ($EVENT_TYPE)")
    assert allowed(f, {"EVENT_TYPE": '"click","purchase"'}) == [
        i for i in ALL if i not in ("boot", "cap")
    ]


def test_window_changes_are_seen_between_calls() -> None:
    f = compile_filter('EXCLUDE ItemID WHERE Interactions.EVENT_TYPE IN ("purchase")')
    assert "cap" in allowed(f)
    other = [WindowEntry("cap", "purchase", 1.0, "x")]
    assert "cap" not in allowed(f, window=other)
    assert "boot" in allowed(f, window=other)


# --- items ------------------------------------------------------------------------------


def test_item_category_in_and_not_in() -> None:
    assert allowed('INCLUDE ItemID WHERE Items.CATEGORY IN ("shoe")') == ["boot", "sandal"]
    # An item without the field matches neither IN nor NOT IN (SQL NULL): EXCLUDE keeps it.
    assert allowed('EXCLUDE ItemID WHERE Items.CATEGORY NOT IN ("shoe")') == [
        "boot", "sandal", "42", UNKNOWN,
    ]  # fmt: skip


def test_category_aliases_and_levels() -> None:
    for name in ("CATEGORIES", "genre", "GENRES"):
        assert allowed(f'INCLUDE ItemID WHERE Items.{name} IN ("hat")') == ["cap"]
    assert allowed('INCLUDE ItemID WHERE Items.CATEGORY_L2 IN ("boot", "hat")') == ["boot"]
    assert allowed('EXCLUDE ItemID WHERE Items.CATEGORY_L1 IN ("shoe") AND '
                   'Items.CATEGORY_L2 NOT IN ("boot")') == [i for i in ALL if i != "sandal"]  # fmt: skip


def test_values_match_exact_strings() -> None:
    assert allowed('INCLUDE ItemID WHERE Items.GENRE IN ("drama")') == []
    assert allowed('INCLUDE ItemID WHERE Items.GENRE IN ("Drama")') == ["drama"]


def test_item_id_and_brand() -> None:
    assert allowed('EXCLUDE ItemID WHERE Items.ITEM_ID IN ("cap", "ghost")') == [
        "boot", "sandal", "drama", "42",
    ]  # fmt: skip
    assert allowed("INCLUDE ItemID WHERE Items.ITEM_ID IN (42)") == ["42"]
    assert allowed('INCLUDE ItemID WHERE Items.BRAND IN ("acme")') == ["boot", "cap"]
    assert allowed('INCLUDE ItemID WHERE Items.BRAND = "acme"') == ["boot", "cap"]


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("INCLUDE ItemID WHERE Items.PRICE < 25", ["cap"]),
        ("INCLUDE ItemID WHERE Items.PRICE <= 25", ["sandal", "cap"]),
        ("INCLUDE ItemID WHERE Items.PRICE > 25", ["boot"]),
        ("INCLUDE ItemID WHERE Items.PRICE >= 25", ["boot", "sandal"]),
        ("INCLUDE ItemID WHERE Items.PRICE = 25.0", ["sandal"]),
        ("INCLUDE ItemID WHERE Items.PRICE IN (15, 80)", ["boot", "cap"]),
        ("INCLUDE ItemID WHERE Items.PRICE < (20)", ["cap"]),
        ("INCLUDE ItemID WHERE Items.CREATION_TIMESTAMP > 1650000000", ["boot"]),
        ("EXCLUDE ItemID WHERE Items.PRICE > 20", ["cap", "drama", "42", UNKNOWN]),
    ],
)
def test_numeric_comparisons(expression: str, expected: list[str]) -> None:
    assert allowed(expression) == expected


def test_numeric_parameter() -> None:
    f = "INCLUDE ItemID WHERE Items.PRICE < $MAX"
    assert allowed(f, {"MAX": "30"}) == ["sandal", "cap"]
    assert allowed(f, {"MAX": '"30"'}) == ["sandal", "cap"]
    with pytest.raises(FilterValuesError, match="needs a number"):
        allowed(f, {"MAX": '"cheap"'})


def test_and_binds_tighter_than_or() -> None:
    f = 'INCLUDE ItemID WHERE Items.BRAND IN ("sunny") OR Items.BRAND IN ("acme") AND Items.PRICE < 20'
    assert allowed(f) == ["sandal", "cap"]


# --- parameters ---------------------------------------------------------------------------


def test_include_parameter_takes_personalize_value_strings() -> None:
    f = compile_filter("INCLUDE ItemID WHERE Items.CATEGORY IN ($CATEGORY)")
    assert allowed(f, {"CATEGORY": '"hat","sandal"'}) == ["sandal", "cap"]
    assert allowed(f, {"CATEGORY": ' "hat" , "boot" '}) == ["boot", "cap"]


def test_missing_include_parameter_is_an_error_naming_it() -> None:
    f = compile_filter("INCLUDE ItemID WHERE Items.CATEGORY IN ($CATEGORY)")
    with pytest.raises(FilterValuesError, match=r"\$CATEGORY") as info:
        allowed(f, {})
    assert "filter_values" in info.value.fix


def test_missing_exclude_parameter_skips_that_expression_as_personalize_does() -> None:
    f = compile_filter(
        "EXCLUDE ItemID WHERE Items.CATEGORY IN ($CATEGORY) | "
        'EXCLUDE ItemID WHERE Interactions.EVENT_TYPE IN ("purchase")'
    )
    assert allowed(f, {}) == [i for i in ALL if i != "boot"]
    assert allowed(f, {"CATEGORY": '"hat"'}) == [i for i in ALL if i not in ("boot", "cap")]


def test_parameter_names_are_case_sensitive() -> None:
    f = compile_filter("INCLUDE ItemID WHERE Items.CATEGORY IN ($Category)")
    with pytest.raises(FilterValuesError):
        allowed(f, {"CATEGORY": '"hat"'})
    assert allowed(f, {"Category": '"hat"'}) == ["cap"]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("hat", "double-quoted"),
        ('"hat",', "trailing comma"),
        ('"hat" "cap"', "expected ','"),
        ("", "no value"),
        ('"unterminated', "unterminated"),
        ("'hat'", "single-quoted"),
    ],
)
def test_malformed_values_name_the_parameter(text: str, problem: str) -> None:
    with pytest.raises(FilterValuesError, match=problem) as info:
        parse_filter_values("CATEGORY", text)
    assert "'CATEGORY'" in str(info.value)


def test_value_escapes() -> None:
    assert [v.text for v in parse_filter_values("X", r'"say \"hi\"", "a\\b", 3')] == [
        'say "hi"', "a\\b", "3",
    ]  # fmt: skip


def test_filter_values_limits() -> None:
    assert validate_filter_values(None) == {}
    assert validate_filter_values({"A_1": '"x"'}) == {"A_1": '"x"'}
    for bad, what in [
        ([1], "JSON object"),
        ({f"P{i}": '"x"' for i in range(26)}, "26 entries"),
        ({"$CAT": '"x"'}, "not a parameter name"),
        ({"CAT": 3}, "must be a string"),
        ({"CAT": "x" * 1001}, "1001 characters"),
    ]:
        with pytest.raises(FilterValuesError, match=what):
            validate_filter_values(bad)


# --- CurrentUser and CurrentItem --------------------------------------------------------


def test_if_current_user_applies_the_expression_only_when_it_holds() -> None:
    f = compile_filter(
        'EXCLUDE ItemID WHERE Items.PRICE > 20 IF CurrentUser.AGE < 18 AND CurrentUser.TIER = "basic"'
    )
    assert allowed(f, user={"age": "15", "tier": "basic"}) == ["cap", "drama", "42", UNKNOWN]
    assert allowed(f, user={"AGE": "30", "tier": "basic"}) == ALL
    assert allowed(f, user={"tier": "basic"}) == ALL  # no AGE: the IF does not hold
    assert allowed(f) == ALL


def test_if_with_a_parameter_and_in() -> None:
    f = compile_filter(
        'INCLUDE ItemID WHERE Items.BRAND IN ("acme") IF CurrentUser.MEMBERSHIP IN ($LEVEL)'
    )
    assert allowed(f, {"LEVEL": '"gold"'}, user={"membership": "gold"}) == ["boot", "cap"]
    assert allowed(f, {"LEVEL": '"gold"'}, user={"membership": "free"}) == ALL


def test_items_compared_with_the_current_user() -> None:
    f = compile_filter("INCLUDE ItemID WHERE Items.BRAND IN CurrentUser.FAVOURITE_BRAND")
    assert allowed(f, user={"favourite_brand": "sunny"}) == ["sandal"]
    assert allowed(f) == []


def test_current_item_for_related_items() -> None:
    f = compile_filter(
        "INCLUDE ItemID WHERE Items.PRICE < CurrentItem.PRICE AND Items.GENRE IN CurrentItem.GENRE"
    )
    assert allowed(f, current_item=ITEMS["boot"]) == ["sandal"]
    with pytest.raises(FilterValuesError, match="CurrentItem"):
        allowed(f)


def test_chained_expressions_all_apply() -> None:
    f = (
        'INCLUDE ItemID WHERE Items.CATEGORY IN ("shoe", "hat") | '
        'EXCLUDE ItemID WHERE Interactions.EVENT_TYPE IN ("click", "purchase")'
    )
    assert allowed(f) == ["sandal"]


def test_bind_once_and_reuse() -> None:
    f = compile_filter('EXCLUDE ItemID WHERE Interactions.EVENT_TYPE IN ("purchase")')
    bound = f.bind({}, WINDOW)
    assert [i for i in ALL if bound.allows(i, ITEMS.get(i))] == [i for i in ALL if i != "boot"]


# --- syntax -----------------------------------------------------------------------------


def test_keywords_and_datasets_are_case_insensitive() -> None:
    a = parse_filter('exclude itemid where interactions.event_type in ("purchase")')
    b = parse_filter('EXCLUDE ItemID WHERE Interactions.EVENT_TYPE IN ("purchase")')
    assert a == b


@pytest.mark.parametrize(
    ("expression", "position", "problem", "fix"),
    [
        ("", 0, "empty filter expression", "EXCLUDE ItemID"),
        ("   ", 0, "empty filter expression", "EXCLUDE ItemID"),
        ('DROP ItemID WHERE Items.CATEGORY IN ("a")', 0, "expected INCLUDE or EXCLUDE", "start"),
        ("EXCLUDE", 7, "expected ItemID", "EXCLUDE ItemID WHERE"),
        ('EXCLUDE UserID WHERE Items.CATEGORY IN ("a")', 8, "UserID filters", "ItemID"),
        ('EXCLUDE ItemID Items.CATEGORY IN ("a")', 15, "expected WHERE", "WHERE"),
        ('EXCLUDE ItemID WHERE Products.CATEGORY IN ("a")', 21, "expected a dataset", "Items"),
        ('EXCLUDE ItemID WHERE Items CATEGORY IN ("a")', 27, "expected '.'", "Items.<FIELD>"),
        ('EXCLUDE ItemID WHERE Items.CATEGORY LIKE ("a")', 36, "expected an operator", "NOT IN"),
        ('EXCLUDE ItemID WHERE Items.CATEGORY IN "a"', 39, "expected '('", "parentheses"),
        ("EXCLUDE ItemID WHERE Items.CATEGORY IN ()", 40, "empty value list", "at least one"),
        ('EXCLUDE ItemID WHERE Items.CATEGORY IN ("a"', 39, "unclosed value list", "close"),
        ('EXCLUDE ItemID WHERE Items.CATEGORY IN ("a" "b")', 44, "expected ',' or ')'", "commas"),
        ("EXCLUDE ItemID WHERE Items.CATEGORY IN (shoe)", 40, "unquoted value", '"shoe"'),
        ("EXCLUDE ItemID WHERE Items.CATEGORY IN ('shoe')", 40, "single-quoted", "double"),
        ('EXCLUDE ItemID WHERE Items.CATEGORY IN ("sh', 40, "unterminated string", "close"),
        ('EXCLUDE ItemID WHERE Items.CATEGORY IN ("a\\n")', 42, "unknown escape", '\\"'),
        ('EXCLUDE ItemID WHERE Items.CATEGORY IN ("a", $X)', 45, "parameter mixed", "alone"),
        ("EXCLUDE ItemID WHERE Items.CATEGORY IN ($X, $Y)", 42, "stand alone", "IN ($X)"),
        ("EXCLUDE ItemID WHERE Items.CATEGORY IN ($)", 40, "bad parameter name", "$CATEGORY"),
        ("EXCLUDE ItemID WHERE Items.CATEGORY NOT IN ($X)", 43, "parameter with NOT IN", "IN"),
        ('EXCLUDE ItemID WHERE Items.TITLE IN ("a")', 21, "unstructured text", "CATEGORY"),
        ('EXCLUDE ItemID WHERE Items.COLOUR IN ("a")', 21, "unknown item field", "BRAND"),
        ("EXCLUDE ItemID WHERE Items.CATEGORY < 3", 36, "non-numeric field", "PRICE"),
        ('EXCLUDE ItemID WHERE Items.PRICE < "3"', 35, "compares numbers", "without quotes"),
        ("EXCLUDE ItemID WHERE Items.PRICE < 3abc", 35, "malformed number", "20"),
        ("EXCLUDE ItemID WHERE Items.PRICE == 3", 33, "'=='", "single"),
        ("EXCLUDE ItemID WHERE Items.PRICE != 3", 33, "'!'", "NOT IN"),
        ("EXCLUDE ItemID WHERE Items.PRICE <> 3", 33, "'<>'", "NOT IN"),
        ("EXCLUDE ItemID WHERE Items.PRICE < (3", 37, "expected ')'", "one value"),
        ('EXCLUDE ItemID WHERE Items.CATEGORY IN ("*")', 39, '"*" outside', "EVENT_TYPE"),
        ('EXCLUDE ItemID WHERE Interactions.ITEM_ID IN ("a")', 21, "cannot be filtered", "EVENT_TYPE"),
        ("EXCLUDE ItemID WHERE Interactions.EVENT_TYPE = 3", 45, "with =", "IN or NOT IN"),
        ("EXCLUDE ItemID WHERE Interactions.EVENT_TYPE IN CurrentUser.X", 48, "compared with a field", "list"),
        ('EXCLUDE ItemID WHERE Items.CATEGORY IN ("a") AND Interactions.EVENT_TYPE IN ("b")', 49, "both Items and Interactions", "'|'"),
        ('EXCLUDE ItemID WHERE CurrentUser.AGE > 3', 21, "CurrentUser on the left", "after IF"),
        ('EXCLUDE ItemID WHERE CurrentItem.PRICE > 3', 21, "CurrentItem on the left", "Items.PRICE < CurrentItem.PRICE"),
        ('EXCLUDE ItemID WHERE Items.PRICE > 3 IF Items.PRICE < 9', 40, "IF tests Items", "CurrentUser"),
        ("EXCLUDE ItemID WHERE Items.PRICE > 3 IF CurrentUser.A = 1 OR CurrentUser.B = 2", 58, "OR after IF", "AND only"),
        ("EXCLUDE ItemID WHERE Items.PRICE > 3 IF CurrentUser.A = 1 IF CurrentUser.B = 2", 58, "a second IF", "one IF"),
        ("EXCLUDE ItemID WHERE (Items.PRICE > 3)", 21, "parentheses around conditions", "AND binds"),
        ("EXCLUDE ItemID WHERE Items.PRICE > 3)", 36, "unbalanced ')'", "remove"),
        ("EXCLUDE ItemID WHERE Items.PRICE > 3 Items.PRICE < 9", 37, "after a condition", "AND or OR"),
        ("EXCLUDE ItemID WHERE Items.PRICE > 3 |", 38, "expected INCLUDE or EXCLUDE", "start"),
        ("EXCLUDE ItemID WHERE Items.PRICE > 3 # comment", 37, "unexpected character '#'", "remove"),
        ("EXCLUDE ItemID WHERE Items.PRICE > 3 AND", 40, "expected a dataset", "Items"),
    ],
)  # fmt: skip
def test_malformed_expressions_name_position_problem_and_fix(
    expression: str, position: int, problem: str, fix: str
) -> None:
    with pytest.raises(FilterSyntaxError) as info:
        compile_filter(expression)
    error = info.value
    assert problem in error.problem, error
    assert fix in error.fix, error
    assert error.position == position, error
    assert f"character {position + 1}" in str(error)
    assert error.code == "filter_syntax_error"
    assert error.problems[0].field == "filter_expression"


def test_limits() -> None:
    long = 'EXCLUDE ItemID WHERE Items.CATEGORY IN ("' + "x" * MAX_EXPRESSION_LENGTH + '")'
    with pytest.raises(FilterSyntaxError, match="2500 characters"):
        compile_filter(long)
    many_fields = (
        " | ".join(f'EXCLUDE ItemID WHERE Items.CATEGORY_L{n} IN ("x")' for n in range(1, 10))
        + ' | EXCLUDE ItemID WHERE Items.BRAND IN ("x") | EXCLUDE ItemID WHERE Items.PRICE < 3'
    )
    with pytest.raises(FilterSyntaxError, match="11 distinct dataset fields"):
        compile_filter(many_fields)
    many_params = " | ".join(f"INCLUDE ItemID WHERE Items.CATEGORY IN ($P{n})" for n in range(26))
    with pytest.raises(FilterSyntaxError, match="26 parameters"):
        compile_filter(many_params)
