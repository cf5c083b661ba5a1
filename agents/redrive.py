"""Re-driving the forwarder's dead letters to Personalize, without an operator.

When the tracker is unreachable, throttles or fails past the forwarder's retry budget,
the forwarder dead-letters the events (kind ``personalize``) rather than hold the stream:
the other agents must not wait for a third party. Every ``personalize_redrive_s`` each
worker hands up to `REDRIVE_BATCH` letters to `agents.forwarder.replay_dead_letters`
(the code behind ``recstream dlq replay``): what the tracker takes is deleted, what it
still refuses stays for the next tick, letters of other kinds are left alone. So an
outage of Personalize ends with every event delivered and the queue empty, and
`recstream dlq replay` remains for letters that need a human (an invalid event).

Several workers may tick at once: SQS hides a received letter from the others for the
visibility timeout, and a letter sent twice (a delete that failed) repeats an ``eventId``,
which Personalize ignores.
"""

from __future__ import annotations

import logging

from agents.forwarder import ReplayReport, replay_dead_letters
from recstream.settings import Settings

__all__ = ["REDRIVE_BATCH", "redrive_personalize"]

log = logging.getLogger(__name__)

REDRIVE_BATCH = 200
"""Letters received per tick at most, so one tick during a long outage stays short."""


async def redrive_personalize(settings: Settings, limit: int = REDRIVE_BATCH) -> ReplayReport:
    """One re-drive pass; logs what it delivered and what is still waiting."""
    report = await replay_dead_letters(settings, limit=limit)
    if report.replayed:
        log.info("re-drove %d dead-lettered events to Personalize", report.replayed)
    if report.failed:
        log.warning(
            "%d dead-lettered events still not taken by Personalize; retrying in %.0f s (%s)",
            report.failed, settings.personalize_redrive_s, "; ".join(report.reasons[:1]),
        )  # fmt: skip
    return report
