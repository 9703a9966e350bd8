"""The hub: validates events, hands them to the broker, fans accepted events out to subscribers.

It knows nothing of HTTP. Publishing is validated here, ordered and stored by the broker (which
keeps history and retained values in its :class:`~.store.Store`), then handed to every matching
subscriber synchronously: the publish path never awaits a client. What subscribers read of the
past (snapshots, catch-up, /api/events) is :class:`~.reading.Reader`'s.

    publish ─▶ Hub.draft ─▶ Broker.publish ─▶ Store.record ─▶ Hub._accept ─▶ routes ─▶ Subscriber
                                                  │
                       Reader (snapshot, since, /api/events) ◀─┘
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ..errors import BadRequest, Forbidden, PayloadTooLarge, RateLimited, TooManySubscriptions, TooManyTopics
from ..events import Event, Since, encode_data, format_id
from ..topics import Pattern, PatternIndex, is_system, validate_topic
from .broker import Broker, Charge, Draft, Fence, MemoryBroker
from .reading import Reader
from .routes import Route, WakeSink
from .stats import HubStats
from .store import Store
from .subscriber import Policy, State, Subscriber, Want
from .window import WriteWindow

__all__ = ["Hub", "HubConfig", "HubStats"]

log = logging.getLogger("stream.hub")

_PREFIX_LIMIT = 100


@dataclass(frozen=True)
class HubConfig:
    history_size: int = 10_000
    history_ttl: float | None = 3600.0  # seconds; None keeps events until history_size pushes them out
    history_bytes: int | None = 256 * 1024 * 1024  # every copy of an event counted (Event.size)
    max_event_bytes: int = 64 * 1024
    max_topics: int = 100_000  # topics with a retained value
    subscriber_buffer: int = 1000
    max_patterns: int = 100
    overflow: tuple[tuple[str, Policy], ...] = ()  # (pattern, policy), first match wins
    default_overflow: Policy = Policy.DISCONNECT
    # Write coalescing (.window): under load, the shortest window in which events accepted after
    # a fan-out are held and then written together, one write per socket. 0: off, every event is
    # written as it is accepted (the server setting, ServerSettings.write_delay, is on by default).
    write_delay: float = 0.0
    # Windows open when, 3 events in a row, the last writes took CPU for this share of the time
    # since the event before; 0: after every fan-out.
    write_load: float = 0.8


class Hub:
    def __init__(
        self,
        config: HubConfig | None = None,
        broker: Broker | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config = config or HubConfig()
        self.clock = clock
        if broker is None:
            store = Store(config.history_size, config.history_ttl, config.history_bytes, config.max_topics)
            broker = MemoryBroker(store, clock)
        self.broker = broker
        self.store = broker.store  # read only: the broker writes it
        self.broker.bind(self._accept, self._gap_all)
        self.stats = HubStats()
        self.reader = Reader(broker, self.stats)
        self.subscribers: set[Subscriber] = set()
        # Called with every event after its fan-out (``observe``): the latency histogram, /api/news.
        self.observers: list[Callable[[Event], None]] = []
        self.window = WriteWindow(config.write_delay, config.write_load, self._release) if config.write_delay > 0 else None
        self._routes: PatternIndex[Route] = PatternIndex()
        self._overflow: PatternIndex[tuple[int, Policy]] = PatternIndex()
        for rank, (text, policy) in reversed(list(enumerate(self.config.overflow))):
            self._overflow.add(text, (rank, policy))  # the first rule for a pattern wins

    # -- identity -------------------------------------------------------------------------

    @property
    def epoch(self) -> str:
        return self.broker.epoch

    @property
    def head_seq(self) -> int:
        return self.store.head_seq

    def id_of(self, seq: int) -> str:
        return format_id(self.epoch, seq)

    async def start(self) -> None:
        await self.broker.start()

    async def close(self) -> None:
        if self.window is not None:
            self.window.close()
        for sub in list(self.subscribers):
            self.detach(sub)
        await self.broker.close()

    def observe(self, callback: Callable[[Event], None]) -> None:
        """Call ``callback(event)`` after every accepted event's fan-out (never awaits)."""
        self.observers.append(callback)

    # -- publishing -----------------------------------------------------------------------

    def draft(self, topic: Any, data: Any, *, internal: bool = False, field: str = "topic") -> Draft:
        """Validate one event before it is published; raises a StreamError naming the field."""
        validate_topic(topic, field)
        if is_system(topic) and not internal:
            raise Forbidden(f"{field}: topics starting with '_' belong to the server and cannot be published to")
        data_json = encode_data(data)
        if len(data_json) > self.config.max_event_bytes:
            raise PayloadTooLarge(
                f"data: encodes to {len(data_json)} bytes, over max_event_bytes ({self.config.max_event_bytes})"
            )
        return Draft(topic, data, data_json)

    async def publish(self, topic: str, data: Any, *, internal: bool = False) -> Event:
        (event,) = await self.publish_many([self.draft(topic, data, internal=internal)])
        return event

    async def publish_many(self, drafts: list[Draft], *, fence: Fence | None = None, charge: Charge | None = None) -> list[Event]:
        """Publish validated drafts in order; all were validated before any is accepted.
        ``charge`` spends the publisher's rate, ``fence`` guards a provider's lease (see Broker)."""
        self._check_topics(drafts)
        try:
            return await self.broker.publish(drafts, fence=fence, charge=charge)
        except RateLimited:
            self.stats.rate_limited += 1
            raise

    def _check_topics(self, drafts: list[Draft]) -> None:
        new = self.store.new_topics(draft.topic for draft in drafts)
        if new and not self.store.has_room(len(new)):
            self.stats.topics_refused += 1
            raise TooManyTopics(
                f"topic: {sorted(new)[0]!r} would be a new topic, and the hub holds its maximum of "
                f"{self.config.max_topics} topics (max_topics); publish to an existing topic"
            )

    async def prime(self, drafts: list[Draft], *, fence: Fence | None = None) -> int:
        """Make ``drafts`` the retained values of topics that have none yet, publishing no event
        (a provider's first poll, SPEC §7). Returns how many topics got a value."""
        wanted = len(self.store.new_topics(draft.topic for draft in drafts))
        primed = await self.broker.prime(drafts, fence=fence)
        for event in primed:
            event.policy = self.policy_for(event.topic)
        self.stats.topics_refused += wanted - len(primed)
        return len(primed)

    async def settle(self) -> None:
        """Return once this node's history holds every event written before the call (see
        Broker.settle)."""
        await self.broker.settle()

    def policy_for(self, topic: str) -> Policy:
        rules = self._overflow.match(topic)
        return min(rules, key=lambda rule: rule[0])[1] if rules else self.config.default_overflow

    def _accept(self, events: list[Event]) -> None:
        """Called by the broker, in accept order, for every event of this hub (already in its
        store): out to every matching subscriber, before the publish call returns."""
        for event in events:
            self._count(event)
        window = self.window
        if window is None:
            self._write(events)
            return
        window.arrived()
        holding = window.holding
        if holding is not None:
            for event in events:  # inside a write window: held, and written when it ends
                self._fanout(event, holding)
                window.held()
            return
        since = time.thread_time()
        try:
            self._write(events)
        finally:
            window.wrote(since)

    def _write(self, events: list[Event]) -> None:
        if len(events) == 1:
            self._fanout(events[0], None)
            return
        # Several events: each subscriber's frames leave in one write (one syscall, not one each).
        batch: list[Subscriber] = []
        try:
            for event in events:
                self._fanout(event, batch)
        finally:
            self._release(batch)

    def _release(self, holding: list[Subscriber]) -> None:
        """Every subscriber in ``holding`` writes what it holds, one write each."""
        for sub in holding:
            try:
                sub.release()
            except Exception:
                self._failed(sub)
        holding.clear()

    def _gap_all(self, reason: str, read: int | None = None) -> None:
        """The broker reloaded its store after losing events: its data ("epoch": every subscriber
        is told, then reads everything the store now holds), or entries trimmed before this node
        read them ("history": each subscriber reads on from its own position, and is told of the
        hole after it when it meets it). ``read``: the last seq this node had read before the
        reload; a live subscriber had everything up to it that matched, however long ago its
        last event was."""
        trimmed = self.store.history.trimmed_seq
        for sub in list(self.subscribers):
            if reason == "epoch":
                if sub.resync(trimmed, "epoch"):
                    self.stats.gap(reason)
            elif sub.state is State.LIVE and read is not None:
                sub.resync(max(sub.position, read))
            else:
                sub.resync(sub.position)

    def _count(self, event: Event) -> None:
        event.policy = self.policy_for(event.topic)
        published = self.stats.published
        prefix = event.topic.split(".", 1)[0]
        if prefix not in published and len(published) >= _PREFIX_LIMIT:
            prefix = "other"  # publishers choose topics: keep the metric's label set bounded
        published[prefix] = published.get(prefix, 0) + 1

    def _fanout(self, event: Event, hold: list[Subscriber] | None) -> None:
        seq = event.seq
        for route in self._routes.match(event.topic):
            for encode, _transport, members in route.groups():
                frame = None
                for sub, symbols in members:
                    try:
                        # The hot path, inlined: live, writable, nothing waiting, no filter.
                        if sub.direct and symbols is None and seq > sub.last_seq:
                            if frame is None:
                                frame = encode(event)
                            sub.last_seq = seq
                            sub.sent += 1
                            if hold is None:
                                sub.write(frame)
                            elif (held := sub.held) is None:  # a batch or a write window, as in Subscriber.deliver
                                sub.held = [frame]
                                hold.append(sub)
                            else:
                                held.append(frame)
                        else:
                            if frame is None and sub.direct:
                                frame = encode(event)
                            sub.deliver(event, symbols, hold, frame)
                    except Exception:
                        self._failed(sub)  # a broken connection must not stop the fan-out to everyone else
        for observe in self.observers:
            try:
                observe(event)
            except Exception:
                log.exception("an observer of the hub failed on %s", event.topic)  # the fan-out goes on

    def _failed(self, sub: Subscriber) -> None:
        log.exception("delivery to a %s subscriber failed; detaching it", sub.transport_name)
        self.detach(sub)

    # -- subscribing ----------------------------------------------------------------------

    def new_subscriber(self, sink, *, transport: str = "") -> Subscriber:
        sub = Subscriber(self, sink, capacity=self.config.subscriber_buffer, transport=transport)
        self.subscribers.add(sub)
        return sub

    def subscribe(
        self,
        sub: Subscriber,
        patterns: list[str],
        *,
        since: Since | None = None,
        snapshot: bool = False,
        symbols: frozenset[str] | None = None,
        announce: Callable[[str], None] | None = None,
    ) -> str:
        """Add validated patterns to ``sub``; return the id after which it receives events.

        ``announce(position)`` runs after validation and before any event is written, so a
        transport can acknowledge the subscription ahead of its snapshot and replay. Snapshot
        and replay are written as the transport drains (``Subscriber.flush``), never at once.
        """
        if sub.state is State.CLOSED:
            raise BadRequest("subscriber is closed")
        new = [p for p in patterns if p not in sub.wants]
        limit = self.config.max_patterns
        if len(sub.wants) + len(new) > limit:
            raise TooManySubscriptions(
                f"topics: a connection may hold at most {limit} patterns; "
                f"it has {len(sub.wants)} and asked for {len(new)} more"
            )
        if since is not None and sub.started:
            raise BadRequest(
                "since: only a connection's first subscribe can replay history; "
                "put every pattern in that subscribe, or open a new connection"
            )
        cursor, gap = self.reader.resolve(since)
        if cursor > sub.last_seq:
            sub.last_seq = cursor  # resumed after an event this node has not read yet (Redis)
        position = self.id_of(cursor)
        if announce is not None:
            announce(position)
        wants = [Want(Pattern(text), cursor, symbols) for text in new]
        sub.started = True
        for text, want in zip(new, wants, strict=False):
            sub.wants[text] = want
            self._join(sub, text, want)
        if gap is not None:
            sub.pending_gap = gap
            self.stats.gap(gap[1])
        replay = since is not None and cursor < self.store.head_seq
        if snapshot and wants:
            sub.snapshots.append(self.reader.snapshot_scan(wants, cursor))
        if gap is not None or replay or sub.snapshots:
            if sub.state is State.LIVE:
                sub.cursor = cursor
                sub.set_state(State.CATCHING_UP)
            sub.flush()
        return position

    def _join(self, sub: Subscriber, text: str, want: Want) -> None:
        route = self._routes.get(text)
        if route is None:
            route = Route(want.pattern)
            self._routes.add(text, route)
        route.add(sub, want.symbols)

    def _leave(self, sub: Subscriber, text: str) -> None:
        route = self._routes.get(text)
        if route is None or not route.discard(sub):
            return
        if not route.members:
            self._routes.remove(text)

    def unsubscribe(self, sub: Subscriber, patterns: Iterable[str]) -> list[str]:
        removed = []
        for text in patterns:
            if sub.wants.pop(text, None) is not None:
                self._leave(sub, text)
                removed.append(text)
        if removed and sub.snapshots:
            # A snapshot still being written stops for the patterns just dropped.
            sub.snapshots = deque(scan for scan in sub.snapshots if scan.without(removed))
        return removed

    def detach(self, sub: Subscriber) -> None:
        """Remove ``sub`` from every route and mark it closed; idempotent."""
        for text in sub.wants:
            self._leave(sub, text)
        sub.wants.clear()
        if sub.state is not State.CLOSED:
            sub.set_state(State.CLOSED)
        if sub.held:  # counted as sent when held for the write window, and now never written
            sub.sent -= len(sub.held)
            sub.held = None
        if sub in self.subscribers:
            self.subscribers.discard(sub)
            closed = self.stats.sent_by_closed
            closed[sub.transport_name] = closed.get(sub.transport_name, 0) + sub.sent
            writes = self.stats.writes_by_closed
            writes[sub.transport_name] = writes.get(sub.transport_name, 0) + sub.sent - sub.merged
            self.stats.dropped_by_closed += sub.dropped + sub.backlog
        sub.pending.clear()
        sub.snapshots.clear()

    def catch_up(self, sub: Subscriber, chunk: list[bytes], budget: int) -> int:
        """One bounded step of ``sub``'s snapshot and replay (see ``Reader.catch_up``)."""
        return self.reader.catch_up(sub, chunk, budget)

    # -- reading --------------------------------------------------------------------------

    def subscriber_count(self, topic: str) -> int:
        routes = self._routes.match(topic)
        if len(routes) == 1:
            return len(routes[0].members)
        return len({sub for route in routes for sub in route.members})

    async def wait(
        self,
        patterns: list[str],
        since: Since | None,
        timeout: float,
        symbols: frozenset[str] | None = None,
        until: asyncio.Future[Any] | None = None,
    ) -> None:
        """Return when an event after ``since`` matches ``patterns``, after ``timeout`` s, or
        when ``until`` is done (the waiting client went away), whichever comes first."""
        done = asyncio.get_running_loop().create_future()
        sub = self.new_subscriber(WakeSink(done), transport="http")
        try:
            self.subscribe(sub, patterns, since=since, symbols=symbols)
            if not done.done():
                await asyncio.wait({done} if until is None else {done, until}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sub.close()
