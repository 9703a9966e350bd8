"""The hub's recent events of all topics, bounded by count, bytes and age. Pure (time is passed in)."""

from __future__ import annotations

from bisect import bisect_right
from operator import attrgetter
from typing import cast

from ..events import Event

__all__ = ["History"]

_seq = attrgetter("seq")
# What a dropped slot holds: nothing (every reader starts at ``_start``, past the dropped ones).
_RELEASED = cast(Event, None)
_ts = attrgetter("ts")


class History:
    """An append-only window over accepted events, oldest first.

    ``trimmed_seq`` / ``trimmed_ts`` remember the newest event that fell out of the window, so a
    reader can tell "nothing happened before the window" from "events were lost to it".
    """

    def __init__(self, size: int, ttl_ms: int | None, max_bytes: int | None = None) -> None:
        self.size = size
        self.ttl_ms = ttl_ms
        self.max_bytes = max_bytes
        self.bytes = 0  # sum of the held events' ``size``
        # Slots before ``_start`` are None: a dropped event is released at once, not at compaction.
        self._events: list[Event] = []
        self._start = 0
        self.trimmed_seq = 0
        self.trimmed_ts = 0

    def __len__(self) -> int:
        return len(self._events) - self._start

    @property
    def head_seq(self) -> int:
        """The seq of the newest event ever accepted (0 when none)."""
        if len(self._events) > self._start:
            return self._events[-1].seq
        return self.trimmed_seq

    def oldest(self) -> Event | None:
        return self._events[self._start] if len(self._events) > self._start else None

    def append(self, event: Event, now_ms: int) -> None:
        self._events.append(event)
        self.bytes += event.size
        if len(self._events) - self._start > self.size:
            self._drop(len(self._events) - self._start - self.size)
        if self.max_bytes is not None and self.bytes > self.max_bytes:
            self._drop_bytes(self.bytes - self.max_bytes)
        self.trim(now_ms)

    def _drop_bytes(self, excess: int) -> None:
        events, count, freed = self._events, 0, 0
        while freed < excess and self._start + count < len(events):
            freed += events[self._start + count].size
            count += 1
        self._drop(count)

    def trim(self, now_ms: int) -> None:
        """Forget events older than the TTL."""
        if self.ttl_ms is None:
            return
        cutoff = now_ms - self.ttl_ms
        events = self._events
        if self._start < len(events) and events[self._start].ts < cutoff:
            stale = bisect_right(events, cutoff - 1, lo=self._start, key=_ts) - self._start
            self._drop(stale)

    def _drop(self, count: int) -> None:
        events = self._events
        last = events[self._start + count - 1]
        self.trimmed_seq = last.seq
        self.trimmed_ts = last.ts
        for index in range(self._start, self._start + count):
            self.bytes -= events[index].size
            events[index] = _RELEASED
        self._start += count
        # Compact once the dead prefix outgrows the live part: amortised O(1) per event.
        if self._start > 1024 and self._start * 2 > len(self._events):
            del self._events[: self._start]
            self._start = 0

    def index_after(self, seq: int) -> int:
        """Index of the first event with a seq greater than ``seq``."""
        return bisect_right(self._events, seq, lo=self._start, key=_seq)

    def after(self, seq: int, limit: int | None = None) -> list[Event]:
        """Events newer than ``seq``, oldest first, at most ``limit``."""
        index = self.index_after(seq)
        end = len(self._events) if limit is None else min(len(self._events), index + limit)
        return self._events[index:end]

    def at(self, index: int) -> Event | None:
        return self._events[index] if index < len(self._events) else None

    def seq_before_time(self, ts_ms: int) -> int:
        """The seq of the newest retained event older than ``ts_ms`` (or the trim point)."""
        index = bisect_right(self._events, ts_ms - 1, lo=self._start, key=_ts)
        if index > self._start:
            return self._events[index - 1].seq
        return self.trimmed_seq

    def latest(self, limit: int) -> list[Event]:
        return self._events[max(self._start, len(self._events) - limit) :]

    def before(self, index: int) -> Event | None:
        """The event at ``index - 1`` while it is held (a backwards reader's next step)."""
        return self._events[index - 1] if index - 1 >= self._start else None

    def end(self) -> int:
        """The index one past the newest event."""
        return len(self._events)

    def __iter__(self):
        return iter(self._events[self._start :])
