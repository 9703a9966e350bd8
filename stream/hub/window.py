"""The write window: under load, events accepted after a fan-out wait a few milliseconds and
leave together, one write per socket (``write_delay``, ``write_load``; docs/operations.md,
*Write coalescing*).

Events are written as they are accepted while the loop keeps up. Under load — for ``STREAK``
events in a row, the last writes took CPU for ``write_load`` of the time since the event before
or more (with 1,000 subscribers one event's writes take ~12 ms) — a window opens after the
fan-out: what the hub accepts in it
is held by each subscriber (``Subscriber.held``) and written at its end, one write per socket.
When a window ends, the next opens if the load is still there; one that ends with nothing held
closes the run. A window lasts as long as the writes before it took (at least ``write_delay``,
at most ``MAX_WINDOW``), so the loop spends at most about half its time writing however fast
events come, and each write carries more of them the faster they come.

Load is measured in CPU time (``time.thread_time``), not wall time: other processes on the
machine taking the CPU must not make the hub think its own writes keep it busy.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from .subscriber import Subscriber

__all__ = ["MAX_EVENTS", "MAX_WINDOW", "WriteWindow"]

# Events one window may hold before it is written early: bounds what it keeps (frames are shared
# between subscribers, so at most this many events' frames, plus a list entry per subscriber each).
MAX_EVENTS = 256
# The longest a window grows to, unless write_delay is longer.
MAX_WINDOW = 0.05
# Events in a row that must find the loop loaded before windows open: two requests read together
# (a publisher's burst) are not load; a loop that has fallen behind sees every event so.
STREAK = 3


class WriteWindow:
    """When the hub holds frames, and when it writes them. ``holding`` lists the subscribers
    holding frames while a window is open, and is None otherwise; ``release`` (the hub's) writes
    what the subscribers of such a list hold, one write each, and empties it."""

    def __init__(self, delay: float, load: float, release: Callable[[list[Subscriber]], None]) -> None:
        self.delay = delay
        self.load = load
        self.release = release
        self.holding: list[Subscriber] | None = None
        self.events = 0  # held in the open window
        self.timer: asyncio.TimerHandle | None = None
        self.closed = False
        self.busy = 0.0  # CPU seconds the last writes took (a fan-out, or a window's)
        self.last = time.monotonic()  # when events were last accepted
        self.streak = 0  # events in a row that found the loop loaded

    def arrived(self) -> None:
        """The hub accepts events: was the loop loaded since the last?"""
        now = time.monotonic()
        self.streak = self.streak + 1 if self.busy >= self.load * (now - self.last) else 0
        self.last = now

    def held(self) -> None:
        """One more event was fanned out into the open window."""
        self.events += 1
        if self.events >= MAX_EVENTS and self.holding is not None:
            self.events = 0
            self.release(self.holding)  # the window stays open, empty

    def wrote(self, since: float) -> None:
        """Writes that began at CPU time ``since`` are done; under load, a window opens."""
        self.busy = time.thread_time() - since
        if (self.streak >= STREAK or not self.load) and not self.closed:  # write_load 0: always
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # driven synchronously (tests): every event is written at once
            self.holding, self.events = [], 0
            self.timer = loop.call_later(min(max(self.delay, self.busy), max(self.delay, MAX_WINDOW)), self._ends)

    def _ends(self) -> None:
        holding = self.holding
        self.holding = self.timer = None
        if holding:
            since = time.thread_time()
            self.release(holding)
            self.wrote(since)  # still under load: the next window

    def close(self) -> None:
        """Write what is held now and open no window again (the hub is closing)."""
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
        holding, self.holding, self.timer = self.holding, None, None
        if holding:
            self.release(holding)
