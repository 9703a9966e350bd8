"""Brokers: the seam between the hub's routing and where events are ordered and stored.

The hub hands a broker validated drafts; the broker gives each an id and a timestamp, stores it
wherever it keeps history, records it in this node's :class:`~.store.Store` and then calls the
hub's ``accept`` with the events in their final order, for fan-out. The hub never assigns a
sequence or writes history and retained values itself: a broker that keeps them in Redis
replaces all of that without touching routing.

``MemoryBroker`` does it all synchronously inside ``publish``; a Redis broker appends to a
stream and records what its reader sees, so every node accepts the same events in one order.

A publish may carry a ``Fence`` (a provider's lease: refused once another node took it) and a
``Charge`` (the publisher's rate: checked by the broker with the publish itself, so it holds
for the whole hub).
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import RateLimited
from ..events import Event, format_id, new_epoch
from ..limits import TokenBucket
from .store import Store

__all__ = ["Broker", "Charge", "Draft", "Fence", "MemoryBroker"]

_MAX_BUCKETS = 10_000  # publishers' rate buckets kept before idle (full) ones are dropped


@dataclass(frozen=True, slots=True)
class Draft:
    """A validated event before it has an id."""

    topic: str
    data: Any
    data_json: bytes


@dataclass(frozen=True, slots=True)
class Fence:
    """A publish is accepted only while ``key`` in the broker still holds ``token``: the value a
    node got when it took a provider's lease, which the next holder's taking moves on."""

    key: str
    token: str


@dataclass(frozen=True, slots=True)
class Charge:
    """What a publish costs its publisher: ``count`` events from the bucket named ``bucket``
    (``rate`` per second, at most ``burst`` saved up). ``who`` names the publisher in messages."""

    who: str
    bucket: str
    rate: float
    burst: int
    count: int

    def refused(self, wait: float) -> RateLimited:
        return RateLimited(
            f"{self.who} is over its publish rate of {self.rate:g} events/s; retry in {wait:.2f} s", retry_after=wait
        )


class Broker(abc.ABC):
    """The seam between the hub's fan-out and the place events are ordered and stored."""

    epoch: str
    store: Store  # this node's view of history and retained values; only the broker writes it
    shared = False  # True when other processes publish into the same order (Redis)
    connections = 0  # descriptors its own connections may take (Redis)
    reconnects = 0  # times the connection to the broker came back after an outage
    epoch_changes = 0  # times the broker lost its data and a new epoch began

    def lag(self) -> float:
        """Seconds between the newest event known to be written and the newest read here."""
        return 0.0

    def plausible(self, seq: int) -> bool:
        """With ``shared``: whether a position newer than this node has read could be real."""
        return False

    def bind(self, accept: Callable[[list[Event]], None], gap: Callable[[str, int | None], None] | None = None) -> None:
        """``accept(events)`` fans accepted events out; ``gap(reason, read)`` tells every
        subscriber that events may be missing ("epoch": the broker lost its data; "history":
        trimmed before this node read them, all up to seq ``read`` having been read)."""
        self._accept = accept
        self._gap = gap

    def _announce_gap(self, reason: str, read: int | None = None) -> None:
        if self._gap is not None:
            self._gap(reason, read)

    async def start(self) -> None:  # noqa: B027 - optional hook: a memory broker has nothing to connect
        """Connect; called once from the app's lifespan."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Disconnect; called once on shutdown."""

    def problem(self) -> str | None:
        """Why the broker is unusable right now, or None when it is fine (``/readyz``)."""
        return None

    async def settle(self) -> None:  # noqa: B027 - a memory broker's history is always complete
        """Return once this node's store holds every event written before the call, anywhere:
        after a publish that got no answer (it may have been stored all the same), history
        then says. Raises BrokerUnavailable when that cannot be known now."""

    @abc.abstractmethod
    async def publish(self, drafts: list[Draft], *, fence: Fence | None = None, charge: Charge | None = None) -> list[Event]:
        """Accept drafts into history, in order; return them as events once accepted. Raises
        RateLimited past the ``charge``'s rate, LeaseLost once the ``fence`` moved on."""

    @abc.abstractmethod
    async def prime(self, drafts: list[Draft], *, fence: Fence | None = None) -> list[Event]:
        """Make drafts the retained values of topics that have none yet, publishing no event
        (SPEC §7); the last draft of a topic wins. Returns the values retained."""


class MemoryBroker(Broker):
    """One process is the whole hub: a counter orders events, the store keeps them, and a fence
    always holds (no other process can take a lease)."""

    def __init__(self, store: Store | None = None, clock: Callable[[], float] = time.time) -> None:
        self.epoch = new_epoch()
        self.store = store or Store()
        self._clock = clock
        self._seq = 0
        self._last_ts = 0
        self._buckets: dict[str, TokenBucket] = {}

    async def publish(self, drafts: list[Draft], *, fence: Fence | None = None, charge: Charge | None = None) -> list[Event]:
        if charge is not None:
            self._charge(charge, time.monotonic())
        return self.publish_now(drafts)

    def _charge(self, charge: Charge, now: float) -> None:
        buckets = self._buckets
        bucket = buckets.get(charge.bucket)
        if bucket is None:
            if len(buckets) >= _MAX_BUCKETS:  # every JWT subject gets one: forget the idle ones
                for name, idle in list(buckets.items()):
                    if idle.take(now, 0) and idle.tokens >= idle.burst:  # full: the same as a new one
                        del buckets[name]
            bucket = buckets[charge.bucket] = TokenBucket(charge.rate, charge.burst, now)
        if not bucket.take(now, charge.count):
            raise charge.refused(bucket.wait_time(charge.count))

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
        self.store.record(events, int(self._clock() * 1000))
        self._accept(events)
        return events

    async def prime(self, drafts: list[Draft], *, fence: Fence | None = None) -> list[Event]:
        store = self.store
        latest = {draft.topic: draft for draft in drafts if draft.topic not in store.retained}
        # Stamped with the current position: a state as of now, not a point in history.
        seq, now_ms = self._seq, int(self._clock() * 1000)
        primed = []
        for topic, draft in latest.items():
            if not store.has_room(1):
                break
            event = Event(seq, format_id(self.epoch, seq), topic, now_ms, draft.data, draft.data_json)
            event.primed = True
            store.retain(event)
            primed.append(event)
        return primed
