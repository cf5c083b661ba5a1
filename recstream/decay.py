"""The forward-decayed popularity's scale, shared by the agents (who write it) and
serving (which reads it). Its own module, free of numpy and scipy, so the agents' process
imports nothing more for it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from recstream.settings import Settings

__all__ = ["EXPONENT_LIMIT", "ForwardDecay"]

EXPONENT_LIMIT = 1000.0
"""2^1000 is near the largest double: an exponent further than 1000 half-lives from the
epoch is capped there instead of overflowing (docs/agents.md: move the epoch)."""


@dataclass(frozen=True, slots=True)
class ForwardDecay:
    """The agents' decayed popularity, Σ w·2^((t - epoch)/half_life): forward decay, so
    an event's addition never changes and no list is rewritten as time passes
    (agents/trending.py; `Settings.popularity_epoch_s` and ``popularity_half_life_s``).
    Its scale moves with time (~1e11 for a 2026 click with the 2023 epoch and 30 days,
    ~1e-35 for 2014's); training's Popularity gives Σ w·2^(-(T - t)/half_life), the
    decayed count at T, and a learned ranker is fitted on that. The two differ by the one
    factor 2^((epoch - T)/half_life), `factor`."""

    epoch_s: float
    half_life_s: float
    tick_s: float = 60.0
    """`factor`'s time is rounded down to this, so the requests of one minute share one
    factor (and a source's scaled cut of a list); the decay over it is 2^(-60 s/half-life),
    a 1.6e-5 relative change with 30 days."""

    @classmethod
    def of(cls, settings: Settings) -> ForwardDecay:
        """The decay the agents write with these settings."""
        return cls(settings.popularity_epoch_s, settings.popularity_half_life_s)

    def factor(self, at: float) -> float:
        """What a forward-decayed score is multiplied by to be the decayed count at
        ``at`` (seconds since the Unix epoch)."""
        # whole ticks from the epoch, so the factor at the epoch is exactly 1
        elapsed = at - self.epoch_s
        if self.tick_s > 0:
            elapsed -= elapsed % self.tick_s
        exponent = -elapsed / self.half_life_s
        return float(2.0 ** max(-EXPONENT_LIMIT, min(exponent, EXPONENT_LIMIT)))
