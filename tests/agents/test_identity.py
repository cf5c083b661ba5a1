"""Identity stitching on real Redis and DynamoDB (moto), through the real windows agent:
an anonymous session's history joins the user's at login, in whatever order the shards
deliver the events, once."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from agents.deadletter import SqsDeadLetters
from agents.identity import IdentityStitcher
from agents.state import RedisHotStore
from agents.windows import WindowAgent
from recstream.identity import resolve_actor
from recstream.keys import Keys
from recstream.settings import Settings
from recstream.stores import open_stores
from recstream.windows import DynamoWindows
from streams.schema import Event

T0 = time.time() - 3600


@pytest.fixture
async def agent(settings: Settings) -> AsyncIterator[WindowAgent]:
    async with open_stores(settings) as stores:
        hot, durable = (
            RedisHotStore(stores.redis, settings),
            DynamoWindows(stores.dynamodb, settings),
        )
        identity = IdentityStitcher(stores.redis, hot, durable, settings)
        yield WindowAgent(
            hot, durable, SqsDeadLetters(stores.sqs, settings, stores.s3), identity=identity
        )


def anon(settings: Settings, n: int, session: str = "s1", **fields: Any) -> bytes:
    values: dict[str, Any] = {
        "event_id": f"a{n}",
        "event_type": "click",
        "session_id": session,
        "item_id": f"anon{n}",
        "timestamp": T0 + n,
        "namespace": settings.namespace,
        **fields,
    }
    return Event(**values).to_json()


def login(settings: Settings, n: int, user: str = "alice", session: str = "s1") -> bytes:
    return Event(
        event_id=f"login{n}",
        event_type="login",  # a custom type: no item
        user_id=user,
        session_id=session,
        timestamp=T0 + 100 + n,
        namespace=settings.namespace,
    ).to_json()


def own(settings: Settings, n: int, user: str = "alice") -> bytes:
    return Event(
        event_id=f"u{n}",
        event_type="view",
        user_id=user,
        item_id=f"own{n}",
        timestamp=T0 + 50 + n,
        namespace=settings.namespace,
    ).to_json()


async def items(agent: WindowAgent, actor: str) -> list[str]:
    return [e.item_id for e in await agent.hot.window(agent_ns(agent), actor)]


async def durable_items(agent: WindowAgent, actor: str) -> list[str] | None:
    found = await agent.durable.get(agent_ns(agent), actor)
    return None if found is None else [e.item_id for e in found]


def agent_ns(agent: WindowAgent) -> str:
    assert agent.identity is not None
    return agent.identity.settings.namespace


async def test_anonymous_history_joins_the_user_at_login(
    agent: WindowAgent, settings: Settings
) -> None:
    await agent.process([own(settings, 1)])
    await agent.process([anon(settings, n) for n in range(3)])
    assert await items(agent, "session:s1") == ["anon2", "anon1", "anon0"]
    await agent.process([login(settings, 1)])
    expected = ["own1", "anon2", "anon1", "anon0"]  # newest first by event time
    assert await items(agent, "alice") == expected
    assert await durable_items(agent, "alice") == expected  # survives a Redis loss
    assert await items(agent, "session:s1") == []  # moved, not copied
    assert await durable_items(agent, "session:s1") == []  # emptied after alice's was written
    redis = agent.identity.redis if agent.identity else None
    assert redis is not None
    assert await redis.get(Keys(settings.namespace).alias("s1")) == b"alice"
    assert 0 < await redis.ttl(Keys(settings.namespace).alias("s1")) <= settings.window_ttl_s
    assert await resolve_actor(redis, settings.namespace, "s1") == "alice"
    assert await resolve_actor(redis, settings.namespace, "s9") == "session:s9"


async def test_anonymous_events_after_login_land_in_the_users_window(
    agent: WindowAgent, settings: Settings
) -> None:
    await agent.process([login(settings, 1)])
    # Another shard delivers the session's events late, some older than the login.
    stats = await agent.process([anon(settings, 5), anon(settings, 150)])
    assert stats.applied == 2
    assert await items(agent, "alice") == ["anon150", "anon5"]
    assert await items(agent, "session:s1") == []
    assert await durable_items(agent, "alice") == ["anon150", "anon5"]
    assert await durable_items(agent, "session:s1") is None


async def test_both_orders_give_the_same_window(settings: Settings) -> None:
    windows = []
    for order in ("anonymous first", "login first"):
        async with open_stores(settings) as stores:
            ns = f"{settings.namespace}-{order[0]}"
            s = settings.model_copy(update={"namespace": ns})
            hot, durable = RedisHotStore(stores.redis, s), DynamoWindows(stores.dynamodb, s)
            agent = WindowAgent(
                hot,
                durable,
                SqsDeadLetters(stores.sqs, s),
                identity=IdentityStitcher(stores.redis, hot, durable, s),
            )
            batches = [[anon(s, n) for n in range(4)], [login(s, 1), own(s, 1)]]
            for batch in batches if order == "anonymous first" else batches[::-1]:
                await agent.process(batch)
            windows.append(
                ([e.item_id for e in await hot.window(ns, "alice")], await hot.popular(ns, 10))
            )
    assert windows[0] == windows[1]
    assert windows[0][0] == ["own1", "anon3", "anon2", "anon1", "anon0"]


async def test_repeated_logins_and_replays_change_nothing(
    agent: WindowAgent, settings: Settings
) -> None:
    anonymous = [anon(settings, n) for n in range(3)]
    await agent.process(anonymous)
    await agent.process([login(settings, 1)])
    before = await items(agent, "alice")
    popular = await agent.hot.popular(settings.namespace, 10)
    stats = await agent.process([login(settings, 1), login(settings, 2), login(settings, 3)])
    assert stats.applied == 2  # the new login events themselves; nothing moved twice
    # The anonymous batch replayed after the login (a crash before its checkpoint): its
    # events are recognised as applied to the session, not applied to alice again.
    replay = await agent.process(anonymous)
    assert (replay.applied, replay.duplicates) == (0, 3)
    assert await items(agent, "alice") == before
    assert await agent.hot.popular(settings.namespace, 10) == popular
    assert await durable_items(agent, "alice") == before


async def test_a_session_event_racing_the_login_still_reaches_the_user(
    agent: WindowAgent, settings: Settings
) -> None:
    # Shard A resolves its anonymous event before shard B's login sets the alias, and
    # applies it after B moved the session: A's re-check after applying must move it.
    assert agent.identity is not None
    late = Event.from_json(anon(settings, 7))
    resolution = await agent.identity.resolve([late])
    assert resolution.events == [late]  # no alias yet
    await agent.process([anon(settings, 1), login(settings, 1)])
    await agent.hot.apply(resolution.events)
    changed = await agent.identity.stitch([late], resolution)
    assert changed == {(settings.namespace, "alice")}
    assert await items(agent, "alice") == ["anon7", "anon1"]
    assert await items(agent, "session:s1") == []


async def test_a_session_window_redis_lost_is_stitched_from_dynamodb(
    agent: WindowAgent, settings: Settings
) -> None:
    await agent.process([anon(settings, n) for n in range(2)])
    assert agent.identity is not None
    await agent.identity.redis.delete(Keys(settings.namespace).window("session:s1"))
    await agent.process([login(settings, 1)])
    assert await items(agent, "alice") == ["anon1", "anon0"]
    assert await durable_items(agent, "alice") == ["anon1", "anon0"]


async def test_a_user_window_redis_lost_is_not_overwritten_by_the_merge(
    agent: WindowAgent, settings: Settings
) -> None:
    await agent.process([own(settings, n) for n in range(2)])
    await agent.process([anon(settings, 1)])
    assert agent.identity is not None
    await agent.identity.redis.delete(Keys(settings.namespace).window("alice"))
    await agent.process([login(settings, 1)])  # no item: the login alone creates nothing
    expected = ["own1", "own0", "anon1"]
    assert await items(agent, "alice") == expected
    assert await durable_items(agent, "alice") == expected


async def test_merge_hooks_run_for_each_stitch(agent: WindowAgent, settings: Settings) -> None:
    calls: list[tuple[str, str, str]] = []

    async def hook(namespace: str, session: str, user: str) -> None:
        calls.append((namespace, session, user))

    assert agent.identity is not None
    agent.identity.merge_hooks.append(hook)
    await agent.process([anon(settings, 1)])
    await agent.process([login(settings, 1)])
    await agent.process([login(settings, 2)])  # nothing new to stitch
    await agent.process([login(settings, 3, user="bob")])  # the session logs in as bob
    assert calls == [
        (settings.namespace, "session:s1", "alice"),
        (settings.namespace, "session:s1", "bob"),
    ]
    # The shared device's earlier visitor stays alice's: bob gets only what follows.
    assert await items(agent, "alice") == ["anon1"]
    assert await items(agent, "bob") == []
    await agent.process([anon(settings, 200)])
    assert await items(agent, "bob") == ["anon200"]
