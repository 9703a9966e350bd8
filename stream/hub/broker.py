"""Brokers: where ids are assigned and accepted events come from.

The hub hands a broker validated drafts; the broker gives each an id and a timestamp, stores it
wherever it keeps history, and calls the hub's ``accept`` with the events in their final order.
``MemoryBroker`` does all of this synchronously inside ``publish``; a Redis broker appends to a
stream and delivers what its reader sees, so every node accepts the same events in one order.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..events import Event, format_id, new_epoch

__all__ = ["Broker", "Draft", "MemoryBroker"]


@dataclass(frozen=True, slots=True)
class Draft:
    """A validated event before it has an id."""

    topic: str
    data: Any
    data_json: bytes


class Broker(abc.ABC):
    """The seam between the hub's fan-out and the place events are ordered and stored."""

    epoch: str

    def bind(self, accept: Callable[[list[Event]], None]) -> None:
        self._accept = accept

    async def start(self) -> None:  # noqa: B027 - optional hook: a memory broker has nothing to connect
        """Connect; called once from the app's lifespan."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Disconnect; called once on shutdown."""

    def problem(self) -> str | None:
        """Why the broker is unusable right now, or None when it is fine (``/readyz``)."""
        return None

    @abc.abstractmethod
    async def publish(self, drafts: list[Draft]) -> list[Event]:
        """Accept drafts into history, in order; return them as events once accepted."""


class MemoryBroker(Broker):
    """One process is the whole hub: a counter orders events, the hub's history stores them."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.epoch = new_epoch()
        self._clock = clock
        self._seq = 0
        self._last_ts = 0

    async def publish(self, drafts: list[Draft]) -> list[Event]:
        return self.publish_now(drafts)

    def publish_now(self, drafts: list[Draft]) -> list[Event]:
        """The synchronous core of ``publish``, for callers that already run on the loop."""
        # Timestamps never go backwards, even if the wall clock does: history is sorted by both.
        ts = max(int(self._clock() * 1000), self._last_ts)
        self._last_ts = ts
        events = []
        for draft in drafts:
            self._seq += 1
            events.append(
                Event(self._seq, format_id(self.epoch, self._seq), draft.topic, ts, draft.data, draft.data_json)
            )
        self._accept(events)
        return events
