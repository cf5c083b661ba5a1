"""Catalog upsert and lookup: items and users, stored by `recstream.catalog`.

Routes (``{namespace}`` defaults to ``Settings.namespace`` on the short forms)::

    POST /v1/items             /v1/{namespace}/items            an item, a list, {"items": [...]}
    GET  /v1/items/{item_id}   /v1/{namespace}/items/{item_id}
    POST /v1/users             /v1/{namespace}/users            a user, a list, {"users": [...]}
    GET  /v1/users/{user_id}   /v1/{namespace}/users/{user_id}

An item is `streams.schema.Item` as JSON (``item_id``, ``categories`` as a list or a
``"A|B"`` string, ``brand``, ``price``, ``creation_timestamp``, ``title``); a user is
`streams.schema.User` (``user_id``, ``attributes``: string to string). A put replaces the
whole record. Outcomes, as the event collector's:

* ``200``: every valid record is stored (DynamoDB, then Redis). ``accepted`` lists their
  indexes and ids; ``rejected`` lists each invalid record with every bad field and its fix.
* ``422``: nothing valid (malformed JSON, wrong types, unknown fields...).
* ``413``: more than ``Settings.catalog_max_batch`` records, or a body over 5 MiB.
* ``503``: a store is unreachable; nothing is half-applied that a retry would not repair
  (puts are idempotent).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from recstream.catalog import CatalogStore, RedisDynamoCatalog
from recstream.errors import FieldProblem
from recstream.settings import Settings
from recstream.stores import Stores
from serving.collector import MAX_BODY_BYTES, read_capped
from serving.http import error_response, json_response, request_namespace
from streams.schema import Item, User, problems_from

__all__ = ["catalog_state", "parse_records", "records_of", "routes", "validate_record"]


@asynccontextmanager
async def catalog_state(
    app: Any, settings: Settings, stores: Stores
) -> AsyncIterator[CatalogStore]:
    """Put the catalog on ``app.state.catalog`` for the routes, the ranking pipeline and
    the Personalize API; its clients belong to `open_stores`, which closes them."""
    catalog = RedisDynamoCatalog(stores.redis, stores.dynamodb, settings)
    app.state.catalog = catalog
    try:
        yield catalog
    finally:
        await catalog.aclose()


def validate_record(
    model: type[BaseModel], value: Any, prefix: str = ""
) -> tuple[BaseModel | None, list[FieldProblem]]:
    """One catalog record, or every problem with it. Unknown fields are refused (the
    models would ignore them), so a typo such as ``"categroies"`` is not silently lost."""
    if not isinstance(value, dict):
        return None, [FieldProblem(prefix or "body", "is not a JSON object", "send an object")]
    problems = [
        FieldProblem(
            f"{prefix}.{name}" if prefix else name,
            f"unknown field {name!r}",
            f"remove it; the fields are {', '.join(model.model_fields)}",
        )
        for name in value
        if name not in model.model_fields
    ]
    if problems:
        return None, problems
    try:
        # strict: a JSON body's types are what they say (`"price": true` is not 1.0)
        return model.model_validate(value, strict=True), []
    except ValidationError as exc:
        return None, problems_from(exc, prefix)


def records_of(body: Any, plural: str) -> list[Any] | str:
    """The records of one record, a list, or ``{plural: [...]}``; or what is wrong with
    the body's shape."""
    if isinstance(body, dict) and set(body) == {plural}:
        body = body[plural]
        if not isinstance(body, list):
            return f'"{plural}" must be an array of objects'
    return body if isinstance(body, list) else [body]


def parse_records(
    records: list[Any], model: type[BaseModel]
) -> tuple[list[tuple[int, BaseModel]], list[dict[str, Any]]]:
    """(index, record) for each valid record; each invalid one with all its problems."""
    valid: list[tuple[int, BaseModel]] = []
    rejected: list[dict[str, Any]] = []
    for index, value in enumerate(records):
        record, problems = validate_record(model, value)
        if record is not None:
            valid.append((index, record))
        else:
            rejected.append({"index": index, "errors": [p.as_dict() for p in problems]})
    return valid, rejected


async def _post(request: Request, model: type[BaseModel], plural: str) -> Response:
    namespace = request_namespace(request)
    if isinstance(namespace, Response):
        return namespace
    settings: Settings = request.app.state.settings
    raw = await read_capped(request, MAX_BODY_BYTES)
    if raw is None:
        return error_response(
            413, "body_too_large", f"the body is over {MAX_BODY_BYTES} bytes; send less"
        )
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return error_response(
            422,
            "malformed_body",
            f"the body is not valid JSON ({exc}); send an object, an array, "
            f'or {{"{plural}": [...]}}',
        )
    records = records_of(body, plural)
    if isinstance(records, str):
        return error_response(422, "malformed_body", records)
    if not records:
        return error_response(422, "empty_batch", f"no {plural} in the body; send at least one")
    if len(records) > settings.catalog_max_batch:
        return error_response(
            413,
            "batch_too_large",
            f"{len(records)} {plural} in one request; split them into batches of at most "
            f"{settings.catalog_max_batch}",
        )
    valid, rejected = parse_records(records, model)
    if not valid:
        return json_response(
            {
                "error": {
                    "code": f"invalid_{plural}",
                    "message": f"all {len(records)} {plural} are invalid; fix the fields "
                    "listed under `rejected` and send them again",
                },
                "accepted": [],
                "rejected": rejected,
            },
            status_code=422,
        )
    catalog: CatalogStore = request.app.state.catalog
    accepted: list[dict[str, Any]] = []
    items = [(i, r) for i, r in valid if isinstance(r, Item)]
    users = [(i, r) for i, r in valid if isinstance(r, User)]
    if items:
        await catalog.put_items(namespace, [r for _, r in items])
        accepted = [{"index": i, "id": r.item_id} for i, r in items]
    if users:
        await catalog.put_users(namespace, [r for _, r in users])
        accepted = [{"index": i, "id": r.user_id} for i, r in users]
    return json_response({"accepted": accepted, "rejected": rejected})


async def post_items(request: Request) -> Response:
    return await _post(request, Item, "items")


async def post_users(request: Request) -> Response:
    return await _post(request, User, "users")


async def get_item(request: Request) -> Response:
    namespace = request_namespace(request)
    if isinstance(namespace, Response):
        return namespace
    item_id = request.path_params["item_id"]
    catalog: CatalogStore = request.app.state.catalog
    found = await catalog.items(namespace, [item_id])
    if item_id not in found:
        return error_response(
            404,
            "item_not_found",
            f"item {item_id!r} is not in the catalog of namespace {namespace!r}; "
            f"POST it to /v1/{namespace}/items",
        )
    return json_response(found[item_id].model_dump(mode="json"))


async def get_user(request: Request) -> Response:
    namespace = request_namespace(request)
    if isinstance(namespace, Response):
        return namespace
    user_id = request.path_params["user_id"]
    catalog: CatalogStore = request.app.state.catalog
    found = await catalog.users(namespace, [user_id])
    if user_id not in found:
        return error_response(
            404,
            "user_not_found",
            f"user {user_id!r} is not in the catalog of namespace {namespace!r}; "
            f"POST it to /v1/{namespace}/users",
        )
    return json_response(found[user_id].model_dump(mode="json"))


def routes() -> list[BaseRoute]:
    # Ids may hold "/" (the :path converter); the short forms come first, so
    # /v1/items/a/b is item "a/b" of the default namespace.
    return [
        Route("/v1/items", post_items, methods=["POST"]),
        Route("/v1/items/{item_id:path}", get_item, methods=["GET"]),
        Route("/v1/users", post_users, methods=["POST"]),
        Route("/v1/users/{user_id:path}", get_user, methods=["GET"]),
        Route("/v1/{namespace}/items", post_items, methods=["POST"]),
        Route("/v1/{namespace}/items/{item_id:path}", get_item, methods=["GET"]),
        Route("/v1/{namespace}/users", post_users, methods=["POST"]),
        Route("/v1/{namespace}/users/{user_id:path}", get_user, methods=["GET"]),
    ]
