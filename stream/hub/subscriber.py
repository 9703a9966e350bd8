"""One subscriber: its patterns, its bounded outbound buffer, and its overflow policy.

The hub delivers every matching event synchronously while publishing; nothing here ever
awaits. It writes the common case itself (a live, writable subscriber with nothing waiting and
no symbol filter: ``direct``), and calls :meth:`Subscriber.deliver` for everything else. Bytes reach the client through a :class:`Sink` that the
transport supplies (a WebSocket connection, an SSE response, a long-poll waiter):

    hub.publish ──deliver()──▶ Subscriber ──sink.write(bytes)──▶ transport buffer ──▶ socket
                                 │  ▲
                 paused/pending ─┘  └─ resume(): the transport drained; flush in one write

While the transport is writable and nothing is pending, an event is written at once. Otherwise
it waits in ``pending`` (at most ``capacity`` events), and a full buffer applies the event's
overflow policy. A subscriber that starts from ``since`` reads history itself, chunk by chunk
as the transport drains, and turns live once it reaches the newest event: live events that
arrive meanwhile are in history too, so the seam has neither a hole nor a duplicate.
"""

from __future__ import annotations

import enum
from collections import deque
from typing import TYPE_CHECKING, Protocol

from ..events import Event, format_id

if TYPE_CHECKING:
    from .core import Hub

__all__ = ["Policy", "Retained", "Sink", "State", "Subscriber"]

# How many bytes one flush hands to the transport before checking whether it paused.
FLUSH_BYTES = 64 * 1024


class Policy(enum.Enum):
    """What a full subscriber buffer does with one more event (SPEC §2.4)."""

    DISCONNECT = "disconnect"
    DROP = "drop"
    CONFLATE = "conflate"


class State(enum.Enum):
    CATCHING_UP = "catching_up"  # reading history from ``cursor``; live events are ignored
    LIVE = "live"
    CLOSED = "closed"


_TRANSITIONS = {
    State.CATCHING_UP: {State.LIVE, State.CLOSED},
    State.LIVE: {State.CATCHING_UP, State.CLOSED},
    State.CLOSED: set(),
}


class Sink(Protocol):
    """What a transport provides to a subscriber. All calls are synchronous and never block."""

    def encode(self, event: Event) -> bytes: ...

    def encode_snapshot(self, event: Event) -> bytes: ...

    def encode_gap(self, after: str | None, reason: str) -> bytes: ...

    def write(self, data: bytes) -> None: ...

    def overflowed(self) -> None:
        """The buffer overflowed under the ``disconnect`` policy: close as a slow consumer."""


class Retained:
    """A retained value queued for a subscriber: sent marked as a snapshot, not as an event."""

    __slots__ = ("event", "seq", "topic", "policy", "symbols")

    def __init__(self, event: Event) -> None:
        self.event = event
        self.seq, self.topic, self.policy, self.symbols = event.seq, event.topic, event.policy, event.symbols


class _Want:
    """One of a subscriber's patterns: from which seq it applies and which symbols it wants."""

    __slots__ = ("pattern", "start", "symbols")

    def __init__(self, pattern, start: int, symbols: frozenset[str] | None) -> None:
        self.pattern = pattern
        self.start = start
        self.symbols = symbols

    def accepts(self, event: Event) -> bool:
        if event.seq <= self.start or not self.pattern.matches(event.topic):
            return False
        return self.symbols is None or event.symbols is None or not self.symbols.isdisjoint(event.symbols)


class Subscriber:
    """A connection's view of the hub. Owned by its transport; registered with one hub."""

    __slots__ = (
        "hub",
        "sink",
        "state",
        "paused",
        "last_seq",
        "cursor",
        "wants",
        "pending",
        "pending_gap",
        "latest",
        "stale",
        "started",
        "direct",
        "capacity",
        "sent",
        "dropped",
        "transport_name",
        "_write",
        "_encode",
        "__weakref__",
    )

    def __init__(self, hub: Hub, sink: Sink, *, capacity: int, transport: str = "") -> None:
        self.hub = hub
        self.sink = sink
        self.state = State.LIVE
        self.paused = False
        self.last_seq = hub.head_seq
        self.cursor = 0
        self.wants: dict[str, _Want] = {}
        self.pending: deque[Event] = deque()
        self.pending_gap: tuple[str | None, str] | None = None
        # While conflating: topic -> seq of its newest pending event; superseded entries stay in
        # ``pending`` (counted by ``stale``) and are skipped when flushed.
        self.latest: dict[str, int] | None = None
        self.stale = 0
        self.started = False  # has ever held a pattern (``since`` is only for a fresh subscriber)
        # The hot path's one question: live, writable and nothing waiting? Kept current by
        # _refresh() whenever any of those changes (enum comparisons cost ~0.2 µs each).
        self.direct = True
        self.capacity = capacity
        self.sent = 0
        self.dropped = 0
        self.transport_name = transport
        self._write = sink.write
        self._encode = sink.encode

    def _set_state(self, state: State) -> None:
        if state not in _TRANSITIONS[self.state]:
            raise RuntimeError(f"subscriber cannot go from {self.state.value} to {state.value}")
        self.state = state
        self._refresh()

    def _refresh(self) -> None:
        self.direct = self.state is State.LIVE and not self.paused and not self.pending and self.pending_gap is None

    # -- delivery (the hub inlines the direct case, see Hub._fanout) ----------------------

    def deliver(self, event: Event, symbols: frozenset[str] | None, batch: dict | None = None) -> None:
        """Called by the hub for each event matching one of this subscriber's patterns. With
        ``batch`` (several events accepted at once) frames are collected there, so the hub can
        write each subscriber's share of the batch in one write."""
        seq = event.seq
        if seq <= self.last_seq:
            return  # already delivered through another pattern
        if symbols is not None and event.symbols is not None and symbols.isdisjoint(event.symbols):
            return
        if self.direct:
            self.last_seq = seq
            self.sent += 1
            if batch is None:
                self._write(self._encode(event))
            else:
                frames = batch.get(self)
                if frames is None:
                    batch[self] = [self._encode(event)]
                else:
                    frames.append(self._encode(event))
        elif self.state is State.LIVE:
            self.last_seq = seq
            self._enqueue(event)
        # CATCHING_UP reads this event from history itself; CLOSED wants nothing.

    # -- flow control -----------------------------------------------------------------------

    def pause(self) -> None:
        """The transport's buffer is above its high-water mark."""
        self.paused = True
        self.direct = False

    def resume(self) -> None:
        """The transport drained: send what waited, in as few writes as possible."""
        self.paused = False
        self.flush()

    def flush(self) -> None:
        try:
            self._flush()
        finally:
            self._refresh()

    def _flush(self) -> None:
        while not self.paused and self.state is not State.CLOSED:
            chunk: list[bytes] = []
            if self.pending_gap is not None:
                after, reason = self.pending_gap
                self.pending_gap = None
                chunk.append(self.sink.encode_gap(after, reason))
            if self.pending:
                self._take_pending(chunk)
            elif self.state is State.CATCHING_UP:
                self.hub._catch_up(self, chunk, FLUSH_BYTES)
            if not chunk:
                return
            self._write(chunk[0] if len(chunk) == 1 else b"".join(chunk))

    def _take_pending(self, chunk: list[bytes]) -> None:
        size = 0
        pending, encode, latest = self.pending, self._encode, self.latest
        while pending and size < FLUSH_BYTES:
            event = pending.popleft()
            if latest is not None and event.policy is Policy.CONFLATE:
                if latest.get(event.topic) != event.seq:
                    self.stale -= 1  # superseded by a newer pending value
                    continue
                del latest[event.topic]
            data = self.sink.encode_snapshot(event.event) if type(event) is Retained else encode(event)
            chunk.append(data)
            size += len(data)
            self.sent += 1
        if not pending:
            self.latest, self.stale = None, 0

    @property
    def backlog(self) -> int:
        """Events waiting, not counting superseded conflated values."""
        return len(self.pending) - self.stale

    def enqueue_retained(self, event: Event) -> None:
        """Queue a snapshot value behind what is already waiting (the subscriber is not direct)."""
        self._enqueue(Retained(event))  # type: ignore[arg-type]

    # -- overflow ---------------------------------------------------------------------------

    def _enqueue(self, event: Event) -> None:
        self.direct = False
        latest = self.latest
        if latest is not None and event.policy is Policy.CONFLATE and event.topic in latest:
            # Conflating: the newest value supersedes the waiting one, so it needs no room.
            self.stale += 1
            self.dropped += 1
            latest[event.topic] = event.seq
            self.pending.append(event)
            if self.stale > self.capacity:
                self._compact()
            return
        if len(self.pending) - self.stale >= self.capacity:
            policy = event.policy
            if policy is Policy.DROP:
                self._drop_oldest()
            elif policy is not Policy.CONFLATE or not self._start_conflating(event):
                self.close_slow()
                return
        if self.latest is not None and event.policy is Policy.CONFLATE:
            self.latest[event.topic] = event.seq
        self.pending.append(event)

    def _drop_oldest(self) -> None:
        pending, latest = self.pending, self.latest
        while True:
            lost = pending.popleft()
            if latest is not None and lost.policy is Policy.CONFLATE:
                if latest.get(lost.topic) != lost.seq:
                    self.stale -= 1
                    continue
                del latest[lost.topic]
            break
        self.dropped += 1
        if self.pending_gap is None:
            self.pending_gap = (format_id(self.hub.epoch, lost.seq - 1), "overflow")
            self.hub.stats.gap("overflow")

    def _start_conflating(self, event: Event) -> bool:
        """The buffer is full and a conflated event arrives: from now until the buffer drains, keep
        only the newest pending event of each conflated topic. True if that made room."""
        latest = self.latest if self.latest is not None else {}
        for queued in self.pending:
            if queued.policy is Policy.CONFLATE:
                latest[queued.topic] = queued.seq
        latest.pop(event.topic, None)  # the incoming event supersedes its topic's waiting one
        self.latest = latest
        self._compact()
        return len(self.pending) < self.capacity

    def _compact(self) -> None:
        latest = self.latest or {}
        kept = deque(
            queued
            for queued in self.pending
            if queued.policy is not Policy.CONFLATE or latest.get(queued.topic) == queued.seq
        )
        self.dropped += len(self.pending) - len(kept) - self.stale
        self.pending = kept
        self.stale = 0

    def close_slow(self) -> None:
        """Give up on a consumer that cannot keep up: detach, then let the transport close."""
        self.dropped += self.backlog
        self.pending.clear()
        self.latest, self.stale = None, 0
        self.hub.detach(self)
        self.hub.stats.slow_consumers += 1
        self.sink.overflowed()

    # -- lifecycle --------------------------------------------------------------------------

    def close(self) -> None:
        """Stop receiving; idempotent. The owner calls this when its connection ends."""
        if self.state is not State.CLOSED:
            self.hub.detach(self)
