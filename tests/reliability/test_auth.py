"""API keys against a real uvicorn server, DynamoDB on moto and real boto3 SigV4 signing."""

from __future__ import annotations

import logging
from typing import Any

import boto3
import httpx
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from recstream.apikeys import (
    SCOPES,
    ApiKeyStore,
    KeyCache,
    access_key_id,
    parse_key,
    sigv4_secret,
)
from recstream.apikeys_cli import SCOPE_CHOICES
from recstream.aws import async_client
from recstream.cli import main
from serving.app import create_app
from tests.conftest import LocalStack, make_settings, serve_in_thread
from tests.reliability.conftest import SecureApi, running, secure_settings
from tests.serving.test_collector import click

pytestmark = pytest.mark.timeout(180)


async def call(
    api: SecureApi, method: str, path: str, key: str | None = None, header: str = "bearer",
    **kw: Any,
) -> httpx.Response:  # fmt: skip
    headers: dict[str, str] = {}
    if key is not None:
        headers = {"Authorization": f"Bearer {key}"} if header == "bearer" else {"X-Api-Key": key}
    async with httpx.AsyncClient(base_url=api.url, timeout=30) as client:
        return await client.request(method, path, headers=headers, **kw)


def recs(ns: str | None = None) -> str:
    return f"/v1/{ns}/recommendations?user_id=u1" if ns else "/v1/recommendations?user_id=u1"


async def test_every_scope_gets_exactly_its_routes(secure_api: SecureApi) -> None:
    writer = await secure_api.key("events:write")
    reader = await secure_api.key("recommendations:read")
    admin = await secure_api.key("admin")

    missing = await call(secure_api, "POST", "/v1/events", json=click())
    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "unauthorized"
    assert "Bearer" in missing.json()["error"]["message"]
    wrong = await call(secure_api, "POST", "/v1/events", writer[:-4] + "AAAA", json=click())
    assert wrong.status_code == 401
    assert (await call(secure_api, "GET", recs(), "rs_not_a_key")).status_code == 401

    assert (await call(secure_api, "POST", "/v1/events", writer, json=click())).status_code == 202
    forbidden = await call(secure_api, "GET", recs(), writer)
    assert forbidden.status_code == 403
    assert "recommendations:read" in forbidden.json()["error"]["message"]
    assert (await call(secure_api, "GET", recs(), reader, header="x-api-key")).status_code == 200
    assert (await call(secure_api, "POST", "/v1/events", reader, json=click())).status_code == 403
    # admin implies every scope
    assert (await call(secure_api, "GET", recs(), admin)).status_code == 200
    assert (await call(secure_api, "POST", "/v1/events", admin, json=click())).status_code == 202
    # routes no rule names need admin (closed by default)
    assert (await call(secure_api, "GET", "/v1/catalog/items", reader)).status_code == 403
    assert (await call(secure_api, "GET", "/anything-new", reader)).status_code == 403
    # probes and metrics are open by default
    assert (await call(secure_api, "GET", "/healthz")).status_code == 200
    assert (await call(secure_api, "GET", "/metrics")).status_code == 200


async def test_a_key_is_limited_to_its_namespaces(secure_api: SecureApi) -> None:
    shop = await secure_api.key("recommendations:read", namespaces=("shop",))
    assert (await call(secure_api, "GET", recs("shop"), shop)).status_code == 200
    other = await call(secure_api, "GET", recs("app"), shop)
    assert other.status_code == 403
    assert "'app'" in other.json()["error"]["message"]
    # the short route serves the default namespace, which this key does not have
    assert (await call(secure_api, "GET", recs(), shop)).status_code == 403


async def test_ops_routes_need_admin_when_closed(local_stack: LocalStack) -> None:
    settings = secure_settings(local_stack, ops_routes_open=False)
    with running(settings) as api:
        admin = await api.key("admin")
        reader = await api.key("recommendations:read")
        assert (await call(api, "GET", "/metrics")).status_code == 401
        assert (await call(api, "GET", "/metrics", reader)).status_code == 403
        assert (await call(api, "GET", "/metrics", admin)).status_code == 200
        assert (await call(api, "GET", "/readyz", admin)).status_code == 200


def test_keys_cli_create_list_revoke(
    secure_api: SecureApi, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Sync: the CLI runs its own event loop, as it does from a shell.
    for name, value in secure_api.settings.to_env().items():
        monkeypatch.setenv(name, value)
    create = ["keys", "create", "--scope", "events:write", "--namespace", "*", "--name", "ci"]
    assert main(create) == 0
    out = capsys.readouterr().out
    plaintext = next(w for w in out.split() if parse_key(w))
    key_id = plaintext[3:15]
    assert f"aws_access_key_id=rs_{key_id}" in out
    auth = {"Authorization": f"Bearer {plaintext}"}
    with httpx.Client(base_url=secure_api.url, timeout=30) as client:
        assert client.post("/v1/events", json=click(), headers=auth).status_code == 202

        assert main(["keys", "list"]) == 0
        listing = capsys.readouterr().out
        assert key_id in listing
        assert plaintext.split("_", 2)[2] not in listing  # never the secret

        assert main(["keys", "revoke", key_id]) == 0
        capsys.readouterr()
        # The API's key cache is off in this fixture: revocation is immediate.
        assert client.post("/v1/events", json=click(), headers=auth).status_code == 401
    assert main(["keys", "revoke", "000000000000"]) == 1


async def test_only_a_salted_hash_is_stored(secure_api: SecureApi) -> None:
    one = await secure_api.key("admin")
    two = await secure_api.key("admin")
    async with async_client(secure_api.settings, "dynamodb") as client:
        items = (await client.scan(TableName=secure_api.settings.apikeys_table))["Items"]
    stored = repr(items).encode()
    for plaintext in (one, two):
        assert plaintext.split("_", 2)[2].encode() not in stored
    assert len({bytes(item["salt"]["B"]) for item in items}) == len(items)


def test_the_cli_offers_every_scope() -> None:
    assert SCOPE_CHOICES == SCOPES


def test_the_cache_is_bounded() -> None:
    cache = KeyCache(ttl=60, size=3)
    for n in range(10):
        cache.put(str(n), None)
    assert [cache.get(str(n))[0] for n in range(10)] == [False] * 7 + [True] * 3


async def test_the_cache_keeps_a_revoked_key_only_for_its_ttl(secure_api: SecureApi) -> None:
    """With a long TTL a revoked key is still served from the cache (the documented
    window); a fresh process (empty cache) refuses it at once."""
    settings = secure_api.settings.model_copy(update={"apikey_cache_ttl_s": 3600.0})
    async with async_client(settings, "dynamodb") as client:
        store = ApiKeyStore(client, settings)
        key, plaintext = await store.create(["admin"], ["*"])
        assert await store.verify(plaintext) == key
        other = ApiKeyStore(client, settings)
        assert await other.revoke(key.key_id)
        assert await store.verify(plaintext) == key  # still cached in this process
        assert await ApiKeyStore(client, settings).verify(plaintext) is None


def runtime_client(url: str, access_key: str, secret: str) -> Any:
    return boto3.client(
        "personalize-runtime",
        endpoint_url=f"{url}/personalize-runtime",
        region_name="us-east-1",
        aws_access_key_id=access_key,
        aws_secret_access_key=secret,
        config=Config(retries={"max_attempts": 1}),
    )


async def test_boto3_signs_with_sigv4_and_is_authorized(local_stack: LocalStack) -> None:
    settings = secure_settings(local_stack, apikey_cache_ttl_s=0.0)
    with running(settings, create_app(settings)) as api:
        reader = parse_key(await api.key("recommendations:read"))
        writer = parse_key(await api.key("events:write"))
        assert reader is not None
        assert writer is not None
        secret = sigv4_secret(settings, reader[0])
        assert secret is not None
        client = runtime_client(api.url, access_key_id(reader[0]), secret)
        arn = "arn:aws:personalize:us-east-1:000000000000:campaign/c"
        # The real GetRecommendations (serving/personalize.py) on an empty namespace.
        answer = client.get_recommendations(campaignArn=arn, userId="u7")
        assert answer["itemList"] == []
        assert answer["recommendationId"]

        bad = runtime_client(api.url, access_key_id(reader[0]), secret[:-2] + "xx")
        with pytest.raises(ClientError) as refused:
            bad.get_recommendations(campaignArn=arn, userId="u7")
        assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 401

        writer_secret = sigv4_secret(settings, writer[0])
        assert writer_secret is not None
        wrong_scope = runtime_client(api.url, access_key_id(writer[0]), writer_secret)
        with pytest.raises(ClientError) as forbidden:
            wrong_scope.get_recommendations(campaignArn=arn, userId="u7")
        assert forbidden.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403

        unknown = runtime_client(api.url, "AKIAIOSFODNN7EXAMPLE", "x" * 40)
        with pytest.raises(ClientError) as anonymous:
            unknown.get_recommendations(campaignArn=arn, userId="u7")
        assert anonymous.value.response["ResponseMetadata"]["HTTPStatusCode"] == 401


async def test_local_mode_is_open_and_says_so(
    local_stack: LocalStack, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(local_stack)
    assert not settings.api_keys_required
    caplog.set_level(logging.WARNING, logger="recstream.security")
    with serve_in_thread(create_app(settings), port := __import__("recstream").stack.free_port()):
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            response = await client.post("/v1/events", json=click())
    assert response.status_code == 202
    assert any("the API is OPEN" in r.getMessage() for r in caplog.records)


async def test_reading_catalog_items_needs_read_scope_and_writing_admin(
    secure_api: SecureApi,
) -> None:
    """A page that shows recommendations reads item details with the same key; writes,
    users and filters stay admin (serving/auth.py ROUTE_SCOPES)."""
    ns = secure_api.settings.namespace
    reader = await secure_api.key("recommendations:read")
    elsewhere = await secure_api.key("recommendations:read", namespaces=("other",))
    writer = await secure_api.key("events:write")
    admin = await secure_api.key("admin")
    item = {"item_id": "sku/1", "title": "Trail shoe"}
    assert (await call(secure_api, "POST", "/v1/items", reader, json=item)).status_code == 403
    assert (await call(secure_api, "POST", "/v1/items", admin, json=item)).status_code == 200

    for path in ("/v1/items/sku/1", f"/v1/{ns}/items/sku/1"):
        answer = await call(secure_api, "GET", path, reader)
        assert answer.status_code == 200, answer.text
        assert answer.json()["title"] == "Trail shoe"
        assert (await call(secure_api, "GET", path, writer)).status_code == 403
        assert (await call(secure_api, "GET", path, elsewhere)).status_code == 403
        assert (await call(secure_api, "GET", path)).status_code == 401
    assert (await call(secure_api, "GET", f"/v1/{ns}/users/u1", reader)).status_code == 403
    # /v1/items/filters is namespace "items"'s filter list (the router's reading): admin
    assert (await call(secure_api, "GET", "/v1/items/filters", reader)).status_code == 403
    assert (await call(secure_api, "GET", "/v1/items/filters", admin)).status_code == 200
