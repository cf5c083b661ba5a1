"""The filter routes on a real uvicorn server, stored in DynamoDB on moto server."""

from __future__ import annotations

import httpx
import pytest

from serving.filter_routes import filter_values_from, resolve_filter
from serving.filters import FilterNotFound, FilterValuesError
from tests.conftest import RunningApi

EXPR = 'EXCLUDE ItemID WHERE Interactions.EVENT_TYPE IN ("purchase")'


async def test_create_list_get_delete(api: RunningApi) -> None:
    ns = api.settings.namespace
    async with httpx.AsyncClient(base_url=api.url, timeout=30) as client:
        created = await client.post(
            f"/v1/{ns}/filters", json={"name": "no-purchases", "filter_expression": EXPR}
        )
        assert created.status_code == 201, created.text
        body = created.json()
        assert body["name"] == "no-purchases"
        assert body["filter_expression"] == EXPR
        assert body["status"] == "ACTIVE"
        # A retried create answers 200 with the same filter.
        again = await client.post(
            f"/v1/{ns}/filters", json={"name": "no-purchases", "filter_expression": EXPR}
        )
        assert again.status_code == 200
        assert again.json() == body
        # Personalize's spelling of the field is accepted too; short routes use the default.
        by_category = "INCLUDE ItemID WHERE Items.CATEGORY IN ($CATEGORY)"
        short = await client.post(
            "/v1/filters", json={"name": "by-category", "filterExpression": by_category}
        )
        assert short.status_code == 201, short.text
        listed = (await client.get("/v1/filters")).json()["filters"]
        assert [f["name"] for f in listed] == ["by-category", "no-purchases"]
        one = await client.get(f"/v1/{ns}/filters/no-purchases")
        assert one.json() == body
        assert (await client.delete(f"/v1/{ns}/filters/no-purchases")).status_code == 204
        gone = await client.get(f"/v1/{ns}/filters/no-purchases")
        assert gone.status_code == 404
        assert gone.json()["error"]["code"] == "filter_not_found"
        assert (await client.delete(f"/v1/{ns}/filters/no-purchases")).status_code == 404
        assert (await client.get("/v1/other-ns/filters")).json() == {"filters": []}


@pytest.mark.parametrize(
    ("body", "status", "code", "says"),
    [
        ({"name": "f", "filter_expression": "EXCLUDE ItemID WHERE Items.CATEGORY IN (shoes)"},
         400, "filter_syntax_error", '"shoes"'),
        ({"name": "f", "filter_expression": ""}, 400, "filter_syntax_error", "empty"),
        ({"name": "f"}, 400, "missing_filter_expression", "filter_expression"),
        ({"filter_expression": EXPR}, 400, "missing_name", "name"),
        ({"name": "no spaces", "filter_expression": EXPR}, 400, "bad_filter_name", "letters"),
        (["not", "an", "object"], 400, "bad_body", "filter_expression"),
    ],
)  # fmt: skip
async def test_bad_creates_get_400_naming_the_error(
    api: RunningApi, body: object, status: int, code: str, says: str
) -> None:
    async with httpx.AsyncClient(base_url=api.url, timeout=30) as client:
        response = await client.post("/v1/filters", json=body)
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert error["code"] == code
        assert says in error["message"]
        if code == "filter_syntax_error" and body != {"name": "f", "filter_expression": ""}:
            assert error["position"] == 40
            assert error["problem"] == "unquoted value 'shoes'"
            assert '"shoes"' in error["fix"]
        assert (await client.get("/v1/filters")).json() == {"filters": []}


async def test_bad_json_and_namespace(api: RunningApi) -> None:
    async with httpx.AsyncClient(base_url=api.url, timeout=30) as client:
        bad = await client.post("/v1/filters", content=b"{not json")
        assert bad.status_code == 400
        assert bad.json()["error"]["code"] == "bad_json"
        ns = await client.get("/v1/bad%20ns/filters")
        assert ns.status_code == 404
        assert ns.json()["error"]["code"] == "bad_namespace"


async def test_a_name_taken_by_another_expression_is_a_conflict(api: RunningApi) -> None:
    async with httpx.AsyncClient(base_url=api.url, timeout=30) as client:
        await client.post("/v1/filters", json={"name": "f", "filter_expression": EXPR})
        other = await client.post(
            "/v1/filters",
            json={"name": "f", "filter_expression": EXPR.replace("purchase", "click")},
        )
        assert other.status_code == 409
        assert other.json()["error"]["code"] == "filter_exists"


async def test_resolve_filter_reads_what_the_api_stored(api: RunningApi) -> None:
    """resolve_filter, as the recommendation route calls it, on the running app's registry."""
    from recstream.aws import async_client
    from serving.filter_store import DynamoFilterStore, FilterRegistry

    async with httpx.AsyncClient(base_url=api.url, timeout=30) as client:
        await client.post("/v1/filters", json={"name": "no-purchases", "filter_expression": EXPR})
    async with async_client(api.settings, "dynamodb") as dynamodb:
        registry = FilterRegistry(DynamoFilterStore(dynamodb, api.settings), api.settings)
        ns = api.settings.namespace
        assert await resolve_filter(registry, ns, None) is None
        arn = "arn:aws:personalize:us-east-1:000000000000:filter/no-purchases"
        compiled = await resolve_filter(registry, ns, arn)
        assert compiled is not None
        assert compiled.expression == EXPR
        with pytest.raises(FilterNotFound):
            await resolve_filter(registry, ns, "absent")


def test_filter_values_from_query_text_and_objects() -> None:
    assert filter_values_from('{"CATEGORY": "\\"shoes\\""}') == {"CATEGORY": '"shoes"'}
    assert filter_values_from({"A": '"x"'}) == {"A": '"x"'}
    assert filter_values_from(None) == {}
    with pytest.raises(FilterValuesError, match="not JSON"):
        filter_values_from("{oops")
