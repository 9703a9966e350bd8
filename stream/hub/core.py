"""The hub: accepts events, keeps history and retained values, fans events out to subscribers.

It knows nothing of HTTP. Publishing is validated here, ordered by the broker, then handed to
every matching subscriber synchronously: the publish path never awaits a client.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ..errors import BadRequest, Forbidden, PayloadTooLarge, TooManySubscriptions
from ..events import Event, Since, encode_data, format_id
from ..topics import Pattern, is_system, validate_topic
from .broker import Broker, Draft, MemoryBroker
from .history import History
from .routes import Matcher, Route, WakeSink, symbols_ok
from .subscriber import Policy, State, Subscriber, _Want

__all__ = ["Hub", "HubConfig", "HubStats"]

log = logging.getLogger("stream.hub")

_ROUTE_CACHE_LIMIT = 50_000
_PREFIX_LIMIT = 100


@dataclass(frozen=True)
class HubConfig:
    history_size: int = 10_000
    history_ttl: float | None = 3600.0  # seconds; None keeps events until history_size pushes them out
    max_event_bytes: int = 64 * 1024
    subscriber_buffer: int = 1000
    max_patterns: int = 100
    overflow: tuple[tuple[str, Policy], ...] = ()  # (pattern, policy), first match wins
    default_overflow: Policy = Policy.DISCONNECT


@dataclass
class HubStats:
    published: dict[str, int] = field(default_factory=dict)  # by first topic segment
    delivered: dict[str, int] = field(default_factory=dict)  # by transport, written on the fast path
    slow_consumers: int = 0
    gaps: dict[str, int] = field(default_factory=dict)  # by reason
    sent_by_closed: dict[str, int] = field(default_factory=dict)  # deliveries of detached subscribers
    dropped_by_closed: int = 0

    def gap(self, reason: str) -> None:
        self.gaps[reason] = self.gaps.get(reason, 0) + 1


class Hub:
    def __init__(
        self,
        config: HubConfig | None = None,
        broker: Broker | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config or HubConfig()
        self.clock = clock
        self.broker = broker or MemoryBroker(clock)
        self.broker.bind(self._accept)
        ttl = self.config.history_ttl
        self.history = History(self.config.history_size, None if ttl is None else int(ttl * 1000))
        self.retained: dict[str, Event] = {}
        self.stats = HubStats()
        self.subscribers: set[Subscriber] = set()
        self.on_fanout: Callable[[Event], None] | None = None  # metrics hook, once per event
        self._patterns: dict[str, Route] = {}
        self._routes: dict[str, tuple[Route, ...]] = {}
        self._policies: dict[str, Policy] = {}
        self._overflow = [(Pattern(text), policy) for text, policy in self.config.overflow]

    # -- identity -------------------------------------------------------------------------

    @property
    def epoch(self) -> str:
        return self.broker.epoch

    @property
    def head_seq(self) -> int:
        return self.history.head_seq

    def id_of(self, seq: int) -> str:
        return format_id(self.epoch, seq)

    async def start(self) -> None:
        await self.broker.start()

    async def close(self) -> None:
        for sub in list(self.subscribers):
            self.detach(sub)
        await self.broker.close()

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
        (event,) = await self.broker.publish([self.draft(topic, data, internal=internal)])
        return event

    async def publish_many(self, drafts: list[Draft]) -> list[Event]:
        """Publish validated drafts in order; all were validated before any is accepted."""
        return await self.broker.publish(drafts)

    def policy_for(self, topic: str) -> Policy:
        policy = self._policies.get(topic)
        if policy is None:
            policy = next((p for pattern, p in self._overflow if pattern.matches(topic)), self.config.default_overflow)
            if len(self._policies) > _ROUTE_CACHE_LIMIT:
                self._policies.clear()
            self._policies[topic] = policy
        return policy

    def _accept(self, events: list[Event]) -> None:
        """Called by the broker, in accept order, for every event of this hub: into history,
        then out to every matching subscriber, before the publish call returns."""
        now_ms = int(self.clock() * 1000)
        for event in events:
            self._record(event, now_ms)
        if len(events) == 1:
            self._fanout(events[0], None)
            return
        # Several events: each subscriber's frames leave in one write (one syscall, not one each).
        batch: dict[Subscriber, list[bytes]] = {}
        for event in events:
            self._fanout(event, batch)
        for sub, frames in batch.items():
            if sub.direct:
                try:
                    sub._write(frames[0] if len(frames) == 1 else b"".join(frames))
                except Exception:
                    log.exception("delivery to a %s subscriber failed; detaching it", sub.transport_name)
                    self.detach(sub)

    def _record(self, event: Event, now_ms: int) -> None:
        event.policy = self.policy_for(event.topic)
        self.history.append(event, now_ms)
        self.retained[event.topic] = event
        published = self.stats.published
        prefix = event.topic.split(".", 1)[0]
        if prefix not in published and len(published) >= _PREFIX_LIMIT:
            prefix = "other"  # publishers choose topics: keep the metric's label set bounded
        published[prefix] = published.get(prefix, 0) + 1

    def _fanout(self, event: Event, batch: dict[Subscriber, list[bytes]] | None) -> None:
        routes = self._routes.get(event.topic)
        if routes is None:
            routes = self._route(event.topic)
        seq = event.seq
        delivered = self.stats.delivered
        for route in routes:
            for encode, transport, members in route.groups():
                frame = None
                sent = 0
                for sub, symbols in members:
                    try:
                        # The hot path, inlined: live, writable, nothing waiting, no filter.
                        if sub.direct and symbols is None and seq > sub.last_seq and batch is None:
                            if frame is None:
                                frame = encode(event)
                            sub.last_seq = seq
                            sub._write(frame)
                            sent += 1
                        else:
                            sub.deliver(event, symbols, batch)
                    except Exception:
                        # A broken connection must not stop the fan-out to everyone else.
                        log.exception("delivery to a %s subscriber failed; detaching it", sub.transport_name)
                        self.detach(sub)
                if sent:
                    delivered[transport] = delivered.get(transport, 0) + sent
        if self.on_fanout is not None:
            self.on_fanout(event)

    def _route(self, topic: str) -> tuple[Route, ...]:
        routes = tuple(route for route in self._patterns.values() if route.pattern.matches(topic))
        if len(self._routes) > _ROUTE_CACHE_LIMIT:
            self._routes.clear()
        self._routes[topic] = routes
        return routes

    # -- subscribing ----------------------------------------------------------------------

    def new_subscriber(self, sink, *, transport: str = "") -> Subscriber:
        sub = Subscriber(self, sink, capacity=self.config.subscriber_buffer, transport=transport)
        self.subscribers.add(sub)
        return sub

    def resolve(self, since: Since | None) -> tuple[int, tuple[str | None, str] | None]:
        """The seq after which a subscriber starts, and the gap to announce first, if any."""
        history = self.history
        if since is None:
            return history.head_seq, None
        if since.time_ms is not None:
            cursor = history.seq_before_time(since.time_ms)
            if history.trimmed_seq and history.trimmed_ts >= since.time_ms:
                return cursor, (None, "history")
            return cursor, None
        assert since.seq is not None
        if since.epoch != self.epoch:
            return history.trimmed_seq, (None, "epoch")
        if since.seq > history.head_seq:
            raise BadRequest(f"since: {since.text!r} is newer than the newest event of this hub")
        if since.seq < history.trimmed_seq:
            return history.trimmed_seq, (since.text, "history")
        return since.seq, None

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
        transport can acknowledge the subscription ahead of its snapshot and replay.
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
        cursor, gap = self.resolve(since)
        position = self.id_of(cursor)
        if announce is not None:
            announce(position)
        wants = [_Want(Pattern(text), cursor, symbols) for text in new]
        if snapshot:
            self._send_snapshot(sub, wants, cursor)
        sub.started = True
        for text, want in zip(new, wants):
            sub.wants[text] = want
            self._join(sub, text, want)
        if since is not None and (gap is not None or cursor < self.history.head_seq):
            if gap is not None:
                sub.pending_gap = gap
                self.stats.gap(gap[1])
            sub.cursor = cursor
            sub._set_state(State.CATCHING_UP)
            sub.flush()
        return position

    def _send_snapshot(self, sub: Subscriber, wants: list[_Want], cursor: int) -> None:
        found = [
            event
            for event in self.retained.values()
            if event.seq <= cursor and any(w.pattern.matches(event.topic) for w in wants) and symbols_ok(wants, event)
        ]
        found.sort(key=lambda event: event.seq)
        if not found:
            return
        if sub.direct:
            encode = sub.sink.encode_snapshot
            sub.sink.write(b"".join(encode(event) for event in found))
        else:
            # Events are waiting (or the socket is full): the snapshot queues behind them, in order.
            for event in found:
                sub.enqueue_retained(event)

    def _join(self, sub: Subscriber, text: str, want: _Want) -> None:
        route = self._patterns.get(text)
        if route is None:
            route = self._patterns[text] = Route(want.pattern)
            self._routes.clear()
        route.members[sub] = want.symbols
        route._groups = None

    def _leave(self, sub: Subscriber, text: str) -> None:
        route = self._patterns.get(text)
        if route is None or sub not in route.members:
            return
        del route.members[sub]
        route._groups = None
        if not route.members:
            del self._patterns[text]
            self._routes.clear()

    def unsubscribe(self, sub: Subscriber, patterns: Iterable[str]) -> list[str]:
        removed = []
        for text in patterns:
            if sub.wants.pop(text, None) is not None:
                self._leave(sub, text)
                removed.append(text)
        return removed

    def detach(self, sub: Subscriber) -> None:
        """Remove ``sub`` from every route and mark it closed; idempotent."""
        for text in sub.wants:
            self._leave(sub, text)
        sub.wants.clear()
        if sub.state is not State.CLOSED:
            sub._set_state(State.CLOSED)
        if sub in self.subscribers:
            self.subscribers.discard(sub)
            closed = self.stats.sent_by_closed
            closed[sub.transport_name] = closed.get(sub.transport_name, 0) + sub.sent
            self.stats.dropped_by_closed += sub.dropped + sub.backlog
        sub.pending.clear()

    def _catch_up(self, sub: Subscriber, chunk: list[bytes], budget: int) -> None:
        """Append history after ``sub.cursor`` to ``chunk``; turn ``sub`` live at the end."""
        history = self.history
        if sub.cursor < history.trimmed_seq:
            # History moved past this reader while it was catching up.
            chunk.append(sub.sink.encode_gap(self.id_of(sub.cursor), "history"))
            self.stats.gap("history")
            sub.cursor = history.trimmed_seq
        index = history.index_after(sub.cursor)
        matcher = Matcher(list(sub.wants.values()))
        encode = sub.sink.encode
        size = 0
        while size < budget:
            event = history.at(index)
            if event is None:
                # Caught up: every later event is newer than the head and arrives live.
                sub._set_state(State.LIVE)
                return
            index += 1
            sub.cursor = event.seq
            if matcher.accepts(event):
                data = encode(event)
                chunk.append(data)
                size += len(data)
                sub.sent += 1

    # -- reading --------------------------------------------------------------------------

    def subscriber_count(self, topic: str) -> int:
        routes = self._routes.get(topic)
        if routes is None:
            routes = self._route(topic)
        if len(routes) == 1:
            return len(routes[0].members)
        return len({sub for route in routes for sub in route.members})

    def read(
        self,
        patterns: list[str],
        since: Since | None,
        limit: int,
        symbols: frozenset[str] | None = None,
    ) -> tuple[list[Event], str, bool]:
        """History for ``/api/events``: (events oldest first, next position, gap?)."""
        matcher = Matcher([_Want(Pattern(text), 0, symbols) for text in patterns])
        history = self.history
        if since is None:
            found: list[Event] = []
            for event in reversed(history.after(history.trimmed_seq)):
                if matcher.accepts(event):
                    found.append(event)
                    if len(found) >= limit:
                        break
            found.reverse()
            return found, self.id_of(history.head_seq), False
        cursor, gap = self.resolve(since)
        found = []
        position = history.head_seq
        for event in history.after(cursor):
            if matcher.accepts(event):
                found.append(event)
                if len(found) >= limit:
                    position = event.seq
                    break
        return found, self.id_of(position), gap is not None

    async def wait(
        self,
        patterns: list[str],
        since: Since | None,
        timeout: float,
        symbols: frozenset[str] | None = None,
    ) -> None:
        """Return when an event after ``since`` matches ``patterns``, or after ``timeout`` s."""
        done = asyncio.get_running_loop().create_future()
        sub = self.new_subscriber(WakeSink(done), transport="http")
        try:
            self.subscribe(sub, patterns, since=since, symbols=symbols)
            if not done.done():
                await asyncio.wait_for(asyncio.shield(done), timeout)
        except TimeoutError:
            pass
        finally:
            sub.close()
