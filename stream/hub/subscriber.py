"""One subscriber: its patterns, its bounded outbound buffer, and its overflow policy.

The hub delivers every matching event synchronously while publishing; nothing here ever
awaits. It writes the common case itself (a live, writable subscriber with nothing waiting and
no symbol filter: ``direct``), and calls :meth:`Subscriber.deliver` for everything else. Bytes
reach the client through a :class:`Sink` that the transport supplies (a WebSocket connection,
an SSE response, a long-poll waiter):

    hub.publish ──deliver()──▶ Subscriber ──sink.write(bytes)──▶ transport buffer ──▶ socket
                                 │  ▲
                 paused/pending ─┘  └─ resume(): the transport drained; flush in one write

While the transport is writable and nothing is pending, an event is written at once, or, in a
batch or the hub's write window (``.window``), held with the others for one write at the end
(``held``; anything else this subscriber writes releases them first, so order never changes).
Otherwise it waits in ``pending`` (at most ``capacity`` events), and a full buffer applies the
event's overflow policy. A subscriber that starts from ``since`` or asks for a snapshot reads the
retained values and history itself, chunk by chunk as the transport drains, and turns live once
it reaches the newest event: live events that arrive meanwhile are in history too, so the seam
has neither a hole nor a duplicate. That reading is done in steps of bounded work; between
steps the loop serves everyone else, so no snapshot or replay is ever one unbounded write.
"""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from collections.abc import Callable
from typing import Protocol

from ..events import Event, format_id, symbols_match
from .stats import HubStats

__all__ = ["Filter", "Owner", "Policy", "Sink", "SnapshotScan", "State", "Subscriber", "Want"]

# How many bytes one flush hands to the transport before checking whether it paused.
FLUSH_BYTES = 64 * 1024
# Catch-up steps (each at most FLUSH_BYTES written, or the hub's SCAN_STEP examined) one flush
# runs before it yields the loop to other work and continues at its next turn.
STEPS_PER_TURN = 1


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


class Owner(Protocol):
    """What a subscriber needs of the hub it belongs to (the hub implements it)."""

    stats: HubStats

    @property
    def epoch(self) -> str: ...

    @property
    def head_seq(self) -> int: ...

    def catch_up(self, sub: Subscriber, chunk: list[bytes], budget: int) -> int:
        """Append the next snapshot values / history events for ``sub`` to ``chunk``; how many."""

    def detach(self, sub: Subscriber) -> None:
        """Remove ``sub`` from every route and mark it closed."""


class Filter(Protocol):
    def wants(self, event: Event) -> bool:
        """Whether a retained value matches the patterns (and symbol filter) of a snapshot."""


class Want:
    """One of a subscriber's patterns: from which seq it applies and which symbols it wants."""

    __slots__ = ("pattern", "start", "symbols")

    def __init__(self, pattern, start: int, symbols: frozenset[str] | None) -> None:
        self.pattern = pattern
        self.start = start
        self.symbols = symbols


class SnapshotScan:
    """A snapshot in progress: the retained values of ``topics`` (or of every topic known when
    it began, when ``topics`` is None) at indexes ``index``..``end``, as of seq ``cursor``, for
    the patterns ``wants`` (``matcher`` is built from them by ``make_filter``)."""

    __slots__ = ("cursor", "end", "index", "make_filter", "matcher", "topics", "wants")

    def __init__(
        self, wants: list[Want], make_filter: Callable[[list[Want]], Filter], cursor: int, topics: list[str] | None, end: int
    ) -> None:
        self.wants = wants
        self.make_filter = make_filter
        self.matcher = make_filter(wants)
        self.cursor = cursor
        self.topics = topics
        self.index = 0
        self.end = end

    def without(self, patterns: list[str]) -> bool:
        """Stop covering ``patterns`` (unsubscribed); False when no pattern is left."""
        kept = [want for want in self.wants if want.pattern.text not in patterns]
        if len(kept) != len(self.wants):
            self.wants = kept
            self.matcher = self.make_filter(kept)
        return bool(kept)


class Subscriber:
    """A connection's view of the hub. Owned by its transport; registered with one hub."""

    __slots__ = (
        "__weakref__",
        "capacity",
        "cursor",
        "direct",
        "dropped",
        "held",
        "hub",
        "last_seq",
        "latest",
        "merged",
        "paused",
        "pending",
        "pending_gap",
        "scheduled",
        "sent",
        "sink",
        "snapshots",
        "stale",
        "started",
        "state",
        "transport_name",
        "wants",
        "write",
    )

    def __init__(self, hub: Owner, sink: Sink, *, capacity: int, transport: str = "") -> None:
        self.hub = hub
        self.sink = sink
        self.state = State.LIVE
        self.paused = False
        self.last_seq = hub.head_seq
        self.cursor = 0
        self.wants: dict[str, Want] = {}
        self.pending: deque[Event] = deque()
        self.pending_gap: tuple[str | None, str] | None = None
        # While conflating: topic -> seq of its newest pending event; superseded entries stay in
        # ``pending`` (counted by ``stale``) and are skipped when flushed.
        self.latest: dict[str, int] | None = None
        self.stale = 0
        self.snapshots: deque[SnapshotScan] = deque()  # requested snapshots, oldest first
        self.scheduled = False  # a flush continues at the loop's next turn
        self.started = False  # has ever held a pattern (``since`` is only for a fresh subscriber)
        # The hot path's one question: live, writable and nothing waiting? Kept current by
        # _refresh() whenever any of those changes (enum comparisons cost ~0.2 µs each).
        self.direct = True  # from here on only _refresh() sets it
        self.capacity = capacity
        self.sent = 0  # every event written to this subscriber; the one count of deliveries
        self.merged = 0  # events that shared a socket write with an earlier one (writes = sent - merged)
        self.held: list[bytes] | None = None  # direct frames waiting for the hub's write window to end
        self.dropped = 0
        self.transport_name = transport
        self.write = sink.write

    def set_state(self, state: State) -> None:
        if state not in _TRANSITIONS[self.state]:
            raise RuntimeError(f"subscriber cannot go from {self.state.value} to {state.value}")
        self.state = state
        self._refresh()

    def _refresh(self) -> None:
        self.direct = self.state is State.LIVE and not self.paused and not self.pending and self.pending_gap is None

    # -- delivery (the hub inlines the direct case, see Hub._fanout) ----------------------

    def deliver(
        self, event: Event, symbols: frozenset[str] | None, hold: list | None = None, frame: bytes | None = None
    ) -> None:
        """Called by the hub for each event matching one of this subscriber's patterns, with
        the event already framed for this subscriber's wire format when it is ``direct``. With
        ``hold`` (several events accepted at once, or the hub's write window is open) the frame
        waits in ``held`` and this subscriber joins ``hold`` once, so the hub writes its share of
        the batch or window in one write (:meth:`release`)."""
        seq = event.seq
        if seq <= self.last_seq:
            return  # already delivered through another pattern
        if not symbols_match(symbols, event.symbols):
            return
        if self.direct:
            self.last_seq = seq
            self.sent += 1
            data = frame if frame is not None else self.sink.encode(event)
            if hold is None:
                self.write(data)
            else:
                held = self.held
                if held is None:
                    self.held = [data]
                    hold.append(self)
                else:
                    held.append(data)
        elif self.state is State.LIVE:
            self.last_seq = seq
            self._enqueue(event)
        # CATCHING_UP reads this event from history itself; CLOSED wants nothing.

    @property
    def position(self) -> int:
        """The seq after which this subscriber still needs events: everything up to it has been
        written or queued (or did not match)."""
        return self.cursor if self.state is State.CATCHING_UP else self.last_seq

    def resync(self, cursor: int, gap: str | None = None) -> bool:
        """The broker reloaded its store: catch up from the store after ``cursor``, as a resume
        does; reading finds and announces any hole after it (a ``history`` gap). ``gap`` sends
        a gap of that reason (``after`` unknown) first: the broker's data was lost ("epoch").
        Whether a gap was announced now; False if closed."""
        if self.state is State.CLOSED:
            return False
        announced = False
        if gap is not None and self.pending_gap is None:
            self.pending_gap = (None, gap)
            announced = True
        self.cursor = cursor
        if self.state is State.LIVE:
            self.set_state(State.CATCHING_UP)
        self.flush()
        return announced

    def release(self) -> None:
        """Write the frames held for the write window or a batch, in as few writes as flow
        control allows. The hub calls it when the window ends; the transport before anything
        else it writes (a reply, a close); ``flush`` when the transport drains.

        At most ``FLUSH_BYTES`` are joined into one write. Once the transport pauses, the rest is
        written a frame at a time, as it is: the frames are shared with every other subscriber of
        the batch, and the transport keeps references to what it cannot send, so a client that
        stopped reading holds no private copy of the batch. Nothing stays held, so whatever the
        transport writes next (a reply, a close) comes after these events."""
        held = self.held
        if held is None:  # a closed subscriber holds nothing: the hub's detach let it go
            return
        self.held = None
        start, count = 0, len(held)
        while start < count:
            end, size = start + 1, len(held[start])
            while end < count and size + len(held[end]) <= FLUSH_BYTES:
                size += len(held[end])
                end += 1
            if end - start > 1:
                self.merged += end - start - 1
                self.write(b"".join(held[start:end]))
            else:
                self.write(held[start])
            start = end
            if self.paused:
                for frame in held[start:]:
                    self.write(frame)
                return

    # -- flow control -----------------------------------------------------------------------

    def pause(self) -> None:
        """The transport's buffer is above its high-water mark."""
        self.paused = True
        self._refresh()

    def resume(self) -> None:
        """The transport drained: send what waited, in as few writes as possible."""
        self.paused = False
        self.flush()

    def flush(self) -> None:
        try:
            self.release()
            self._flush()
        finally:
            self._refresh()

    def _flush(self) -> None:
        steps = 0
        while not self.paused and self.state is not State.CLOSED:
            chunk: list[bytes] = []
            if self.pending_gap is not None:
                after, reason = self.pending_gap
                self.pending_gap = None
                chunk.append(self.sink.encode_gap(after, reason))
            if self.pending:
                self._take_pending(chunk)
            elif self.state is State.CATCHING_UP:
                steps += 1
                if steps > STEPS_PER_TURN and self._continue_later():
                    return
                caught = self.hub.catch_up(self, chunk, FLUSH_BYTES)
                self.sent += caught
                self.merged += max(0, caught - 1)
            elif not chunk:
                return
            if chunk:
                self.write(chunk[0] if len(chunk) == 1 else b"".join(chunk))

    def _continue_later(self) -> bool:
        """Let the loop serve others; the flush goes on at its next turn. False without a loop
        (a caller driving the hub synchronously), which then simply carries on."""
        if self.scheduled:
            return True
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        self.scheduled = True
        loop.call_soon(self._scheduled_flush)
        return True

    def _scheduled_flush(self) -> None:
        self.scheduled = False
        if self.state is not State.CLOSED:
            self.flush()

    def _take_pending(self, chunk: list[bytes]) -> None:
        size = taken = 0
        pending, encode, latest = self.pending, self.sink.encode, self.latest
        while pending and size < FLUSH_BYTES:
            event = pending.popleft()
            if latest is not None and event.policy is Policy.CONFLATE:
                if latest.get(event.topic) != event.seq:
                    self.stale -= 1  # superseded by a newer pending value
                    continue
                del latest[event.topic]
            data = encode(event)
            chunk.append(data)
            size += len(data)
            taken += 1
        self.sent += taken
        self.merged += max(0, taken - 1)
        if not pending:
            self.latest, self.stale = None, 0

    @property
    def backlog(self) -> int:
        """Events waiting, not counting superseded conflated values."""
        return len(self.pending) - self.stale

    # -- overflow ---------------------------------------------------------------------------

    def _enqueue(self, event: Event) -> None:
        # Only reached when not ``direct`` (see deliver), which stays so while anything waits.
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
