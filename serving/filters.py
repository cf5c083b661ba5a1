"""Business-rule filters in Amazon Personalize's filter expression syntax.

A filter is one or more expressions joined by ``|``; an item is recommended only if every
expression lets it through (Personalize passes the result of one expression to the next)::

    filter      := expression ( "|" expression )*
    expression  := ("INCLUDE" | "EXCLUDE") "ItemID" "WHERE" where [ "IF" user_conditions ]
    user_conditions := condition on CurrentUser ( "AND" condition on CurrentUser )*
    where       := conjunction ( "OR" conjunction )*          AND binds tighter than OR
    conjunction := condition ( "AND" condition )*
    condition   := Dataset "." FIELD ( ["NOT"] "IN" list | ("="|"<"|"<="|">"|">=") scalar )
    list        := "(" value ("," value)* ")" | "(" $PARAM ")" | $PARAM
                 | CurrentItem.FIELD | CurrentUser.FIELD
    scalar      := value | $PARAM | CurrentItem.FIELD | CurrentUser.FIELD, optionally in parentheses
    value       := "double-quoted string" | number

Keywords, ``ItemID`` and dataset names are case-insensitive; field names are matched
case-insensitively too; parameter names are case-sensitive (``$CATEGORY`` takes
``values["CATEGORY"]``, as Personalize's ``filterValues``). The rules Personalize enforces
are enforced here at compile time, each with the position and the fix:

* the conditions of one expression use one dataset (``Items`` or ``Interactions``); chain
  expressions with ``|`` to filter on both;
* ``Interactions`` offers only ``EVENT_TYPE``, with ``IN``/``NOT IN``; ``"*"`` (any event
  type) is allowed only there; event types match case-insensitively, other values exactly;
* ``NOT IN`` takes no parameter (use ``IN`` and the opposite action);
* ``IF`` appears once, at the end, tests only ``CurrentUser`` and chains with ``AND``;
* at most 2,500 characters (CreateFilter's limit), 10 distinct dataset fields and 25
  parameters (GetRecommendations' ``filterValues`` holds at most 25 entries).

Meaning, on recstream's data:

* ``Items.FIELD`` reads the candidate's catalog record (``streams.schema.Item``):
  ``ITEM_ID``; ``CATEGORY``, ``CATEGORIES``, ``GENRE``, ``GENRES`` (any of the item's
  categories); ``CATEGORY_L1``, ``CATEGORY_L2``, … (the n-th of the pipe-separated
  categories); ``BRAND``; ``PRICE``; ``CREATION_TIMESTAMP``. ``TITLE`` is unstructured
  text, which Personalize cannot filter on either. A candidate without a catalog record,
  or without the field, matches no condition on it (SQL's NULL: ``IN`` and ``NOT IN`` are
  both false), so ``INCLUDE`` drops it and ``EXCLUDE`` keeps it.
* ``Interactions.EVENT_TYPE IN (…)`` is true when the user's live window (the latest
  ``window_size`` interactions, newest first) holds an interaction with the candidate of
  one of those types; ``NOT IN`` when it holds one of another type.
* ``CurrentUser.FIELD`` reads the user attributes passed as ``user=`` (``User.attributes``,
  case-insensitive keys); a missing attribute makes its condition false, so an ``IF`` on
  it skips the expression. ``CurrentItem.FIELD`` reads ``current_item=`` (the item of a
  related-items request); a filter using it needs one.
* Parameters: ``values`` maps a parameter name to Personalize's string form, each value
  double-quoted and comma-separated (``"\\"shoes\\",\\"hats\\""``; numbers may go bare).
  As in Personalize, an ``EXCLUDE`` expression whose parameters are not all given is
  skipped, and an ``INCLUDE`` expression's parameters are required
  (`FilterValuesError`, HTTP 400).

`CurrentUser` and `CurrentItem` are keyword arguments of `CompiledFilter.allows` (after the
four positional arguments of the ranking pipeline's filter protocol), so one compiled filter
serves every request.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Literal, TypeAlias

from recstream.errors import FieldProblem, RecstreamError, ValidationFailed
from streams.schema import Item

if TYPE_CHECKING:
    from recstream.windows import WindowEntry

__all__ = [
    "MAX_EXPRESSION_LENGTH",
    "MAX_FIELDS",
    "MAX_PARAMETERS",
    "BoundFilter",
    "CompiledFilter",
    "Condition",
    "Expression",
    "FilterError",
    "FilterExists",
    "FilterNameError",
    "FilterNotFound",
    "FilterSyntaxError",
    "FilterValuesError",
    "Param",
    "Ref",
    "Value",
    "compile_filter",
    "parse_filter",
    "parse_filter_values",
    "render",
    "validate_filter_values",
]

MAX_EXPRESSION_LENGTH: Final = 2500
"""CreateFilter's filterExpression limit (botocore's service model)."""
MAX_PARAMETERS: Final = 25
"""GetRecommendations' filterValues holds at most 25 entries."""
MAX_FIELDS: Final = 10
"""Personalize's limit on distinct dataset fields in one filter."""
MAX_VALUE_LENGTH: Final = 1000
"""filterValues' value limit (botocore's FilterAttributeValue)."""
_PARAM_NAME = re.compile(r"[A-Za-z0-9_]{1,50}")


# --- errors ------------------------------------------------------------------------------


class FilterError(RecstreamError):
    """A filter could not be created, found or applied; ``status`` is the HTTP status."""

    code = "filter_error"
    status = 400


class FilterSyntaxError(FilterError, ValidationFailed):
    """A filter expression is malformed: where (0-based ``position``), what, and the fix."""

    code = "filter_syntax_error"

    def __init__(self, expression: str, position: int, problem: str, fix: str) -> None:
        self.expression = expression
        self.position = position
        self.problem = problem
        self.fix = fix
        snippet = expression[max(0, position - 20) : position + 20]
        message = (
            f"filter expression error at character {position + 1}: {problem}; {fix} "
            f"(near {snippet!r})"
        )
        ValidationFailed.__init__(
            self, message, [FieldProblem("filter_expression", f"{problem} at {position + 1}", fix)]
        )


class FilterValuesError(FilterError, ValidationFailed):
    """The values given for a filter's parameters are missing or malformed."""

    code = "filter_values_error"

    def __init__(self, message: str, fix: str) -> None:
        self.fix = fix
        ValidationFailed.__init__(
            self, f"{message}; {fix}", [FieldProblem("filter_values", message, fix)]
        )


class FilterNotFound(FilterError):
    code = "filter_not_found"
    status = 404


class FilterNameError(FilterError):
    code = "bad_filter_name"


class FilterExists(FilterError):
    code = "filter_exists"
    status = 409


# --- tokens -----------------------------------------------------------------------------

TokenKind = Literal[
    "WORD", "STRING", "NUMBER", "PARAM", "LPAREN", "RPAREN", "COMMA", "PIPE", "DOT", "OP", "EOF"
]


@dataclass(frozen=True, slots=True)
class Token:
    kind: TokenKind
    text: str
    """The token's value: a string literal unescaped, a parameter without ``$``."""
    pos: int


_NUMBER = re.compile(r"-?[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?")
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DIGITS = frozenset("0123456789")
_WORD_START = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_")
_WORD_CHARS = _WORD_START | _DIGITS
_SINGLE = {"(": "LPAREN", ")": "RPAREN", ",": "COMMA", "|": "PIPE", ".": "DOT"}


def _tokenize(text: str, what: Callable[[int, str, str], Exception]) -> list[Token]:
    tokens: list[Token] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch.isspace():
            i += 1
        elif ch == '"':
            start, i, chars = i, i + 1, []
            while True:
                if i >= n:
                    raise what(start, "unterminated string", 'close it with a double quote (")')
                c = text[i]
                if c == "\\":
                    if i + 1 >= n or text[i + 1] not in '"\\':
                        raise what(i, "unknown escape in a string", 'write \\" or \\\\ only')
                    chars.append(text[i + 1])
                    i += 2
                elif c == '"':
                    i += 1
                    break
                else:
                    chars.append(c)
                    i += 1
            tokens.append(Token("STRING", "".join(chars), start))
        elif ch == "'":
            raise what(i, "single-quoted string", 'quote values with double quotes: ("shoes")')
        elif ch == "$":
            m = _PARAM_NAME.match(text, i + 1)
            if not m or (m.end() < n and text[m.end()] in _WORD_CHARS):
                raise what(
                    i,
                    "bad parameter name",
                    "name parameters with 1-50 letters, digits or underscores, e.g. $CATEGORY",
                )
            tokens.append(Token("PARAM", m.group(), i))
            i = m.end()
        elif ch in _SINGLE:
            tokens.append(Token(_SINGLE[ch], ch, i))  # type: ignore[arg-type]
            i += 1
        elif ch in "<>=":
            op = text[i : i + 2] if text[i : i + 2] in ("<=", ">=") else ch
            if op == "=" and text[i : i + 2] == "==":
                raise what(i, "'==' is not an operator", "write a single '='")
            if text[i : i + 2] == "<>":
                raise what(i, "'<>' is not an operator", "use NOT IN (...) for inequality")
            tokens.append(Token("OP", op, i))
            i += len(op)
        elif ch == "!":
            raise what(i, "'!' is not an operator", "use NOT IN (...) for inequality")
        elif ch in _DIGITS or (ch == "-" and i + 1 < n and text[i + 1] in _DIGITS):
            m = _NUMBER.match(text, i)
            assert m is not None
            if m.end() < n and text[m.end()] in _WORD_CHARS:
                raise what(i, "malformed number", "write numbers like 20, 9.99 or -3")
            tokens.append(Token("NUMBER", m.group(), i))
            i = m.end()
        elif ch in _WORD_START:
            m = _WORD.match(text, i)
            assert m is not None
            tokens.append(Token("WORD", m.group(), i))
            i = m.end()
        else:
            raise what(i, f"unexpected character {ch!r}", "remove it; see the filter grammar")
    tokens.append(Token("EOF", "", n))
    return tokens


# --- the syntax tree ----------------------------------------------------------------------

Dataset = Literal["Items", "Interactions", "CurrentUser", "CurrentItem"]
Operator = Literal["IN", "NOT IN", "=", "<", "<=", ">", ">="]
_DATASETS: Final[dict[str, Dataset]] = {
    "items": "Items",
    "interactions": "Interactions",
    "currentuser": "CurrentUser",
    "currentitem": "CurrentItem",
}


@dataclass(frozen=True, slots=True)
class Value:
    """A literal: a string, or a number kept as written (so rendering round-trips)."""

    text: str
    number: bool = False


@dataclass(frozen=True, slots=True)
class Param:
    name: str


@dataclass(frozen=True, slots=True)
class Ref:
    """A field of the current user or item used as the right-hand side."""

    dataset: Literal["CurrentUser", "CurrentItem"]
    field: str


Operand: TypeAlias = tuple[Value, ...] | Param | Ref


@dataclass(frozen=True, slots=True)
class Condition:
    dataset: Dataset
    field: str
    """Upper case, as Personalize's schema field names."""
    op: Operator
    operand: Operand


@dataclass(frozen=True, slots=True)
class Expression:
    action: Literal["INCLUDE", "EXCLUDE"]
    where: tuple[tuple[Condition, ...], ...]
    """OR of ANDs: AND binds tighter than OR."""
    if_: tuple[Condition, ...] = ()

    @property
    def conditions(self) -> tuple[Condition, ...]:
        return tuple(c for conj in self.where for c in conj) + self.if_

    @property
    def params(self) -> frozenset[str]:
        return frozenset(c.operand.name for c in self.conditions if isinstance(c.operand, Param))


# --- the parser -------------------------------------------------------------------------

_ITEM_LIST_FIELDS = frozenset({"CATEGORY", "CATEGORIES", "GENRE", "GENRES"})
_ITEM_TEXT_FIELDS = frozenset({"ITEM_ID", "BRAND"})
_ITEM_NUMBER_FIELDS = frozenset({"PRICE", "CREATION_TIMESTAMP"})
_LEVEL = re.compile(r"CATEGORY_L([1-9])")
_ITEM_FIELDS_HELP = (
    "ITEM_ID, CATEGORY (CATEGORIES, GENRE, GENRES), CATEGORY_L1..CATEGORY_L9, BRAND, PRICE, "
    "CREATION_TIMESTAMP"
)
_KEYWORDS = frozenset({"INCLUDE", "EXCLUDE", "WHERE", "AND", "OR", "IF", "IN", "NOT", "ITEMID"})


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokenize(text, self.error)
        self.i = 0

    def error(self, pos: int, problem: str, fix: str) -> FilterSyntaxError:
        return FilterSyntaxError(self.text, pos, problem, fix)

    @property
    def tok(self) -> Token:
        return self.tokens[self.i]

    def advance(self) -> Token:
        tok = self.tokens[self.i]
        if tok.kind != "EOF":
            self.i += 1
        return tok

    def at(self, kind: TokenKind) -> bool:
        # A call, not an attribute test, so mypy does not narrow the kind across advance().
        return self.tok.kind == kind

    def is_word(self, *words: str) -> bool:
        return self.at("WORD") and self.tok.text.upper() in words

    def describe(self, tok: Token) -> str:
        return "the end of the expression" if tok.kind == "EOF" else repr(tok.text)

    def expect_word(self, word: str, fix: str, shown: str | None = None) -> Token:
        if not self.is_word(word):
            raise self.error(
                self.tok.pos, f"expected {shown or word}, found {self.describe(self.tok)}", fix
            )
        return self.advance()

    # filter := expression ("|" expression)*
    def parse(self) -> tuple[Expression, ...]:
        if not self.text.strip():
            raise self.error(
                0,
                "empty filter expression",
                'write e.g. EXCLUDE ItemID WHERE Items.CATEGORY IN ("x")',
            )
        expressions = [self.expression()]
        while self.at("PIPE"):
            self.advance()
            expressions.append(self.expression())
        if not self.at("EOF"):
            raise self.error(
                self.tok.pos,
                f"unexpected {self.describe(self.tok)} after a complete expression",
                "join expressions with '|', conditions with AND/OR, and put IF last",
            )
        return tuple(expressions)

    def expression(self) -> Expression:
        tok = self.tok
        if not self.is_word("INCLUDE", "EXCLUDE"):
            raise self.error(
                tok.pos,
                f"expected INCLUDE or EXCLUDE, found {self.describe(tok)}",
                "start each expression with INCLUDE ItemID WHERE or EXCLUDE ItemID WHERE",
            )
        action: Literal["INCLUDE", "EXCLUDE"] = (
            "INCLUDE" if tok.text.upper() == "INCLUDE" else "EXCLUDE"
        )
        self.advance()
        target = self.tok
        if self.is_word("ACTIONID", "USERID"):
            raise self.error(
                target.pos,
                f"{target.text} filters are not supported",
                "recstream filters items: write ItemID",
            )
        self.expect_word("ITEMID", f"write {action} ItemID WHERE ...", "ItemID")
        self.expect_word("WHERE", f"write {action} ItemID WHERE <dataset>.<field> ...")
        where_start = self.tok.pos
        disjuncts = [self.conjunction()]
        while self.is_word("OR"):
            self.advance()
            disjuncts.append(self.conjunction())
        where = tuple(disjuncts)
        first = where[0][0]
        if first.dataset not in ("Items", "Interactions"):
            raise self.error(
                where_start,
                f"the WHERE clause tests {first.dataset}",
                "test Items or Interactions after WHERE; put CurrentUser conditions after IF",
            )
        if_: tuple[Condition, ...] = ()
        if self.is_word("IF"):
            self.advance()
            conds = [self.condition(in_if=True)]
            while self.is_word("AND"):
                self.advance()
                conds.append(self.condition(in_if=True))
            if self.is_word("OR"):
                raise self.error(self.tok.pos, "OR after IF", "chain IF conditions with AND only")
            if self.is_word("IF"):
                raise self.error(
                    self.tok.pos, "a second IF", "an expression has one IF; chain with AND"
                )
            if_ = tuple(conds)
        return Expression(action, where, if_)

    def conjunction(self) -> tuple[Condition, ...]:
        conds = [self.condition(in_if=False)]
        while self.is_word("AND"):
            self.advance()
            conds.append(self.condition(in_if=False))
        if self.is_word("IF") or self.at("PIPE") or self.at("EOF") or self.is_word("OR"):
            return tuple(conds)
        if self.at("RPAREN"):
            raise self.error(
                self.tok.pos, "unbalanced ')'", "remove it; conditions are not grouped"
            )
        raise self.error(
            self.tok.pos,
            f"unexpected {self.describe(self.tok)} after a condition",
            "join conditions with AND or OR, expressions with '|', and put IF last",
        )

    def field_ref(self) -> tuple[Dataset, str, int]:
        tok = self.tok
        if tok.kind == "LPAREN":
            raise self.error(
                tok.pos, "parentheses around conditions", "remove them; AND binds tighter than OR"
            )
        if tok.kind != "WORD" or tok.text.lower() not in _DATASETS:
            raise self.error(
                tok.pos,
                f"expected a dataset field such as Items.CATEGORY, found {self.describe(tok)}",
                "write <dataset>.<FIELD> with dataset Items, Interactions or CurrentUser",
            )
        self.advance()
        if not self.at("DOT"):
            raise self.error(
                self.tok.pos, f"expected '.' after {tok.text}", f"write {tok.text}.<FIELD>"
            )
        self.advance()
        name = self.tok
        if name.kind != "WORD":
            raise self.error(
                name.pos,
                f"expected a field name after {tok.text}., found {self.describe(name)}",
                "field names are letters, digits and underscores, e.g. CATEGORY",
            )
        self.advance()
        return _DATASETS[tok.text.lower()], name.text.upper(), tok.pos

    def condition(self, *, in_if: bool) -> Condition:
        dataset, fld, pos = self.field_ref()
        if in_if and dataset != "CurrentUser":
            raise self.error(pos, f"IF tests {dataset}", "IF can only test CurrentUser fields")
        if not in_if and dataset == "CurrentUser":
            raise self.error(
                pos, "CurrentUser on the left of a WHERE condition",
                "test CurrentUser after IF at the end of the expression",
            )  # fmt: skip
        if dataset == "CurrentItem":
            raise self.error(
                pos,
                "CurrentItem on the left of a condition",
                "compare Items.<FIELD> with CurrentItem.<FIELD>: Items.PRICE < CurrentItem.PRICE",
            )
        op_tok = self.tok
        op: Operator
        if self.is_word("NOT"):
            self.advance()
            self.expect_word("IN", "write NOT IN (...)")
            op = "NOT IN"
        elif self.is_word("IN"):
            self.advance()
            op = "IN"
        elif self.at("OP"):
            op = self.advance().text  # type: ignore[assignment]
        else:
            raise self.error(
                op_tok.pos,
                f"expected an operator after {dataset}.{fld}, found {self.describe(op_tok)}",
                "use IN, NOT IN, =, <, <=, > or >=",
            )
        operand_pos = self.tok.pos
        operand = self.list_operand() if op in ("IN", "NOT IN") else self.scalar_operand()
        cond = Condition(dataset, fld, op, operand)
        self.check(cond, pos, op_tok.pos, operand_pos)
        return cond

    def ref_or_param(self) -> Param | Ref | None:
        tok = self.tok
        if tok.kind == "PARAM":
            self.advance()
            return Param(tok.text)
        if tok.kind == "WORD" and tok.text.lower() in ("currentitem", "currentuser"):
            dataset, fld, _ = self.field_ref()
            return Ref(dataset, fld)  # type: ignore[arg-type]
        return None

    def value(self) -> Value:
        tok = self.tok
        if tok.kind == "STRING":
            self.advance()
            return Value(tok.text)
        if tok.kind == "NUMBER":
            self.advance()
            return Value(tok.text, number=True)
        if tok.kind == "PARAM":
            raise self.error(
                tok.pos,
                "a parameter mixed with literal values",
                f"give the parameter alone: IN (${tok.text}), and pass every value in filterValues",
            )
        if tok.kind == "WORD" and tok.text.upper() not in _KEYWORDS:
            raise self.error(
                tok.pos, f"unquoted value {tok.text!r}", f'quote string values: "{tok.text}"'
            )
        raise self.error(
            tok.pos,
            f"expected a value, found {self.describe(tok)}",
            'write a double-quoted string or a number, e.g. ("shoes", "hats")',
        )

    def list_operand(self) -> Operand:
        ref = self.ref_or_param()
        if ref is not None:
            return ref
        if not self.at("LPAREN"):
            raise self.error(
                self.tok.pos,
                f"expected '(' after IN, found {self.describe(self.tok)}",
                'list values in parentheses: IN ("a", "b"), or IN ($PARAM)',
            )
        open_pos = self.advance().pos
        ref = self.ref_or_param()
        if ref is not None:
            if not self.at("RPAREN"):
                raise self.error(
                    self.tok.pos,
                    "a parameter must stand alone in its list",
                    f"write IN ({render_operand(ref)}) and pass every value in filterValues",
                )
            self.advance()
            return ref
        if self.at("RPAREN"):
            raise self.error(self.tok.pos, "empty value list", 'give at least one value: ("x")')
        values = [self.value()]
        while self.at("COMMA"):
            self.advance()
            values.append(self.value())
        if not self.at("RPAREN"):
            raise self.error(
                self.tok.pos if not self.at("EOF") else open_pos,
                "unclosed value list" if self.at("EOF") else
                f"expected ',' or ')' in the value list, found {self.describe(self.tok)}",
                "separate values with commas and close the list with ')'",
            )  # fmt: skip
        self.advance()
        return tuple(values)

    def scalar_operand(self) -> Operand:
        parens = self.at("LPAREN")
        if parens:
            self.advance()
        ref = self.ref_or_param()
        operand: Operand = ref if ref is not None else (self.value(),)
        if parens:
            if not self.at("RPAREN"):
                raise self.error(
                    self.tok.pos,
                    f"expected ')', found {self.describe(self.tok)}",
                    "a comparison takes one value: Items.PRICE < (20) or Items.PRICE < 20",
                )
            self.advance()
        return operand

    def check(self, cond: Condition, pos: int, op_pos: int, operand_pos: int) -> None:
        """Personalize's rules that the grammar alone does not express."""
        numeric_op = cond.op in ("<", "<=", ">", ">=")
        if cond.dataset == "Interactions":
            if cond.field != "EVENT_TYPE":
                raise self.error(
                    pos,
                    f"Interactions.{cond.field} cannot be filtered on",
                    "Interactions offers only EVENT_TYPE",
                )
            if cond.op not in ("IN", "NOT IN"):
                raise self.error(
                    op_pos,
                    f"Interactions.EVENT_TYPE with {cond.op}",
                    'use IN or NOT IN: Interactions.EVENT_TYPE IN ("purchase")',
                )
            if isinstance(cond.operand, Ref):
                raise self.error(
                    operand_pos,
                    "event types compared with a field",
                    'list event types: IN ("click", "purchase") or IN ($EVENT_TYPE)',
                )
        elif cond.dataset == "Items":
            f = cond.field
            if f == "TITLE" or f == "DESCRIPTION":
                raise self.error(
                    pos,
                    f"Items.{f} is unstructured text",
                    f"filter on categorical or numeric fields: {_ITEM_FIELDS_HELP}",
                )
            known = (
                f in _ITEM_LIST_FIELDS
                or f in _ITEM_TEXT_FIELDS
                or f in _ITEM_NUMBER_FIELDS
                or _LEVEL.fullmatch(f)
            )
            if not known:
                raise self.error(
                    pos, f"unknown item field {f!r}", f"use one of {_ITEM_FIELDS_HELP}"
                )
            if numeric_op and f not in _ITEM_NUMBER_FIELDS:
                raise self.error(
                    op_pos,
                    f"{cond.op} on the non-numeric field Items.{f}",
                    "compare PRICE or CREATION_TIMESTAMP with <, <=, >, >=; use IN for others",
                )
        if isinstance(cond.operand, tuple):
            for v in cond.operand:
                if v.text == "*" and not v.number and cond.dataset != "Interactions":
                    raise self.error(
                        operand_pos,
                        '"*" outside Interactions.EVENT_TYPE',
                        '"*" (any event type) works only with Interactions.EVENT_TYPE',
                    )
            if numeric_op and not cond.operand[0].number:
                raise self.error(
                    operand_pos,
                    f"{cond.op} compares numbers, found a string",
                    "write a number without quotes, e.g. Items.PRICE < 20",
                )
        if isinstance(cond.operand, Param) and cond.op == "NOT IN":
            raise self.error(
                operand_pos,
                "a parameter with NOT IN",
                "Personalize allows parameters only with IN: use IN and the opposite action "
                "(INCLUDE instead of EXCLUDE)",
            )


def parse_filter(expression: str) -> tuple[Expression, ...]:
    """Parse a filter expression, or raise `FilterSyntaxError` naming position and fix."""
    if len(expression) > MAX_EXPRESSION_LENGTH:
        raise FilterSyntaxError(
            expression[:60] + "…",
            MAX_EXPRESSION_LENGTH,
            f"expression is {len(expression)} characters long",
            f"keep it to {MAX_EXPRESSION_LENGTH} characters (Personalize's limit)",
        )
    parser = _Parser(expression)
    expressions = parser.parse()
    fields = {(c.dataset, c.field) for e in expressions for c in e.conditions}
    fields |= {
        (c.operand.dataset, c.operand.field)
        for e in expressions
        for c in e.conditions
        if isinstance(c.operand, Ref)
    }
    if len(fields) > MAX_FIELDS:
        raise parser.error(
            0,
            f"the filter uses {len(fields)} distinct dataset fields",
            f"use at most {MAX_FIELDS} (Personalize's limit); split it into several filters",
        )
    params = frozenset().union(*(e.params for e in expressions))
    if len(params) > MAX_PARAMETERS:
        raise parser.error(
            0,
            f"the filter has {len(params)} parameters",
            f"use at most {MAX_PARAMETERS} (filterValues holds at most {MAX_PARAMETERS} entries)",
        )
    for e in expressions:
        datasets = {c.dataset for conj in e.where for c in conj}
        if len(datasets) > 1:
            pos = expression.lower().find(
                next(
                    c for conj in e.where for c in conj if c.dataset != e.where[0][0].dataset
                ).dataset.lower()
                + "."
            )
            raise parser.error(
                max(pos, 0),
                "one expression tests both Items and Interactions",
                "conditions joined by AND/OR use one dataset; chain a second expression with '|'",
            )
    return expressions


# --- rendering (canonical text; parse(render(x)) == x) -----------------------------------


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_operand(operand: Operand) -> str:
    if isinstance(operand, Param):
        return f"${operand.name}"
    if isinstance(operand, Ref):
        return f"{operand.dataset}.{operand.field}"
    return ", ".join(v.text if v.number else _quote(v.text) for v in operand)


def _render_condition(c: Condition) -> str:
    rhs = render_operand(c.operand)
    if c.op in ("IN", "NOT IN"):
        rhs = rhs if isinstance(c.operand, Ref) else f"({rhs})"
    return f"{c.dataset}.{c.field} {c.op} {rhs}"


def render(expressions: Sequence[Expression]) -> str:
    """The canonical text of a parsed filter."""
    parts = []
    for e in expressions:
        where = " OR ".join(" AND ".join(map(_render_condition, conj)) for conj in e.where)
        text = f"{e.action} ItemID WHERE {where}"
        if e.if_:
            text += " IF " + " AND ".join(map(_render_condition, e.if_))
        parts.append(text)
    return " | ".join(parts)


# --- filter values ------------------------------------------------------------------------


def validate_filter_values(values: object) -> dict[str, str]:
    """Check a filterValues map against Personalize's limits; return it as a plain dict."""
    if values is None:
        return {}
    if not isinstance(values, Mapping):
        raise FilterValuesError(
            "filter_values must be a JSON object",
            'send {"CATEGORY": "\\"shoes\\",\\"hats\\""}',
        )
    if len(values) > MAX_PARAMETERS:
        raise FilterValuesError(
            f"filter_values has {len(values)} entries", f"send at most {MAX_PARAMETERS}"
        )
    out: dict[str, str] = {}
    for key, value in values.items():
        if not isinstance(key, str) or not _PARAM_NAME.fullmatch(key):
            raise FilterValuesError(
                f"filter_values key {key!r} is not a parameter name",
                "use the parameter's name without '$': 1-50 letters, digits or underscores",
            )
        if not isinstance(value, str):
            raise FilterValuesError(
                f"filter_values[{key!r}] must be a string",
                'send the values as one string: "\\"a\\",\\"b\\""',
            )
        if len(value) > MAX_VALUE_LENGTH:
            raise FilterValuesError(
                f"filter_values[{key!r}] is {len(value)} characters long",
                f"keep each to {MAX_VALUE_LENGTH} characters (Personalize's limit)",
            )
        out[key] = value
    return out


def parse_filter_values(name: str, text: str) -> tuple[Value, ...]:
    """Personalize's value string, ``"a","b"`` (numbers may go bare), as literal values."""

    def what(pos: int, problem: str, fix: str) -> FilterValuesError:
        return FilterValuesError(
            f"value of parameter {name!r} at character {pos + 1}: {problem}", fix
        )

    tokens = _tokenize(text, what)
    values: list[Value] = []
    expect_value = True
    for tok in tokens[:-1]:
        if expect_value:
            if tok.kind == "STRING":
                values.append(Value(tok.text))
            elif tok.kind == "NUMBER":
                values.append(Value(tok.text, number=True))
            else:
                raise what(
                    tok.pos,
                    f"expected a double-quoted value, found {tok.text!r}",
                    f'send {name} as "\\"value1\\",\\"value2\\""',
                )
        elif tok.kind != "COMMA":
            raise what(tok.pos, f"expected ',', found {tok.text!r}", "separate values with commas")
        expect_value = not expect_value
    if not values or expect_value:
        raise what(
            len(text), "no value" if not values else "a trailing comma",
            f'send at least one value: "\\"x\\""; omit {name} to skip an EXCLUDE expression',
        )  # fmt: skip
    return tuple(values)


# --- evaluation -------------------------------------------------------------------------

# A predicate over (item_id, item, event types of the user's interactions with the item).
_Pred: TypeAlias = Callable[[str, Item | None, frozenset[str]], bool]
_NO_EVENTS: Final[frozenset[str]] = frozenset()


def _item_values(fld: str) -> Callable[[str, Item | None], tuple[str | float, ...]]:
    """How to read Items.<fld> from a candidate: a tuple of its values (empty = missing)."""
    if fld == "ITEM_ID":
        return lambda item_id, item: (item_id,)
    if fld in _ITEM_LIST_FIELDS:
        return lambda item_id, item: tuple(item.categories) if item is not None else ()
    level = _LEVEL.fullmatch(fld)
    if level:
        n = int(level.group(1)) - 1
        return lambda item_id, item: (
            (item.categories[n],) if item is not None and len(item.categories) > n else ()
        )
    attr = fld.lower()

    def read(item_id: str, item: Item | None) -> tuple[str | float, ...]:
        value = getattr(item, attr, None) if item is not None else None
        return () if value is None else (value,)

    return read


def _as_number(value: str | float) -> float | None:
    if isinstance(value, float | int):
        return float(value)
    try:
        return float(value)
    except ValueError:
        return None


def _lookup(attrs: Mapping[str, str] | None, fld: str) -> str | None:
    if not attrs:
        return None
    lowered = fld.lower()
    for key, value in attrs.items():
        if key.lower() == lowered:
            return value
    return None


@dataclass(frozen=True, slots=True)
class _Context:
    values: Mapping[str, str]
    user: Mapping[str, str] | None
    current_item: Item | None


class _Skip(Exception):
    """An EXCLUDE expression lacks parameter values: Personalize skips it."""


def _resolve(
    operand: Operand, ctx: _Context, parsed: dict[str, tuple[Value, ...]]
) -> tuple[str | float, ...] | None:
    """The operand's values for this request; None when the value is absent."""
    if isinstance(operand, tuple):
        return tuple(float(v.text) if v.number else v.text for v in operand)
    if isinstance(operand, Param):
        if operand.name not in parsed:
            if operand.name not in ctx.values:
                raise _Skip(operand.name)
            parsed[operand.name] = parse_filter_values(operand.name, ctx.values[operand.name])
        return tuple(float(v.text) if v.number else v.text for v in parsed[operand.name])
    if operand.dataset == "CurrentUser":
        found = _lookup(ctx.user, operand.field)
        return None if found is None else (found,)
    if ctx.current_item is None:
        raise FilterValuesError(
            f"the filter uses CurrentItem.{operand.field} but the request names no current item",
            "apply it to related-items requests (item_id=...) only",
        )
    item = ctx.current_item
    got = _item_values(operand.field)(item.item_id, item)
    return got or None


def _compare(op: Operator, left: str | float, right: str | float) -> bool:
    if op == "=":
        if isinstance(left, str) and isinstance(right, str):
            return left == right
        a, b = _as_number(left), _as_number(right)
        return a is not None and b is not None and a == b
    a, b = _as_number(left), _as_number(right)
    if a is None or b is None:
        return False
    if op == "<":
        return a < b
    if op == "<=":
        return a <= b
    if op == ">":
        return a > b
    return a >= b


def _same(left: str | float, right: str | float) -> bool:
    """IN's equality: exact strings; numbers by value (PRICE IN (10) matches 10.0)."""
    if isinstance(left, str) and isinstance(right, str):
        return left == right
    a, b = _as_number(left), _as_number(right)
    return a is not None and a == b


def _bind_condition(
    cond: Condition, ctx: _Context, parsed: dict[str, tuple[Value, ...]]
) -> _Pred | bool:
    """A predicate for this request, or a constant when it does not depend on the item."""
    rhs = _resolve(cond.operand, ctx, parsed)
    if cond.dataset == "CurrentUser":
        left = _lookup(ctx.user, cond.field)
        if left is None or rhs is None:
            return False
        if cond.op == "IN":
            return any(_same(left, r) for r in rhs)
        if cond.op == "NOT IN":
            return all(not _same(left, r) for r in rhs)
        return any(_compare(cond.op, left, r) for r in rhs)
    if rhs is None:
        return False
    if cond.op in ("<", "<=", ">", ">=") and any(_as_number(r) is None for r in rhs):
        if isinstance(cond.operand, Param):  # the caller's mistake: say so
            name = cond.operand.name
            raise FilterValuesError(
                f"{cond.dataset}.{cond.field} {cond.op} ${name} needs a number; got {rhs!r}",
                f'pass a number, e.g. "{name}": "20"',
            )
        # A CurrentUser/CurrentItem field that is not a number compares with nothing.
        rhs = tuple(r for r in rhs if _as_number(r) is not None)
        if not rhs:
            return False
    if cond.dataset == "Interactions":
        wanted = frozenset(str(r).lower() for r in rhs)
        if "*" in wanted:
            return (
                (lambda _i, _it, events: bool(events))
                if cond.op == "IN"
                else (lambda _i, _it, events: False)
            )
        if cond.op == "IN":
            return lambda _i, _it, events: not wanted.isdisjoint(events)
        return lambda _i, _it, events: bool(events - wanted)
    read = _item_values(cond.field)
    if cond.op == "IN":
        strings = frozenset(r for r in rhs if isinstance(r, str))
        # Strings match exactly (Personalize); a number written bare also matches a text
        # field by value (ITEM_ID IN (42)), and a numeric field matches quoted numbers.
        numeric_field = cond.field in _ITEM_NUMBER_FIELDS
        numbers = frozenset(
            n
            for r in rhs
            if (not isinstance(r, str) or numeric_field) and (n := _as_number(r)) is not None
        )

        def inside(item_id: str, item: Item | None, _events: frozenset[str]) -> bool:
            for v in read(item_id, item):
                if isinstance(v, str) and v in strings:
                    return True
                if numbers and _as_number(v) in numbers:
                    return True
            return False

        return inside
    if cond.op == "NOT IN":

        def outside(item_id: str, item: Item | None, _events: frozenset[str]) -> bool:
            got = read(item_id, item)
            return bool(got) and not any(_same(v, r) for v in got for r in rhs)

        return outside
    op = cond.op
    return lambda item_id, item, _events: any(
        _compare(op, v, r) for v in read(item_id, item) for r in rhs
    )


def _all(preds: Sequence[_Pred]) -> _Pred:
    if len(preds) == 1:
        return preds[0]
    return lambda i, it, ev: all(p(i, it, ev) for p in preds)


@dataclass(frozen=True, slots=True)
class _BoundExpression:
    include: bool
    disjuncts: tuple[_Pred, ...]
    """Non-constant conjunctions; `always` says whether a conjunction is constantly true."""
    always: bool

    def matches(self, item_id: str, item: Item | None, events: frozenset[str]) -> bool:
        return self.always or any(p(item_id, item, events) for p in self.disjuncts)


@dataclass(frozen=True, slots=True)
class BoundFilter:
    """A filter with one request's values, user and window applied: cheap per candidate."""

    expressions: tuple[_BoundExpression, ...]
    events: Mapping[str, frozenset[str]]
    """Lower-cased event types of the user's interactions, per item."""

    def allows(self, item_id: str, item: Item | None) -> bool:
        events = self.events.get(item_id, _NO_EVENTS)
        return all(e.matches(item_id, item, events) == e.include for e in self.expressions)


def _bind_expression(expr: Expression, ctx: _Context) -> _BoundExpression | None:
    parsed: dict[str, tuple[Value, ...]] = {}
    try:
        for cond in expr.if_:
            if _bind_condition(cond, ctx, parsed) is not True:
                return None  # the IF does not hold: the expression does not apply
        disjuncts: list[_Pred] = []
        always = False
        for conj in expr.where:
            preds: list[_Pred] = []
            dead = False
            for cond in conj:
                bound = _bind_condition(cond, ctx, parsed)
                if bound is False:
                    dead = True
                elif bound is not True:
                    preds.append(bound)
            if dead:
                continue
            if not preds:
                always = True
            else:
                disjuncts.append(_all(preds))
        return _BoundExpression(expr.action == "INCLUDE", tuple(disjuncts), always)
    except _Skip as missing:
        if expr.action == "EXCLUDE":
            return None
        wanted = sorted(expr.params - set(ctx.values))
        raise FilterValuesError(
            f"the INCLUDE expression needs values for {', '.join('$' + p for p in wanted)}"
            f" (missing {missing.args[0]!r})",
            "pass them in filter_values, e.g. "
            + ", ".join(f'"{p}": "\\"value\\""' for p in wanted),
        ) from None


@dataclass(eq=False)
class CompiledFilter:
    """A parsed filter, reusable across requests and threads.

    `allows` follows the ranking pipeline's filter protocol; it binds the request's
    values, user and window once and reuses that while it is called with the same ones
    (the window is compared by identity and length, so treat it as immutable during a
    request). `bind` does the same explicitly.
    """

    expression: str
    expressions: tuple[Expression, ...]
    name: str | None = None
    _last: tuple[object, ...] | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def params(self) -> frozenset[str]:
        return frozenset().union(*(e.params for e in self.expressions))

    @property
    def uses_interactions(self) -> bool:
        return any(c.dataset == "Interactions" for e in self.expressions for c in e.conditions)

    def bind(
        self,
        values: Mapping[str, str],
        window: Sequence[WindowEntry] = (),
        *,
        user: Mapping[str, str] | None = None,
        current_item: Item | None = None,
    ) -> BoundFilter:
        """Apply one request's parameters, user attributes and window (raises
        `FilterValuesError` when an INCLUDE expression misses a parameter)."""
        ctx = _Context(values, user, current_item)
        bound = tuple(b for e in self.expressions if (b := _bind_expression(e, ctx)) is not None)
        events: dict[str, frozenset[str]] = {}
        if self.uses_interactions:
            grouped: dict[str, set[str]] = {}
            for entry in window:
                grouped.setdefault(entry.item_id, set()).add(entry.event_type.lower())
            events = {k: frozenset(v) for k, v in grouped.items()}
        return BoundFilter(bound, events)

    def allows(
        self,
        item_id: str,
        item: Item | None,
        window: Sequence[WindowEntry],
        values: Mapping[str, str],
        *,
        user: Mapping[str, str] | None = None,
        current_item: Item | None = None,
    ) -> bool:
        first = window[0] if len(window) else None
        last = self._last
        if (
            last is not None
            and last[0] is window
            and last[1] == len(window)
            and last[2] is first
            and last[3] == values
            and last[4] == user
            and last[5] is current_item
        ):
            bound = last[6]
            assert isinstance(bound, BoundFilter)
        else:
            bound = self.bind(values, window, user=user, current_item=current_item)
            with self._lock:
                # Held by reference, so the identity checks above cannot be fooled by a
                # recycled id.
                self._last = (window, len(window), first, dict(values), user and dict(user),
                              current_item, bound)  # fmt: skip
        return bound.allows(item_id, item)

    def canonical(self) -> str:
        return render(self.expressions)


def compile_filter(expression: str, name: str | None = None) -> CompiledFilter:
    """Parse and check an expression; raises `FilterSyntaxError` naming position and fix."""
    return CompiledFilter(expression, parse_filter(expression), name)
