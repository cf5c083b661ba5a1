"""Stage 5: what to do with items the user already interacted with, and ``exclude``.

The policy is per namespace (``Settings.seen_policy``, e.g.
``RECSTREAM_SEEN_POLICY='{"films": "exclude", "default": "keep"}'``):

- ``keep``: seen items rank on their score (e-commerce: re-views convert);
- ``demote``: seen items follow every unseen one, each group in score order;
- ``exclude``: seen items are dropped (films already watched).

``exclude`` (the request parameter: what the page already shows) always drops its items.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from recstream.settings import SeenPolicy
from serving.pipeline.types import Candidate

__all__ = ["apply_seen", "policy_for"]


def policy_for(policies: Mapping[str, SeenPolicy], namespace: str) -> SeenPolicy:
    return policies.get(namespace, policies.get("default", "keep"))


def apply_seen(
    ranked: list[Candidate], policy: SeenPolicy, exclude: Collection[str]
) -> list[Candidate]:
    """``ranked`` (best first) after the policy and ``exclude``; order otherwise kept."""
    kept = [c for c in ranked if c.item_id not in exclude]
    if policy == "exclude":
        return [c for c in kept if not c.seen]
    if policy == "demote":
        return [c for c in kept if not c.seen] + [c for c in kept if c.seen]
    return kept
