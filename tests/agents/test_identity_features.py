"""Identity stitching of feature vectors, on real Redis and DynamoDB (moto), through the real
windows agent with every part on, against a straightforward recomputation: after the
login, the user's feature vector and live embedding are what they would be had every
event of the anonymous session been the user's own, in Redis and in the durable copy;
replaying the login (or the anonymous batch) changes nothing."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import redis.asyncio as aioredis

from agents.features import read_user_state
from agents.windows import WindowAgent, deliver
from recstream.features import DynamoFeatures, parse_score
from recstream.keys import Keys
from recstream.settings import Settings
from streams.schema import Event, Item
from tests.agents.streamdata import (
    factors_of,
    hash_of,
    publish_als,
    recompute,
    taobao,
    write_catalog,
)
from tests.agents.test_features import agent_of
from tests.conftest import LocalStack, make_settings

REL, ABS = 1e-9, 1e-12


@pytest.fixture
def roomy(local_stack: LocalStack) -> Settings:
    """Caps the data does not reach, so the recomputation needs no eviction."""
    return make_settings(local_stack, feature_cap=1000, window_size=200)


def timeline(
    shared_data: Path, ns: str
) -> tuple[list[Event], list[Event], Event, list[Event], list[Item]]:
    """One real Taobao user's events, in time order, told as: the user's own events (no
    session), then an anonymous visit (session ``s1``), the login, then the user's events
    in that session. Other users' events ride along in every batch."""
    events, catalog = taobao(shared_data, ns, 1500)
    counts: dict[str, int] = {}
    for event in events:
        counts[event.actor] = counts.get(event.actor, 0) + 1
    user = max(counts, key=lambda actor: (counts[actor], actor))
    mine = sorted((e for e in events if e.actor == user), key=lambda e: (e.timestamp, e.event_id))
    assert len(mine) >= 30
    third = len(mine) // 3
    own = [e.model_copy(update={"user_id": "alice"}) for e in mine[:third]]
    anonymous = [
        e.model_copy(update={"user_id": None, "session_id": "s1"}) for e in mine[third : 2 * third]
    ]
    login = Event(
        event_id="login-1",
        event_type="login",  # a custom type: no item
        user_id="alice",
        session_id="s1",
        timestamp=anonymous[-1].timestamp,
        namespace=ns,
    )
    after = [
        e.model_copy(update={"user_id": "alice", "session_id": "s1"}) for e in mine[2 * third :]
    ]
    others = [e for e in events if e.actor != user][:300]
    return own + others[:100], anonymous + others[100:200], login, after + others[200:], catalog


async def feed(agent: WindowAgent, events: Sequence[Event]) -> None:
    await deliver(agent, [e.to_json() for e in events], "stream", max_attempts=2, max_delay=0.01)


async def check_alice(
    redis: aioredis.Redis,
    settings: Settings,
    expected_events: Sequence[Event],
    catalog: Sequence[Item],
    factors: dict[str, bytes],
) -> dict[str, str]:
    """Alice's state against the recomputation over every event as hers; her hash."""
    ns, keys = settings.namespace, Keys(settings.namespace)
    as_hers = [e.model_copy(update={"user_id": "alice"}) for e in expected_events]
    expected = recompute(as_hers, {i.item_id: i for i in catalog}, settings, factors)
    f = expected.features["alice"]
    state = await read_user_state(redis, settings, ns, "alice", now=expected.clock)
    raw = await hash_of(redis, keys.features("alice"))
    assert state.events == f.n == len(expected_events)
    assert dict(state.counts) == dict(f.counts)
    assert (state.first_ts, state.last_ts) == (f.first, f.last)
    stored = {
        tuple(name.split(":", 2)[1:]): parse_score(value)
        for name, value in raw.items()
        if name.startswith("a:")
    }
    assert set(stored) == set(f.affinity)
    for key, (score, at) in f.affinity.items():
        assert stored[key][1] == at
        assert stored[key][0] == pytest.approx(score, rel=REL, abs=ABS), key
    # The session: every event since the anonymous visit began is in session s1.
    assert state.session is not None
    in_s1 = [e for e in expected_events if e.session_id == "s1"]
    assert (state.session.session_id, state.session.events) == ("s1", len(in_s1))
    assert state.session.started == min(e.timestamp for e in in_s1)
    assert f.emb is not None
    assert state.embedding is not None
    np.testing.assert_allclose(state.embedding, f.emb, rtol=1e-5, atol=1e-6)
    assert state.embedding_weight == pytest.approx(
        f.emb_w * 2 ** (-(expected.clock - f.emb_ts) / settings.embedding_half_life_s), rel=1e-9
    )
    # The window too, newest first.
    assert [e.event_id for e in state.window] == [e.event_id for e in expected.windows["alice"]]
    return raw


async def check_durable(agent: WindowAgent, settings: Settings, hot: dict[str, str]) -> None:
    """DynamoDB holds alice's merged vector, and nothing of the session any more."""
    stage = agent.stages[0]
    durable: DynamoFeatures = stage.durable  # type: ignore[attr-defined]
    found = await durable.get_many(
        [(settings.namespace, "alice"), (settings.namespace, "session:s1")]
    )
    assert found[(settings.namespace, "alice")].features == hot
    assert (settings.namespace, "session:s1") not in found


async def test_a_session_s_features_join_the_user_s_as_if_they_had_been_hers(
    roomy: Settings, shared_data: Path
) -> None:
    own, anonymous, login, after, catalog = timeline(shared_data, roomy.namespace)
    factors = factors_of([i.item_id for i in catalog])
    keys = Keys(roomy.namespace)
    async with agent_of(roomy) as (agent, redis):
        await write_catalog(redis, roomy.namespace, catalog)
        await publish_als(redis, roomy.namespace, "v1", factors)
        await feed(agent, own)
        await feed(agent, anonymous)
        assert await redis.exists(keys.features("session:s1"))
        await feed(agent, [login])
        await feed(agent, after)
        mine = [e for e in own + anonymous + [login] + after if e.actor in ("alice", "session:s1")]
        hot = await check_alice(redis, roomy, mine, catalog, factors)
        embedding = await redis.hgetall(keys.embedding("alice"))
        # moved, not copied
        assert not await redis.exists(keys.features("session:s1"), keys.embedding("session:s1"))
        await check_durable(agent, roomy, hot)

        # Replays: the login again (a crash before its checkpoint), then the anonymous
        # batch again (its events were applied to the session): nothing changes.
        await feed(agent, [login])
        await feed(agent, anonymous)
        assert await hash_of(redis, keys.features("alice")) == hot
        assert await redis.hgetall(keys.embedding("alice")) == embedding
        assert not await redis.exists(keys.features("session:s1"))
        await check_durable(agent, roomy, hot)


async def test_feature_vectors_redis_lost_before_the_login_are_merged_from_dynamodb(
    roomy: Settings, shared_data: Path
) -> None:
    own, anonymous, login, after, catalog = timeline(shared_data, roomy.namespace)
    factors = factors_of([i.item_id for i in catalog])
    keys = Keys(roomy.namespace)
    async with agent_of(roomy) as (agent, redis):
        await write_catalog(redis, roomy.namespace, catalog)
        await publish_als(redis, roomy.namespace, "v1", factors)
        await feed(agent, own)
        await feed(agent, anonymous)
        # Redis loses both feature vectors (eviction, a flush); the durable copies stay.
        await redis.delete(
            keys.features("alice"),
            keys.embedding("alice"),
            keys.features("session:s1"),
            keys.embedding("session:s1"),
        )
        await feed(agent, [login])
        await feed(agent, after)
        mine = [e for e in own + anonymous + [login] + after if e.actor in ("alice", "session:s1")]
        hot = await check_alice(redis, roomy, mine, catalog, factors)
        await check_durable(agent, roomy, hot)
        await feed(agent, [login])  # and a replayed login merges nothing twice
        assert await hash_of(redis, keys.features("alice")) == hot


async def test_a_session_event_racing_the_login_still_moves_its_features(
    roomy: Settings, shared_data: Path
) -> None:
    """Shard A resolves an anonymous event before shard B's login sets the alias, and
    applies it after B moved the session: A's re-check moves the new vector, once."""
    _own, anonymous, login, _after, catalog = timeline(shared_data, roomy.namespace)
    session = [e for e in anonymous if e.session_id == "s1"]
    late = session.pop()
    keys = Keys(roomy.namespace)
    async with agent_of(roomy) as (agent, redis):
        assert agent.identity is not None
        await write_catalog(redis, roomy.namespace, catalog)
        resolution = await agent.identity.resolve([late])
        assert resolution.events == [late]  # no alias yet
        await feed(agent, [*session, login])
        await agent.hot.apply(resolution.events)  # lands on the session, after the move
        assert await redis.exists(keys.features("session:s1"))
        await agent.identity.stitch([late], resolution)
        assert not await redis.exists(keys.features("session:s1"))
        mine = [*session, login, late]
        expected = recompute(
            [e.model_copy(update={"user_id": "alice"}) for e in mine],
            {i.item_id: i for i in catalog},
            roomy,
        )
        raw = await hash_of(redis, keys.features("alice"))
        assert int(raw["n"]) == expected.features["alice"].n == len(mine)
        for (attr, value), (score, _) in expected.features["alice"].affinity.items():
            got = parse_score(raw[f"a:{attr}:{value}"])[0]
            assert got == pytest.approx(score, rel=REL, abs=ABS)
        await agent.identity.stitch([late], resolution)  # again: nothing left to move
        assert await hash_of(redis, keys.features("alice")) == raw
