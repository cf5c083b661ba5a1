"""Identity stitching: an anonymous visitor's history follows them when they log in.

An anonymous visitor's events carry only a ``session_id`` and land in the window of the
actor ``session:{session_id}``. An event that carries both ``session_id`` and ``user_id``
(a login, or any event of a logged-in visitor) stitches the two, as Personalize does:

* the alias ``rs:{ns}:alias:{session_id}`` -> user id is set (TTL ``window_ttl_s``; the
  latest login of a session wins), and in the same Lua call the session's hot window is
  *moved* into the user's window (union by event id, newest first, capped), so later
  logins of the same session find nothing left to move and cost one small call;
* when the alias was new, the session's durable window (DynamoDB) is merged in as well,
  so a session window Redis lost still reaches the user; the user's merged window is
  then written to DynamoDB, and only then the session's durable copy emptied, so the
  merge survives a Redis loss and a later login of the session does not repeat it.

Later anonymous events of that session are *resolved* before the windows agent applies
them (`IdentityStitcher.resolve`): they carry the user id from then on, so they land in
the user's window (and whatever else is keyed by the actor). Events of the session may
sit on another shard and be processed in any order relative to the login, so after every
batch the sessions that received events are checked for an alias again and moved if one
appeared meanwhile (`IdentityStitcher.stitch`). The alias is written before the session
window is read, both atomically, so either the login's move or the session's check sees
every event.
Serving reads the alias too, to answer a session's requests from its user's state:
`recstream.identity.resolve_actor` (in recstream/ with ``session_actor``, since serving
does not import the agents).

Exactly once: moving and merging are unions by event id, so repeating them is harmless.
An event first applied to the session and replayed after the login (a crash in between)
is recognised by the session's applied-id set and not applied to the user a second time.

Feature vectors (``rs:{ns}:feat:*``, ``emb:*``) follow the window: for every login of a
batch, and every session found logged in since, the stitcher hands the pair to its
``features`` collaborator (`agents.features.SessionFeatures`), which moves the session's
vector into the user's in Redis and DynamoDB, idempotently. Each of ``merge_hooks`` is
also called with (namespace, session actor, user id) whenever a session is stitched.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from agents.state import HotStore, persist_windows, recover_lost_windows
from recstream.errors import StoreUnavailable
from recstream.identity import session_actor
from recstream.keys import Keys
from recstream.settings import Settings
from recstream.windows import WINDOW_UNION_LUA, Actor, DurableWindows
from streams.schema import Event

__all__ = [
    "IdentityStitcher",
    "Login",
    "MergeHook",
    "Resolution",
    "SessionMerger",
]

log = logging.getLogger(__name__)

MergeHook = Callable[[str, str, str], Awaitable[None]]
"""``hook(namespace, session_actor, user_id)``: merge the session's state into the user's.
Must be idempotent: it runs again after a replay or a repeated login."""


@dataclass(frozen=True, slots=True)
class Login:
    """A session known to belong to a user (a login event, or an alias found later)."""

    namespace: str
    session_id: str
    user_id: str
    new_alias: bool
    """The alias was set by this batch and named no user, or another one, before."""

    @property
    def session_actor(self) -> str:
        return session_actor(self.session_id)


class SessionMerger(Protocol):
    """What else follows a session into its user at login (feature vectors)."""

    async def stitch(self, logins: Sequence[Login]) -> set[Actor]:
        """Merge each login's session into its user, idempotently; return the users
        whose state changed."""
        ...


# KEYS: 1 alias, 2 session window, 3 user window.
# ARGV: 1 user id ('' = only move, the alias is already there), 2 alias ttl,
#       3 window size, 4 window ttl.
# Returns {1 if the alias already named this user else 0, entries moved,
#          1 if the user's window existed else 0}.
_STITCH = (
    WINDOW_UNION_LUA
    + """
local same = 0
if ARGV[1] ~= '' then
  if redis.call('GET', KEYS[1]) == ARGV[1] then same = 1 end
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
end
local existed = redis.call('EXISTS', KEYS[3])
local moving = redis.call('LRANGE', KEYS[2], 0, -1)
if #moving == 0 then return {same, 0, existed} end
for _, raw in ipairs(redis.call('LRANGE', KEYS[3], 0, -1)) do add(raw) end
for _, raw in ipairs(moving) do add(raw) end
newest_first()
redis.call('DEL', KEYS[3])
local size = math.min(#all, tonumber(ARGV[3]))
for i = 1, size do redis.call('RPUSH', KEYS[3], all[i].raw) end
redis.call('EXPIRE', KEYS[3], ARGV[4])
redis.call('DEL', KEYS[2])
return {same, #moving, existed}
"""
)


@dataclass
class Resolution:
    """A batch with the anonymous events of logged-in sessions given their user."""

    events: list[Event]
    """What to apply: anonymous events whose session has an alias carry its user id."""
    skipped: int = 0
    """Already applied to the session before its login was known (a replay)."""
    on_session: set[tuple[str, str]] = field(default_factory=set)
    """(namespace, session id) of the sessions events were applied to as anonymous."""
    origin: list[int] = field(default_factory=list)
    """For each of ``events``, its position in the batch given to `resolve`."""


class IdentityStitcher:
    """The identity stage of the windows agent: `resolve` before it applies a batch,
    `stitch` after."""

    def __init__(
        self,
        redis: aioredis.Redis,
        hot: HotStore,
        durable: DurableWindows,
        settings: Settings,
        merge_hooks: Sequence[MergeHook] = (),
        features: SessionMerger | None = None,
    ) -> None:
        self.redis = redis
        self.hot = hot
        self.durable = durable
        self.settings = settings
        self.merge_hooks = list(merge_hooks)
        self.features = features
        self._stitch = redis.register_script(_STITCH)

    async def resolve(self, events: Sequence[Event]) -> Resolution:
        anonymous = sorted(
            {(e.namespace, e.session_id) for e in events if e.user_id is None and e.session_id}
        )
        if not anonymous:
            return Resolution(list(events), origin=list(range(len(events))))
        before: set[str] = set()
        try:
            pipe = self.redis.pipeline(transaction=False)
            for namespace, session_id in anonymous:
                pipe.get(Keys(namespace).alias(session_id))
            aliases = {
                key: _text(user)
                for key, user in zip(anonymous, await pipe.execute(), strict=True)
                if user is not None
            }
            moved = [
                e for e in events if e.user_id is None and (e.namespace, e.session_id) in aliases
            ]
            if moved:
                pipe = self.redis.pipeline(transaction=False)
                for e in moved:
                    pipe.zscore(Keys(e.namespace).seen(e.actor), e.event_id)
                before = {
                    e.event_id for e, score in zip(moved, await pipe.execute(), strict=True)
                    if score is not None
                }  # fmt: skip
        except RedisError as exc:
            raise StoreUnavailable(f"resolving session aliases in Redis failed: {exc}") from exc
        resolution = Resolution(events=[])
        for n, event in enumerate(events):
            key = (event.namespace, event.session_id)
            if event.user_id is not None or key not in aliases:
                resolution.events.append(event)
                resolution.origin.append(n)
                if event.user_id is None:
                    resolution.on_session.add((event.namespace, event.session_id or ""))
            elif event.event_id in before:
                # Applied to the session before the login; the move brings it to the user.
                resolution.skipped += 1
            else:
                # Frozen model: a copy with the user. It keeps its session_id, as a login
                # event does; `stitch` tells them apart by the original batch.
                resolution.events.append(event.model_copy(update={"user_id": aliases[key]}))
                resolution.origin.append(n)
        return resolution

    async def stitch(self, events: Sequence[Event], resolution: Resolution) -> set[Actor]:
        """Stitch the logins of the batch and re-check its anonymous sessions; returns the
        users whose window changed (their durable copy is written here)."""
        logins: dict[tuple[str, str], str] = {}
        for event in events:
            if event.user_id is not None and event.session_id is not None:
                logins[(event.namespace, event.session_id)] = event.user_id  # latest wins
        s = self.settings
        try:
            late = sorted(resolution.on_session - set(logins))
            pipe = self.redis.pipeline(transaction=False)
            for namespace, session_id in late:
                pipe.get(Keys(namespace).alias(session_id))
            aliases = {
                key: _text(user)
                for key, user in zip(late, await pipe.execute(), strict=True)
                if user is not None
            }
            # Logins set the alias and move; sessions that gained an alias meanwhile move.
            todo = [(key, user, user) for key, user in logins.items()]
            todo += [(key, user, "") for key, user in aliases.items()]
            pipe = self.redis.pipeline(transaction=False)
            for (namespace, session_id), user, set_alias in todo:
                keys = Keys(namespace)
                await self._stitch(
                    keys=[
                        keys.alias(session_id),
                        keys.window(session_actor(session_id)),
                        keys.window(user),
                    ],
                    args=[set_alias, s.window_ttl_s, s.window_size, s.window_ttl_s],
                    client=pipe,
                )
            outcomes = await pipe.execute() if todo else []
        except RedisError as exc:
            raise StoreUnavailable(f"stitching sessions to users in Redis failed: {exc}") from exc
        changed: set[Actor] = set()
        new_alias: list[tuple[str, str, str]] = []
        missing_user: set[Actor] = set()
        stitched: set[tuple[str, str, str]] = set()
        pairs: list[Login] = []
        for ((namespace, session_id), user, set_alias), (same, moved, existed) in zip(
            todo, outcomes, strict=True
        ):
            pairs.append(Login(namespace, session_id, user, bool(set_alias and not same)))
            if set_alias and not same:
                new_alias.append((namespace, session_id, user))
                stitched.add((namespace, session_id, user))
            if moved:
                changed.add((namespace, user))
                stitched.add((namespace, session_id, user))
            if not existed:
                missing_user.add((namespace, user))
        if new_alias:
            # A new login: the session's durable window too (Redis may have lost the hot
            # one). Union by event id, so what the move brought is not duplicated.
            found = await self.durable.get_many(
                [(ns, session_actor(sid)) for ns, sid, _ in new_alias]
            )
            for namespace, session_id, user in new_alias:
                entries = found.get((namespace, session_actor(session_id)))
                if entries:
                    await self.hot.merge_window(namespace, user, entries)
                    changed.add((namespace, user))
        if changed & missing_user:
            # The user's hot window did not exist before the merge created it: a new user,
            # or one whose window Redis lost. Bring back the durable copy before the merged
            # window overwrites it.
            await recover_lost_windows(self.hot, self.durable, changed & missing_user)
        if changed:
            # Durable in this order: the user's merged window first, then the session's
            # durable copy emptied (so a later login of the session, as another user, does
            # not receive it again). A crash in between leaves the session's copy, which
            # the next new alias merges by union: nothing lost, nothing doubled.
            await persist_windows(self.hot, self.durable, changed)
            emptied = {
                (ns, session_actor(sid)) for ns, sid, user in stitched if (ns, user) in changed
            }
            await self.durable.put({key: [] for key in emptied})
        if self.features is not None:
            # Every login, not only the new ones: the move is idempotent, and a login
            # replayed after a crash between the window and the features finds the
            # session's features still there.
            merged = await self.features.stitch(pairs)
            stitched.update(
                (x.namespace, x.session_id, x.user_id)
                for x in pairs
                if (x.namespace, x.user_id) in merged
            )
        for namespace, session_id, user in sorted(stitched):
            log.info("stitched session %r into user %r (%s)", session_id, user, namespace)
            for hook in self.merge_hooks:
                await hook(namespace, session_actor(session_id), user)
        return changed


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
