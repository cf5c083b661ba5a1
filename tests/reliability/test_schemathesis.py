"""schemathesis against the API's own OpenAPI document, on a real uvicorn server with
real Redis and the emulator (issue 10): no 500, no hang, no invalid input accepted, no
valid input refused, every answer as documented, and every rejection names the field.

Bounded: a fixed number of generated requests per operation, derandomized (the same
requests every run, so a failure reproduces), each request with a timeout.
"""

from __future__ import annotations

import traceback
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import jsonschema_rs
import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.core.result import Ok
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import negative_data_rejection, positive_data_acceptance

from recstream.settings import Settings
from serving.openapi import MAX_REQUEST_LINE
from tests.conftest import LocalStack, make_settings
from tests.reliability.conftest import running

EXAMPLES_PER_OPERATION = 12
REQUEST_TIMEOUT_S = 10.0
# Statuses that are not about the request's fields (a route or namespace not served, a
# method not allowed, a body too large, a conflict with stored state).
_NOT_ABOUT_A_FIELD = {401, 403, 404, 405, 409, 413, 429}
# Operations whose valid-by-the-document requests may still be refused, and why: a
# filter expression is a language no JSON Schema describes; Personalize's ARNs name
# kinds and namespaces a pattern cannot pin down (botocore's model does not either).
_GRAMMAR_NOT_IN_THE_SCHEMA = {
    "POST /v1/filters",
    "POST /v1/{namespace}/filters",
    "POST /personalize-runtime/recommendations",
    "POST /personalize-runtime/personalize-ranking",
    "POST /personalize-events/events",
    "POST /personalize-events/items",
    "POST /personalize-events/users",
}


_ONE_OF_TWO_PARAMETERS = {"GET /v1/recommendations", "GET /v1/{namespace}/recommendations"}


@pytest.fixture
def open_api(local_stack: LocalStack) -> Iterator[str]:
    # Rate limits would answer 429 to a fuzzer; they have their own tests.
    configured: Settings = make_settings(
        local_stack, rate_limit_enabled=False, stream_status_interval_s=0.0
    )
    with running(configured) as api:
        yield api.url


def _messages(body: Any) -> list[str]:
    """Every human sentence of an error body: ours, or Personalize's."""
    out: list[str] = []
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            out.append(error["message"])
        if isinstance(body.get("message"), str):
            out.append(body["message"])
        for rejected in body.get("rejected") or []:
            for problem in rejected.get("errors", []):
                out.append(f"{problem['field']}: {problem['problem']}; {problem['fix']}")
    return out


def _sent_names(case: Any) -> set[str]:
    """The parameter and field names a request carried (and the one schemathesis made
    invalid on purpose), any of which a rejection may name: the server reports the first
    problem it meets, which need not be the one that was planted."""
    names: set[str] = set()
    if isinstance(case.query, dict):
        names |= {str(k) for k in case.query}
    if isinstance(case.body, dict):
        names |= {str(k) for k in case.body}
    data = getattr(getattr(case.meta, "phase", None), "data", None)
    parameter = getattr(data, "parameter", None)
    if parameter:
        names.add(str(parameter).split("/")[-1])
    names |= {str(k) for k in (case.path_parameters or {})}
    return names


def refused_by_the_http_server(response: Any) -> bool:
    """uvicorn's parser refuses a request line over about 64 KiB before the app sees it
    (documented as a text/plain 400 on the GET operations): not the app's answer."""
    return (
        response.status_code == 400
        and response.headers.get("content-type", [""])[0].startswith("text/plain")
        and len(response.request.url) > MAX_REQUEST_LINE - 8192
    )


def accepted_unless_too_long(ctx: Any, response: Any, case: Any) -> bool | None:
    """schemathesis's positive_data_acceptance, except for a URL the HTTP server refuses
    for its length (a valid 500-id `exclude` can be that long: POST carries it)."""
    if refused_by_the_http_server(response):
        return None
    return positive_data_acceptance(ctx, response, case)


def rejection_names_the_field(ctx: Any, response: Any, case: Any) -> bool | None:
    """A 4xx about the request says, in words, what is wrong and where: a field or
    parameter the request sent (or left out), or the body as a whole when it is not the
    JSON value the operation takes."""
    if not 400 <= response.status_code < 500 or response.status_code in _NOT_ABOUT_A_FIELD:
        return None
    if refused_by_the_http_server(response):
        return None
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        raise AssertionError(f"a {response.status_code} without a JSON body") from None
    messages = _messages(body)
    assert messages, f"no message in {body}"
    assert all(m.strip() for m in messages), f"an empty message in {body}"
    raw = " ".join(messages)
    text = raw.replace("_", " ")  # "filter expression" names filter_expression
    names = _sent_names(case) | DOCUMENTED_NAMES.get(_label(case), set())
    # (names are quoted with repr() in messages: compare that spelling too)
    named = [n for n in names if n.replace("_", " ") in text or repr(n)[1:-1] in raw]
    whole_body = any(w in text for w in ("body", "JSON", "request"))
    assert named or whole_body, f"the answer names no field of the request: {text}"
    return None


def _label(case: Any) -> str:
    return f"{case.method.upper()} {case.operation.path}"


DOCUMENTED_NAMES: dict[str, set[str]] = {}
"""Per operation, every parameter and body field the document names: an answer may name
one the request left out (``pass user_id=…``)."""


def _documented_names(spec: dict[str, Any]) -> dict[str, set[str]]:
    def fields(node: Any) -> set[str]:
        out: set[str] = set()
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
                node = spec["components"]["schemas"][ref.rsplit("/", 1)[1]]
            out |= set(node.get("properties", {}))
            for key in ("anyOf", "oneOf", "allOf"):
                for option in node.get(key, []):
                    out |= fields(option)
            if "items" in node:
                out |= fields(node["items"])
            for value in node.get("properties", {}).values():
                out |= fields(value)
        return out

    names: dict[str, set[str]] = {}
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            found = {p["name"] for p in operation.get("parameters", [])}
            body = operation.get("requestBody", {}).get("content", {}).get("application/json")
            if body:
                found |= fields(body["schema"])
            names[f"{method.upper()} {path}"] = found
    return names


def _member_validator(spec: dict[str, Any], model: str) -> jsonschema_rs.Draft202012Validator:
    return jsonschema_rs.Draft202012Validator(
        {"$ref": f"#/components/schemas/{model}", "components": spec["components"]}
    )


def batch_members_judged_one_by_one(spec: dict[str, Any]) -> Any:
    """The collector and the catalog judge each event (record) of a batch on its own:
    the valid ones are accepted and the invalid ones listed under `rejected`, with a 2xx
    for the request. Check exactly that, against the document's own schema for one
    member: no invalid member accepted, no valid one rejected."""

    def check(ctx: Any, response: Any, case: Any) -> bool | None:
        label = _label(case)
        model = "Event" if label.endswith("/events") else label.rsplit("/", 1)[1][:-1].title()
        if response.status_code >= 300 or not response.content:
            return None
        members = case.body
        if (
            isinstance(members, dict)
            and len(members) == 1
            and isinstance(next(iter(members.values())), list)
        ):
            members = next(iter(members.values()))
        if not isinstance(members, list):
            members = [members]
        validator = _member_validator(spec, model)
        answer = orjson.loads(response.content)
        rejected = {r["index"] for r in answer["rejected"]}
        for index, member in enumerate(members):
            errors = [str(e) for e in validator.iter_errors(member)]
            if errors:
                assert index in rejected, f"member {index} accepted though {errors[0]}"
            else:
                assert index not in rejected, f"valid member {index} rejected: {answer}"
        return None

    return check


def actor_rule_only(ctx: Any, response: Any, case: Any) -> bool | None:
    """GET recommendations needs user_id or session_id, which OpenAPI parameters cannot
    express: a document-valid request may be refused for that reason alone."""
    if case.meta.generation.mode.is_negative:
        return None
    query = case.query if isinstance(case.query, dict) else {}
    if response.status_code == 422 and not ({"user_id", "session_id"} & set(query)):
        assert orjson.loads(response.content)["error"]["code"] == "missing_user_id"
        return None
    return accepted_unless_too_long(ctx, response, case)


@dataclass
class Outcome:
    """What the run saw: requests sent per operation, and the failures (all of them, not
    only the first, so one run shows every violation)."""

    sent: Counter[str] = field(default_factory=Counter)
    failures: dict[str, str] = field(default_factory=dict)


def _exercise(operation: Any, mode: GenerationMode, outcome: Outcome, spec: Any) -> None:
    label = f"{operation.method.upper()} {operation.path}"
    excluded: list[Any] = [positive_data_acceptance]
    extra: list[Any] = [rejection_names_the_field]
    if label in _ONE_OF_TWO_PARAMETERS:
        extra.append(actor_rule_only)
    elif label not in _GRAMMAR_NOT_IN_THE_SCHEMA:
        extra.append(accepted_unless_too_long)
    if label.endswith(("/events", "/items", "/users")) and label.startswith("POST /v1"):
        # a 2xx is right for a batch with invalid members: they are listed as rejected
        excluded.append(negative_data_rejection)
        extra.append(batch_members_judged_one_by_one(spec))

    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        derandomize=True,
        database=None,
        # No shrinking: a failure is reported as generated (derandomized, it reproduces),
        # which keeps the run's length bounded.
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        outcome.sent[label] += 1
        case.call_and_validate(
            timeout=REQUEST_TIMEOUT_S,
            additional_checks=extra,
            excluded_checks=excluded,
        )

    try:
        run()
    except Unsatisfiable:
        # Nothing in the operation can be made invalid (no parameters, or only a path
        # segment any string fills): there is no negative request to send.
        assert mode is GenerationMode.NEGATIVE, f"{label}: no valid request can be generated"
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # every operation's failures, reported together
        report = "".join(traceback.format_exception(exc))
        outcome.failures[f"{label} ({mode.value})"] = report[-4000:]


def test_the_api_keeps_its_openapi_contract(open_api: str) -> None:
    schema = schemathesis.openapi.from_url(f"{open_api}/openapi.json")
    schema.config.update(base_url=open_api)
    # 413 (a batch or body over its limit) is a rejection too.
    rejection = schema.config.checks.negative_data_rejection
    rejection.expected_statuses = [*rejection.expected_statuses, "413"]
    DOCUMENTED_NAMES.update(_documented_names(schema.raw_schema))
    outcome = Outcome()
    results = list(schema.get_all_operations())
    assert all(isinstance(r, Ok) for r in results), [r for r in results if not isinstance(r, Ok)]
    operations = [r.ok() for r in results if isinstance(r, Ok)]
    documented = {
        f"{method.upper()} {path}"
        for path, item in schema.raw_schema["paths"].items()
        for method in item
    } - {"GET /openapi.json"}  # (schemathesis leaves out the document it was loaded from)
    assert {f"{o.method.upper()} {o.path}" for o in operations} == documented
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            _exercise(operation, mode, outcome, schema.raw_schema)
    print(f"schemathesis: {sum(outcome.sent.values())} requests over {len(operations)} operations")
    assert not outcome.failures, "\n\n".join(f"{k}: {v}" for k, v in outcome.failures.items())
    # Not vacuous: every operation was called.
    assert set(outcome.sent) == documented
