"""What this node holds of the hub's past: history (replay, ``since``, /api/events) and the
retained value of each topic (snapshots, /api/topics). Pure: time is passed in.

The broker is its only writer. The memory broker records what it orders; a broker that keeps
events elsewhere (Redis) fills it when it connects and records what its reader sees, so every
node's store holds the same events in the same order. The hub and its reading side only read it.
"""

from __future__ import annotations

from bisect import bisect_right, insort
from collections.abc import Iterable

from ..events import Event
from .history import History

__all__ = ["Store"]


class Store:
    def __init__(
        self,
        history_size: int = 10_000,
        history_ttl: float | None = 3600.0,
        history_bytes: int | None = 256 * 1024 * 1024,
        max_topics: int = 100_000,
    ) -> None:
        self._limits = (history_size, None if history_ttl is None else int(history_ttl * 1000), history_bytes)
        self.max_topics = max_topics
        self.clear()

    def clear(self) -> None:
        """Forget everything: the events belonged to an epoch that is gone (its data was lost)."""
        self.history = History(*self._limits)
        self.retained: dict[str, Event] = {}
        # Topics in the order they were first seen: a snapshot walks it lazily by index, since
        # retained topics are never removed (only all at once, by ``clear``).
        self.topic_order: list[str] = []
        self._sorted_topics: list[str] = []  # the same, sorted: /api/topics pages through it
        self.retained_bytes = 0

    def load(self, history: list[Event], retained: list[Event], trimmed: tuple[int, int], now_ms: int) -> None:
        """Fill an empty store from what the broker keeps: ``history`` oldest first, the
        retained values in any order, and (seq, ts) of the newest event already gone from
        history ((0, 0) if none ever was)."""
        self.history.trimmed_seq, self.history.trimmed_ts = trimmed
        for event in history:
            self.history.append(event, now_ms)
        for event in sorted(retained, key=lambda event: event.seq):
            self.retain(event)

    @property
    def head_seq(self) -> int:
        return self.history.head_seq

    def record(self, events: Iterable[Event], now_ms: int) -> None:
        """Accepted events, in order: into history, and each its topic's retained value."""
        for event in events:
            self.history.append(event, now_ms)
            self.retain(event)

    def retain(self, event: Event) -> None:
        previous = self.retained.get(event.topic)
        if previous is None:
            self.topic_order.append(event.topic)
            insort(self._sorted_topics, event.topic)
        else:
            self.retained_bytes -= previous.size
        self.retained[event.topic] = event
        self.retained_bytes += event.size

    def new_topics(self, topics: Iterable[str]) -> set[str]:
        """Which of ``topics`` have no retained value yet."""
        retained = self.retained
        return {topic for topic in topics if topic not in retained}

    def has_room(self, new: int) -> bool:
        """Whether ``new`` more topics fit under ``max_topics``."""
        return len(self.retained) + new <= self.max_topics

    def topics_after(self, after: str, count: int) -> tuple[list[str], bool]:
        """Up to ``count`` retained topics sorted after ``after``, and whether more follow."""
        start = bisect_right(self._sorted_topics, after)
        names = self._sorted_topics[start : start + count]
        return names, start + count < len(self._sorted_topics)
