"""The hub's plain counters: bumped on the hot path, read by the metrics collector at scrape time."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["HubStats"]


@dataclass
class HubStats:
    published: dict[str, int] = field(default_factory=dict)  # by first topic segment
    slow_consumers: int = 0
    gaps: dict[str, int] = field(default_factory=dict)  # by reason
    sent_by_closed: dict[str, int] = field(default_factory=dict)  # deliveries of detached subscribers
    writes_by_closed: dict[str, int] = field(default_factory=dict)  # their socket writes that carried events
    dropped_by_closed: int = 0
    topics_refused: int = 0  # publishes refused by max_topics
    rate_limited: int = 0  # publishes refused by their publisher's rate

    def gap(self, reason: str) -> None:
        self.gaps[reason] = self.gaps.get(reason, 0) + 1
