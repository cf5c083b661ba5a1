"""The Personalize-compatible API with unchanged boto3 clients against a real uvicorn server,
real Redis and moto (Kinesis, DynamoDB)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from typing import Any

import boto3
import httpx
import pytest
import redis.asyncio as aioredis
from botocore.config import Config
from botocore.exceptions import ClientError

from agents.state import RedisHotStore
from recstream import stack
from recstream.aws import sync_client
from recstream.settings import Settings
from serving.app import create_app
from serving.personalize import rank_by_recommendations
from serving.pipeline.result import Recommendation, Recommendations
from streams.schema import Event
from tests.conftest import LocalStack, RunningApi, make_settings, serve_in_thread
from tests.serving.helpers import fitted, publish, two_clusters
from tests.serving.test_collector import read_stream

REGION = "us-east-1"
ACCOUNT = "000000000000"


@pytest.fixture
def settings(local_stack: LocalStack) -> Settings:
    # Generous store deadlines: these tests compare answers, so a store read that a busy
    # machine delays must not turn into a degraded (different) answer.
    return make_settings(
        local_stack, store_timeout_ms=5000, ranking_budget_ms=10000, source_timeout_ms=5000
    )


@pytest.fixture(scope="module")
def shared_api(local_stack: LocalStack) -> Iterator[RunningApi]:
    """One server for the tests whose requests all fail: nothing they send may land, so
    they can share resources (and the suite saves a server start per case)."""
    settings = make_settings(local_stack)
    port = stack.free_port()
    with serve_in_thread(create_app(settings), port):
        yield RunningApi(url=f"http://127.0.0.1:{port}", settings=settings)


def arn(resource: str) -> str:
    return f"arn:aws:personalize:{REGION}:{ACCOUNT}:{resource}"


def runtime(api: RunningApi) -> Any:
    return boto3.client(
        "personalize-runtime",
        endpoint_url=f"{api.url}/personalize-runtime",
        region_name=REGION,
        aws_access_key_id="x",
        aws_secret_access_key="x",
    )


def events_client(api: RunningApi, **config: Any) -> Any:
    return boto3.client(
        "personalize-events",
        endpoint_url=f"{api.url}/personalize-events",
        region_name=REGION,
        aws_access_key_id="x",
        aws_secret_access_key="x",
        config=Config(**config),
    )


async def seed(settings: Settings, events: Sequence[Event]) -> None:
    """Apply events the way the agents do (the same Redis store and script)."""
    client = aioredis.from_url(settings.redis_url)
    try:
        await RedisHotStore(client, settings).apply(events)
    finally:
        await client.aclose()


def view(n: int, user: str, item: str, ns: str, kind: str = "view") -> Event:
    return Event(event_id=f"{user}-{n}", event_type=kind, user_id=user, item_id=item, namespace=ns)


async def crowd_and_alice(settings: Settings) -> None:
    ns = settings.namespace
    crowd = [view(n, f"crowd{n}", f"pop{n % 4}", ns) for n in range(40)]
    await seed(settings, [*crowd, view(1, "alice", "niche", ns, kind="click")])


def native(api: RunningApi, user: str, n: int) -> list[str]:
    response = httpx.get(
        f"{api.url}/v1/{api.settings.namespace}/recommendations",
        params={"user_id": user, "num_results": str(n)},
    )
    return [i["item_id"] for i in response.json()["items"]]


def native_related(api: RunningApi, item: str, n: int) -> list[str]:
    response = httpx.get(
        f"{api.url}/v1/{api.settings.namespace}/related-items",
        params={"item_id": item, "num_results": str(n)},
    )
    return [i["item_id"] for i in response.json()["items"]]


# --- GetRecommendations ------------------------------------------------------------------


async def test_get_recommendations_answers_as_the_native_api(api: RunningApi) -> None:
    await crowd_and_alice(api.settings)
    ns = api.settings.namespace
    client = runtime(api)
    for name, value in (
        ("campaignArn", arn(f"campaign/{ns}")),
        ("recommenderArn", arn(f"recommender/{ns}/personalized")),
    ):
        response = client.get_recommendations(**{name: value}, userId="alice", numResults=3)
        ids = [i["itemId"] for i in response["itemList"]]
        assert ids == native(api, "alice", 3)
        assert ids[0] == "niche"
        assert "recently_interacted" in response["itemList"][0]["reason"]
        assert "x-recstream-degraded" not in response["ResponseMetadata"]["HTTPHeaders"]
        assert all(isinstance(i["score"], float) for i in response["itemList"])
        assert 1 <= len(response["recommendationId"]) <= 40  # fits PutEvents' recommendationId


async def test_get_recommendations_by_item_id_alone_answers_related_items(
    api: RunningApi,
) -> None:
    """A RELATED_ITEMS request (itemId, no userId) from an unchanged boto3 client gets
    the native related-items answer: the item's neighbours, never the item itself."""
    log = two_clusters()
    await publish(api.settings, fitted(log).values(), log)
    ns = api.settings.namespace
    client = runtime(api)
    response = client.get_recommendations(
        campaignArn=arn(f"campaign/{ns}"), itemId="b2", numResults=3
    )
    ids = [i["itemId"] for i in response["itemList"]]
    assert ids == native_related(api, "b2", 3)
    assert len(ids) == 3
    assert "b2" not in ids
    # b2's neighbours are the other b items (users v* browse b1..b4), not the a cluster
    assert set(ids) <= {"b1", "b3", "b4"}
    assert all(i["reason"] for i in response["itemList"])
    assert response["recommendationId"]
    # A userId given with it does not turn it into user recommendations.
    with_user = client.get_recommendations(
        campaignArn=arn(f"campaign/{ns}"), itemId="b2", userId="u1", numResults=3
    )
    assert [i["itemId"] for i in with_user["itemList"]] == ids


async def test_num_results_defaults_to_25(api: RunningApi) -> None:
    ns = api.settings.namespace
    await seed(api.settings, [view(n, f"u{n}", f"item{n}", ns) for n in range(40)])
    client = runtime(api)
    campaign = arn(f"campaign/{ns}")
    assert len(client.get_recommendations(campaignArn=campaign, userId="x")["itemList"]) == 25
    assert (
        client.get_recommendations(campaignArn=campaign, userId="x", numResults=0)["itemList"] == []
    )


async def test_metadata_columns_come_from_the_catalog(api: RunningApi) -> None:
    await crowd_and_alice(api.settings)
    ns = api.settings.namespace
    events_client(api).put_items(
        datasetArn=arn(f"dataset/{ns}/ITEMS"),
        items=[
            {
                "itemId": "niche",
                "properties": json.dumps({"title": "Heat", "genres": "Crime|Drama"}),
            },
            {"itemId": "pop0", "properties": json.dumps({"TITLE": "Up", "PRICE": 3.5})},
        ],
    )
    response = runtime(api).get_recommendations(
        campaignArn=arn(f"campaign/{ns}"),
        userId="alice",
        numResults=2,
        metadataColumns={"ITEMS": ["TITLE", "GENRES", "PRICE"]},
    )
    by_id = {i["itemId"]: i["metadata"] for i in response["itemList"]}
    assert by_id == {
        "niche": {"TITLE": "Heat", "GENRES": "Crime|Drama"},
        "pop0": {"TITLE": "Up", "PRICE": "3.5"},
    }


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"campaignArn": arn("campaign/{ns}/no-such-strategy")}, "ResourceNotFound", "strategy"),
        ({"campaignArn": arn("campaign/bad ns!")}, "ResourceNotFound", "namespace"),
        ({"campaignArn": "arn:aws:s3:::bucket"}, "InvalidInput", "campaignArn"),
        ({"campaignArn": arn("filter/{ns}")}, "InvalidInput", "campaign"),
        ({"recommenderArn": arn("campaign/{ns}")}, "InvalidInput", "recommender"),
        ({}, "InvalidInput", "exactly one"),
        ({"campaignArn": arn("campaign/{ns}"), "numResults": 501}, "InvalidInput", "500"),
        ({"campaignArn": arn("campaign/{ns}"), "userId": None}, "InvalidInput", "itemId"),
        (
            {"campaignArn": arn("campaign/{ns}"), "userId": None, "itemId": " "},
            "InvalidInput",
            "itemId",
        ),
        (
            {"campaignArn": arn("campaign/{ns}"), "filterArn": arn("filter/f")},
            "ResourceNotFound",
            "does not exist",
        ),
        (
            {"campaignArn": arn("campaign/{ns}"), "filterValues": {"A": '"x"'}},
            "InvalidInput",
            "filterArn",
        ),
        (
            {"campaignArn": arn("campaign/{ns}"), "promotions": [{"name": "p"}]},
            "InvalidInput",
            "promotions",
        ),
        (
            {
                "campaignArn": arn("campaign/{ns}"),
                "metadataColumns": {"ITEMS": ["TITLE"]},
                "numResults": 51,
            },
            "InvalidInput",
            "50",
        ),
        (
            {"campaignArn": arn("campaign/{ns}"), "metadataColumns": {"ITEMS": ["COLOUR"]}},
            "InvalidInput",
            "COLOUR",
        ),
        (
            {"campaignArn": arn("campaign/{ns}"), "context": {"bad key": "x"}},
            "InvalidInput",
            "context",
        ),
    ],
)
def test_get_recommendations_errors_are_the_modelled_exceptions(
    shared_api: RunningApi, kwargs: dict[str, Any], error: str, words: str
) -> None:
    client = runtime(shared_api)
    request = {"userId": "alice", **kwargs}
    request = {
        k: v.replace("{ns}", shared_api.settings.namespace) if isinstance(v, str) else v
        for k, v in request.items()
        if v is not None
    }
    exception = getattr(client.exceptions, f"{error}Exception")
    with pytest.raises(exception) as raised:
        client.get_recommendations(**request)
    assert words in raised.value.response["Error"]["Message"]


def test_errors_use_the_rest_json_error_format(shared_api: RunningApi) -> None:
    response = httpx.post(
        f"{shared_api.url}/personalize-runtime/recommendations",
        json={"campaignArn": arn(f"campaign/{shared_api.settings.namespace}"), "numResults": -1},
    )
    assert response.status_code == 400
    assert response.headers["x-amzn-ErrorType"] == "InvalidInputException"
    body = response.json()
    assert body["__type"] == "InvalidInputException"
    assert "numResults" in body["message"]
    unknown = httpx.post(
        f"{shared_api.url}/personalize-runtime/recommendations", json={"campaign": "x"}
    )
    assert unknown.status_code == 400
    assert "campaign" in unknown.json()["message"]


# --- GetPersonalizedRanking -----------------------------------------------------------------


async def test_personalized_ranking_ranks_each_given_item_once(api: RunningApi) -> None:
    await crowd_and_alice(api.settings)
    ns = api.settings.namespace
    order = native(api, "alice", 500)
    given = ["unknown1", "pop2", "niche", "unknown2", "pop2", "pop0"]
    response = runtime(api).get_personalized_ranking(
        campaignArn=arn(f"campaign/{ns}"), userId="alice", inputList=given
    )
    ranked = [i["itemId"] for i in response["personalizedRanking"]]
    # The ranker's rerank scores what it knows as its recommendations do (pop0 and pop2
    # are tied: either order), and appends what it has no data for with score 0.
    known = sorted(["pop2", "niche", "pop0"], key=order.index)
    assert ranked[0] == known[0]
    assert set(ranked[1:3]) == set(known[1:3])
    assert ranked[3:] == ["unknown1", "unknown2"]
    assert [i["score"] for i in response["personalizedRanking"]][-2:] == [0.0, 0.0]
    assert response["recommendationId"]


def test_personalized_ranking_errors(shared_api: RunningApi) -> None:
    client = runtime(shared_api)
    ns = shared_api.settings.namespace
    with pytest.raises(client.exceptions.InvalidInputException, match="inputList"):
        client.get_personalized_ranking(
            campaignArn=arn(f"campaign/{ns}"), userId="u", inputList=[f"i{n}" for n in range(501)]
        )
    with pytest.raises(client.exceptions.InvalidInputException, match="inputList"):
        client.get_personalized_ranking(campaignArn=arn(f"campaign/{ns}"), userId="u", inputList=[])
    with pytest.raises(client.exceptions.ResourceNotFoundException):
        client.get_personalized_ranking(
            campaignArn=arn(f"campaign/{ns}/nope"), userId="u", inputList=["a"]
        )
    with pytest.raises(client.exceptions.ResourceNotFoundException, match="does not exist"):
        client.get_personalized_ranking(
            campaignArn=arn(f"campaign/{ns}"),
            userId="u",
            inputList=["a"],
            filterArn=arn("filter/f"),
        )


def test_rank_by_recommendations_keeps_each_given_item_once() -> None:
    result = Recommendations(
        "r",
        "ns",
        "u",
        [
            Recommendation("b", 0.9, ("popular",)),
            Recommendation("z", 0.8, ()),
            Recommendation("a", 0.5, ()),
            Recommendation("b", 0.1, ()),  # a ranker listing an item twice
        ],
    )
    ranked = rank_by_recommendations(["c", "a", "b", "d"], result)
    assert [(i, s) for i, s, _ in ranked] == [("b", 0.9), ("a", 0.5), ("c", 0.0), ("d", 0.0)]


# --- a ranker with the pipeline's keyword arguments and rerank ------------------------------


class PipelineLikeRanker:
    """The real ranker, recording what this API passes it; filters reach it resolved (the
    real compiled filter from the filter store) and are applied by the real pipeline."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: list[dict[str, Any]] = []

    async def recommend(
        self,
        namespace: str,
        actor: str,
        num_results: int,
        exclude: frozenset[str] = frozenset(),
        *,
        context: dict[str, str] | None = None,
        item_filter: Any = None,
        filter_values: dict[str, str] | None = None,
    ) -> Recommendations:
        self.calls.append(
            {
                "op": "recommend",
                "context": context,
                "filter": getattr(item_filter, "expression", None),
                "values": filter_values,
            }
        )
        result: Recommendations = await self.inner.recommend(
            namespace,
            actor,
            num_results,
            exclude,
            context=context,
            item_filter=item_filter,
            filter_values=filter_values,
        )
        return result

    async def rerank(
        self,
        namespace: str,
        actor: str,
        item_ids: list[str],
        *,
        context: dict[str, str] | None = None,
        item_filter: Any = None,
        filter_values: dict[str, str] | None = None,
    ) -> Recommendations:
        self.calls.append(
            {
                "op": "rerank",
                "items": item_ids,
                "filter": getattr(item_filter, "expression", None),
            }
        )
        result: Recommendations = await self.inner.rerank(
            namespace,
            actor,
            item_ids,
            context=context,
            item_filter=item_filter,
            filter_values=filter_values,
        )
        return result


NO_POP = 'EXCLUDE ItemID WHERE Items.ITEM_ID IN ("pop0", "pop1", "pop2", "pop3")'


@pytest.fixture
def pipeline_api(settings: Settings) -> Iterator[tuple[RunningApi, PipelineLikeRanker]]:
    app = create_app(settings)
    port = stack.free_port()
    with serve_in_thread(app, port):
        ranker = PipelineLikeRanker(app.state.ranker)
        app.state.ranker = ranker
        created = httpx.post(
            f"http://127.0.0.1:{port}/v1/{settings.namespace}/filters",
            json={"name": "no-pop", "filter_expression": NO_POP},
        )
        assert created.status_code == 201, created.text
        yield RunningApi(url=f"http://127.0.0.1:{port}", settings=settings), ranker


async def test_filters_and_context_are_passed_to_the_ranker(
    pipeline_api: tuple[RunningApi, PipelineLikeRanker],
) -> None:
    api, ranker = pipeline_api
    await crowd_and_alice(api.settings)
    ns = api.settings.namespace
    response = runtime(api).get_recommendations(
        campaignArn=arn(f"campaign/{ns}"),
        userId="alice",
        numResults=5,
        context={"DEVICE": "mobile"},
        filterArn=arn("filter/no-pop"),
        filterValues={"CATEGORY": '"shoes"'},
    )
    assert [i["itemId"] for i in response["itemList"]] == ["niche"]
    assert ranker.calls == [
        {
            "op": "recommend",
            "context": {"DEVICE": "mobile"},
            "filter": NO_POP,
            "values": {"CATEGORY": '"shoes"'},
        }
    ]


async def test_personalized_ranking_uses_rerank_when_the_ranker_has_it(
    pipeline_api: tuple[RunningApi, PipelineLikeRanker],
) -> None:
    api, ranker = pipeline_api
    ns = api.settings.namespace
    client = runtime(api)
    response = client.get_personalized_ranking(
        campaignArn=arn(f"campaign/{ns}"), userId="alice", inputList=["a", "b", "a", "c"]
    )
    # Each given item exactly once (the real ranker knows none of them: any order).
    assert sorted(i["itemId"] for i in response["personalizedRanking"]) == ["a", "b", "c"]
    assert ranker.calls[-1] == {"op": "rerank", "items": ["a", "b", "c"], "filter": None}
    filtered = client.get_personalized_ranking(
        campaignArn=arn(f"campaign/{ns}"),
        userId="alice",
        inputList=["pop1", "a", "pop2", "b"],
        filterArn=arn("filter/no-pop"),
    )
    assert sorted(i["itemId"] for i in filtered["personalizedRanking"]) == ["a", "b"]
    assert ranker.calls[-1]["filter"] == NO_POP


# --- PutEvents -------------------------------------------------------------------------------


def test_put_events_reach_the_stream_as_our_events(api: RunningApi) -> None:
    ns = api.settings.namespace
    sent = time.time() - 60
    events_client(api).put_events(
        trackingId=ns,
        userId="alice",
        sessionId="s-1",
        eventList=[
            {
                "eventId": "e-1",
                "eventType": "click",
                "itemId": "i1",
                "sentAt": sent,
                "properties": json.dumps({"numberOfRatings": "12", "device": "ios"}),
                "recommendationId": "rid-1",
                "impression": ["i1", "i2", "i3"],
            },
            {"eventType": "Add-To-Cart", "itemId": "i2", "sentAt": sent, "eventValue": 19.5},
            {
                "eventType": "search",
                "sentAt": sent,
                "metricAttribution": {"eventAttributionSource": "email"},
            },
        ],
    )
    on_stream = read_stream(api.settings)
    assert {key for key, _ in on_stream} == {"alice"}
    by_type = {event.event_type: event for _, event in on_stream}
    assert set(by_type) == {"click", "add_to_cart", "search"}
    click = by_type["click"]
    assert click.event_id == "e-1"
    assert (click.user_id, click.session_id, click.namespace) == ("alice", "s-1", ns)
    assert click.timestamp == pytest.approx(sent, abs=1e-3)
    assert click.properties == {"numberOfRatings": "12", "device": "ios"}
    assert click.recommendation_id == "rid-1"
    assert click.impression == ["i1", "i2", "i3"]
    assert by_type["add_to_cart"].event_value == 19.5
    assert by_type["search"].item_id is None
    assert by_type["search"].context == {"attribution_source": "email"}


def test_put_events_without_ids_is_safe_to_retry(api: RunningApi) -> None:
    ns = api.settings.namespace
    request: dict[str, Any] = {
        "trackingId": ns,
        "sessionId": "anon-1",
        "eventList": [
            {"eventType": "view", "itemId": "i1", "sentAt": 1_700_000_000.25},
            {"eventType": "view", "itemId": "i2", "sentAt": 1_700_000_000.5},
        ],
    }
    client = events_client(api)
    client.put_events(**request)
    client.put_events(**request)  # a retry after a timeout: same content, same ids
    on_stream = read_stream(api.settings)
    assert len(on_stream) == 4
    assert {key for key, _ in on_stream} == {"session:anon-1"}
    ids = [event.event_id for _, event in on_stream]
    assert len(set(ids)) == 2


@pytest.mark.parametrize(
    ("events", "words"),
    [
        ([{"eventType": "click", "itemId": "i1"}] * 11, "at most 10"),
        ([{"eventType": "click", "itemId": "i1", "sentAt": 100}], "sentAt"),
        ([{"eventType": "click", "sentAt": 1_700_000_000}], "itemId"),
        ([{"eventType": "click", "itemId": "i1", "properties": "{not json"}], "properties"),
        ([{"eventType": "click", "itemId": "i1", "properties": '{"userId": "x"}'}], "userId"),
        ([{"eventType": "click", "itemId": "i1", "properties": '{"a": {"b": 1}}'}], "'a'"),
        ([{"eventType": "click", "itemId": "i1", "impression": ["x"] * 26}], "impression"),
        ([{"eventType": "über", "itemId": "i1"}], "eventType"),
    ],
)
def test_put_events_refuses_what_personalize_refuses(
    shared_api: RunningApi, events: list[dict[str, Any]], words: str
) -> None:
    client = events_client(shared_api)
    batch = [{"sentAt": time.time(), **e} for e in events]
    with pytest.raises(client.exceptions.InvalidInputException) as raised:
        client.put_events(trackingId=shared_api.settings.namespace, sessionId="s", eventList=batch)
    assert words in raised.value.response["Error"]["Message"]
    assert read_stream(shared_api.settings) == []  # all or nothing, as Personalize


# --- PutItems / PutUsers ---------------------------------------------------------------------


def test_put_items_and_users_reach_the_catalog(api: RunningApi) -> None:
    ns = api.settings.namespace
    client = events_client(api)
    client.put_items(
        datasetArn=arn(f"dataset/{ns}/ITEMS"),
        items=[
            {
                "itemId": "m1",
                "properties": json.dumps(
                    {"title": "Heat", "genres": "Crime|Drama", "price": 4, "creationTimestamp": 1}
                ),
            },
            {
                "itemId": "m2",
                "properties": json.dumps({"categoryL2": "Shoes", "categoryL1": "Men"}),
            },
            {"itemId": "m3"},
        ],
    )
    client.put_users(
        datasetArn=arn(f"dataset/{ns}/USERS"),
        users=[{"userId": "u1", "properties": json.dumps({"membershipLevel": "gold", "age": 30})}],
    )
    m1 = httpx.get(f"{api.url}/v1/{ns}/items/m1").json()
    assert m1 == {
        "item_id": "m1",
        "categories": ["Crime", "Drama"],
        "brand": None,
        "price": 4.0,
        "creation_timestamp": 1.0,
        "title": "Heat",
    }
    assert httpx.get(f"{api.url}/v1/{ns}/items/m2").json()["categories"] == ["Men", "Shoes"]
    assert httpx.get(f"{api.url}/v1/{ns}/items/m3").status_code == 200
    user = httpx.get(f"{api.url}/v1/{ns}/users/u1").json()
    assert user["attributes"] == {"membership_level": "gold", "age": "30"}


@pytest.mark.parametrize(
    ("operation", "kwargs", "error", "words"),
    [
        ("put_items", {"datasetArn": "dataset/{ns}/USERS"}, "InvalidInput", "ITEMS"),
        ("put_items", {"datasetArn": "dataset/{ns}"}, "InvalidInput", "datasetArn"),
        ("put_items", {"datasetArn": "dataset/bad ns!/ITEMS"}, "ResourceNotFound", "namespace"),
        (
            "put_items",
            {"items": [{"itemId": "x", "properties": '{"colour": "red"}'}]},
            "InvalidInput",
            "colour",
        ),
        (
            "put_items",
            {"items": [{"itemId": "x", "properties": '{"price": -1}'}]},
            "InvalidInput",
            "price",
        ),
        ("put_items", {"items": [{"itemId": f"x{n}"} for n in range(11)]}, "InvalidInput", "items"),
        ("put_users", {"datasetArn": "dataset/{ns}/ITEMS"}, "InvalidInput", "USERS"),
        ("put_users", {"users": [{"userId": "u", "properties": "[1]"}]}, "InvalidInput", "object"),
    ],
)
def test_put_items_and_users_errors(
    shared_api: RunningApi, operation: str, kwargs: dict[str, Any], error: str, words: str
) -> None:
    ns = shared_api.settings.namespace
    client = events_client(shared_api)
    if operation == "put_items":
        request: dict[str, Any] = {"datasetArn": f"dataset/{ns}/ITEMS", "items": [{"itemId": "x"}]}
    else:
        request = {"datasetArn": f"dataset/{ns}/USERS", "users": [{"userId": "u"}]}
    request.update(kwargs)
    request["datasetArn"] = arn(request["datasetArn"].replace("{ns}", ns))
    with pytest.raises(getattr(client.exceptions, f"{error}Exception")) as raised:
        getattr(client, operation)(**request)
    assert words in raised.value.response["Error"]["Message"]
    assert httpx.get(f"{shared_api.url}/v1/{ns}/items/x").status_code == 404


# --- a deployment that lists its namespaces -----------------------------------------------------


@pytest.fixture
def listed_api(local_stack: LocalStack) -> Iterator[RunningApi]:
    base = make_settings(local_stack, store_timeout_ms=5000, ranking_budget_ms=10000)
    settings = base.model_copy(update={"namespaces": [base.namespace]})
    port = stack.free_port()
    with serve_in_thread(create_app(settings), port):
        yield RunningApi(url=f"http://127.0.0.1:{port}", settings=settings)


def test_names_outside_the_served_namespaces(listed_api: RunningApi) -> None:
    ns = listed_api.settings.namespace
    rt, ev = runtime(listed_api), events_client(listed_api)
    rt.get_recommendations(campaignArn=arn(f"campaign/{ns}"), userId="u")
    with pytest.raises(rt.exceptions.ResourceNotFoundException, match="other"):
        rt.get_recommendations(campaignArn=arn("campaign/other"), userId="u")
    with pytest.raises(ev.exceptions.ResourceNotFoundException, match="other"):
        ev.put_users(datasetArn=arn("dataset/other/USERS"), users=[{"userId": "u"}])
    # PutEvents models only InvalidInputException.
    with pytest.raises(ev.exceptions.InvalidInputException, match="trackingId"):
        ev.put_events(
            trackingId="other",
            sessionId="s",
            eventList=[{"eventType": "view", "itemId": "i", "sentAt": time.time()}],
        )
    with pytest.raises(ClientError):
        ev.put_events(trackingId=ns, sessionId="s", eventList=[{"eventType": "view", "sentAt": 0}])


def test_a_broken_deployment_is_an_internal_failure_not_a_missing_resource(
    api: RunningApi,
) -> None:
    # ResourceNotFoundException would tell the client its ARN is wrong; a missing table
    # is the operator's to fix.
    sync_client(api.settings, "dynamodb").delete_table(TableName=api.settings.catalog_table)
    client = events_client(api, retries={"total_max_attempts": 1})  # botocore retries 500s
    with pytest.raises(ClientError) as raised:
        client.put_items(
            datasetArn=arn(f"dataset/{api.settings.namespace}/ITEMS"), items=[{"itemId": "x"}]
        )
    error = raised.value.response["Error"]
    assert error["Code"] == "InternalFailure"
    assert api.settings.catalog_table in error["Message"]
