"""The OpenAPI document: every route of the app in it, valid OpenAPI 3.1, served."""

from __future__ import annotations

import httpx
import pytest
from openapi_spec_validator import validate

from recstream.settings import Settings
from serving.app import create_app
from serving.openapi import build_spec, route_paths
from serving.recommendations import RecommendationsQuery
from streams.schema import Event, Item
from tests.conftest import LocalStack, RunningApi
from tests.reliability.conftest import running, secure_settings


def document_operations(spec: dict[str, object]) -> set[tuple[str, str]]:
    paths = spec["paths"]
    assert isinstance(paths, dict)
    return {(path, method) for path, item in paths.items() for method in item}


def test_every_route_of_the_app_is_in_the_document_and_nothing_else() -> None:
    settings = Settings()
    registered = route_paths(create_app(settings).routes)
    documented = document_operations(build_spec(settings))
    assert registered - documented == set(), "routes missing from serving/openapi.py"
    assert documented - registered == set(), "documented operations no route serves"
    # Not vacuous: the app's families are all there.
    assert {("/v1/{namespace}/events", "post"), ("/v1/items/{item_id}", "get")} <= registered
    assert ("/personalize-runtime/recommendations", "post") in registered
    assert len(registered) >= 38


def test_a_route_added_without_documenting_it_is_caught() -> None:
    settings = Settings()
    app = create_app(settings)
    from starlette.responses import Response
    from starlette.routing import Route

    async def nothing(request: object) -> Response:
        return Response()

    app.router.routes.append(Route("/v1/{namespace}/undocumented", nothing, methods=["GET"]))
    missing = route_paths(app.routes) - document_operations(build_spec(settings))
    assert missing == {("/v1/{namespace}/undocumented", "get")}


def test_the_document_is_valid_openapi_3_1() -> None:
    spec = build_spec(Settings())
    assert spec["openapi"] == "3.1.0"
    validate(spec)  # raises, naming the problem, when it is not


def test_request_schemas_are_the_models_the_routes_validate_with() -> None:
    spec = build_spec(Settings())
    schemas = spec["components"]["schemas"]
    # (namespace is the route's: the document leaves the field out of request bodies)
    assert set(schemas["Event"]["properties"]) == set(Event.model_fields) - {"namespace"}
    assert schemas["Event"]["additionalProperties"] is False
    assert set(schemas["Item"]["properties"]) == set(Item.model_fields)
    query = {
        p["name"]
        for p in spec["paths"]["/v1/recommendations"]["get"]["parameters"]
        if p["in"] == "query"
    }
    # context and filter_values travel as context.K=v / filter_values.K=v (described)
    assert query == set(RecommendationsQuery.model_fields) - {"context", "filter_values"}
    body = spec["paths"]["/v1/recommendations"]["post"]["requestBody"]["content"]
    assert body["application/json"]["schema"] == {
        "$ref": "#/components/schemas/RecommendationsQuery"
    }
    # The rule a validator enforces in code is in the schema too: who the event is about.
    assert schemas["Event"]["anyOf"][0]["required"] == ["user_id"]
    runtime = spec["paths"]["/personalize-runtime/recommendations"]["post"]
    assert "botocore" in runtime["externalDocs"]["url"]


async def test_served_at_openapi_json_with_a_docs_page(api: RunningApi) -> None:
    async with httpx.AsyncClient(base_url=api.url, timeout=30) as client:
        served = await client.get("/openapi.json")
        page = await client.get("/docs")
    assert served.status_code == 200
    assert served.headers["content-type"] == "application/json"
    spec = served.json()
    validate(spec)
    assert document_operations(spec) == document_operations(build_spec(api.settings))
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert 'spec-url="/openapi.json"' in page.text


@pytest.mark.parametrize("path", ["/openapi.json", "/docs"])
async def test_the_contract_needs_no_key_when_keys_are_required(
    local_stack: LocalStack, path: str
) -> None:
    with running(secure_settings(local_stack)) as api:
        async with httpx.AsyncClient(base_url=api.url, timeout=30) as client:
            answer = await client.get(path)
            guarded = await client.get("/v1/recommendations?user_id=u")
    assert answer.status_code == 200
    assert guarded.status_code == 401  # the routes it describes still need one
