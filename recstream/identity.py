"""Who an anonymous session is: the actor its events and requests belong to.

An anonymous visitor's events carry only a ``session_id`` and land in the window of the
actor ``session:{session_id}`` (`session_actor`). When the session logs in, the agents'
identity stitching (agents/identity.py) sets the alias ``rs:{ns}:alias:{session_id}``
to the user id and moves the session's history to the user; from then on serving reads
the user's state for that session's requests (`resolve_actor`).
"""

from __future__ import annotations

import redis.asyncio as aioredis

from recstream.keys import Keys
from recstream.published import as_text

__all__ = ["SESSION_PREFIX", "resolve_actor", "session_actor"]

SESSION_PREFIX = "session:"
"""An anonymous actor is ``session:{session_id}``."""


def session_actor(session_id: str) -> str:
    return f"{SESSION_PREFIX}{session_id}"


async def resolve_actor(redis: aioredis.Redis, namespace: str, session_id: str) -> str:
    """The actor whose window an anonymous session's requests should read: the user it
    logged in as, else the session itself (for serving)."""
    user = await redis.get(Keys(namespace).alias(session_id))
    return session_actor(session_id) if user is None else as_text(user)
