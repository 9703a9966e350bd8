"""The hub: accepts events, keeps history and retained values, fans events out to subscribers.

It knows nothing of HTTP. Publishing is validated here, ordered by the broker, then handed to
every matching subscriber synchronously: the publish path never awaits a client.

Over 400 lines, for now: besides publishing and routing it holds the reading side (snapshots,
catch-up steps, ``read`` for /api/events, topic pages), which works on the same history and
retained values. That side is the next to move out, behind the broker seam the Redis broker
needs (history and retained values then live in the broker).
"""

from __future__ import annotations

import asyncio
import logging
import time
from bisect import bisect_right, insort
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ..errors import BadRequest, Forbidden, PayloadTooLarge, TooManySubscriptions, TooManyTopics
from ..events import Event, Since, encode_data, format_id
from ..topics import Pattern, PatternIndex, is_system, validate_topic
from .broker import Broker, Draft, MemoryBroker
from .history import History
from .routes import Matcher, Route, WakeSink
from .stats import HubStats
from .subscriber import Policy, SnapshotScan, State, Subscriber, Want

__all__ = ["Hub", "HubConfig", "HubStats"]

log = logging.getLogger("stream.hub")

_PREFIX_LIMIT = 100
# History events one catch-up or snapshot step examines before it lets the loop run others:
# a few milliseconds of matching, whatever a client asked for.
SCAN_STEP = 2048
# One /api/events answer: at most this many history events examined and this much event JSON;
# the answer's ``next`` continues where it stopped.
READ_SCAN = 5000
READ_BYTES = 1024 * 1024


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
        self.history = History(self.config.history_size, None if ttl is None else int(ttl * 1000), self.config.history_bytes)
        self.retained: dict[str, Event] = {}
        # Topics in the order they were first published: a snapshot walks it lazily by index,
        # since retained topics are never removed.
        self.topic_order: list[str] = []
        self._sorted_topics: list[str] = []  # the same, sorted: /api/topics pages through it
        self.retained_bytes = 0
        self.stats = HubStats()
        self.subscribers: set[Subscriber] = set()
        self.on_fanout: Callable[[Event], None] | None = None  # metrics hook, once per event
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
        (event,) = await self.publish_many([self.draft(topic, data, internal=internal)])
        return event

    async def publish_many(self, drafts: list[Draft]) -> list[Event]:
        """Publish validated drafts in order; all were validated before any is accepted."""
        self._check_topics(drafts)
        return await self.broker.publish(drafts)

    def _check_topics(self, drafts: list[Draft]) -> None:
        retained = self.retained
        new = {draft.topic for draft in drafts if draft.topic not in retained}
        if new and len(retained) + len(new) > self.config.max_topics:
            self.stats.topics_refused += 1
            raise TooManyTopics(
                f"topic: {sorted(new)[0]!r} would be a new topic, and the hub holds its maximum of "
                f"{self.config.max_topics} topics (max_topics); publish to an existing topic"
            )

    def prime(self, drafts: list[Draft]) -> int:
        """Make ``drafts`` the retained values of topics that have none yet, publishing no event
        (a provider's first poll, SPEC §7); the last draft of a topic wins. Each value is stamped
        with the current position: it is a state as of now, not a point in history. Returns how
        many topics got a value."""
        latest = {draft.topic: draft for draft in drafts if draft.topic not in self.retained}
        seq, now_ms = self.head_seq, int(self.clock() * 1000)
        primed = 0
        for topic, draft in latest.items():
            if len(self.retained) >= self.config.max_topics:
                self.stats.topics_refused += 1
                continue
            event = Event(seq, self.id_of(seq), topic, now_ms, draft.data, draft.data_json)
            event.policy = self.policy_for(topic)
            event.primed = True
            self._retain(event)
            primed += 1
        return primed

    def policy_for(self, topic: str) -> Policy:
        rules = self._overflow.match(topic)
        return min(rules, key=lambda rule: rule[0])[1] if rules else self.config.default_overflow

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
                    sub.write(frames[0] if len(frames) == 1 else b"".join(frames))
                except Exception:
                    log.exception("delivery to a %s subscriber failed; detaching it", sub.transport_name)
                    self.detach(sub)

    def _record(self, event: Event, now_ms: int) -> None:
        event.policy = self.policy_for(event.topic)
        self.history.append(event, now_ms)
        self._retain(event)
        published = self.stats.published
        prefix = event.topic.split(".", 1)[0]
        if prefix not in published and len(published) >= _PREFIX_LIMIT:
            prefix = "other"  # publishers choose topics: keep the metric's label set bounded
        published[prefix] = published.get(prefix, 0) + 1

    def _retain(self, event: Event) -> None:
        previous = self.retained.get(event.topic)
        if previous is None:
            self.topic_order.append(event.topic)
            insort(self._sorted_topics, event.topic)
        else:
            self.retained_bytes -= previous.size
        self.retained[event.topic] = event
        self.retained_bytes += event.size

    def _fanout(self, event: Event, batch: dict[Subscriber, list[bytes]] | None) -> None:
        seq = event.seq
        delivered = self.stats.delivered
        for route in self._routes.match(event.topic):
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
                            sub.write(frame)
                            sent += 1
                        else:
                            if frame is None and sub.direct:
                                frame = encode(event)
                            sub.deliver(event, symbols, batch, frame)
                    except Exception:
                        # A broken connection must not stop the fan-out to everyone else.
                        log.exception("delivery to a %s subscriber failed; detaching it", sub.transport_name)
                        self.detach(sub)
                if sent:
                    delivered[transport] = delivered.get(transport, 0) + sent
        if self.on_fanout is not None:
            self.on_fanout(event)

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
        cursor, gap = self.resolve(since)
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
        replay = since is not None and cursor < self.history.head_seq
        if snapshot and wants:
            sub.snapshots.append(self._snapshot_scan(wants, cursor))
        if gap is not None or replay or sub.snapshots:
            if sub.state is State.LIVE:
                sub.cursor = cursor
                sub.set_state(State.CATCHING_UP)
            sub.flush()
        return position

    def _snapshot_scan(self, wants: list[Want], cursor: int) -> SnapshotScan:
        """What a snapshot will walk: the named topics when every pattern is literal, else every
        topic known now (later topics are newer than ``cursor`` and come from history)."""
        if all(want.pattern.literal for want in wants):
            found = [self.retained[w.pattern.text] for w in wants if w.pattern.text in self.retained]
            topics = [event.topic for event in sorted(found, key=lambda event: event.seq)]
            return SnapshotScan(wants, Matcher, cursor, topics, len(topics))
        return SnapshotScan(wants, Matcher, cursor, None, len(self.topic_order))

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
        if sub in self.subscribers:
            self.subscribers.discard(sub)
            closed = self.stats.sent_by_closed
            closed[sub.transport_name] = closed.get(sub.transport_name, 0) + sub.sent
            self.stats.dropped_by_closed += sub.dropped + sub.backlog
        sub.pending.clear()
        sub.snapshots.clear()

    def catch_up(self, sub: Subscriber, chunk: list[bytes], budget: int) -> None:
        """One step of a catching-up subscriber: snapshot values, then history after
        ``sub.cursor``, appended to ``chunk`` up to ``budget`` bytes or ``SCAN_STEP`` items
        examined; turns ``sub`` live when it reaches the newest event."""
        if sub.snapshots and not self._snapshot_step(sub, chunk, budget):
            return
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
        for _ in range(SCAN_STEP):
            event = history.at(index)
            if event is None:
                # Caught up: every later event is newer than the head and arrives live.
                sub.set_state(State.LIVE)
                return
            index += 1
            sub.cursor = event.seq
            if matcher.accepts(event):
                data = encode(event)
                chunk.append(data)
                size += len(data)
                sub.sent += 1
                if size >= budget:
                    return

    def _snapshot_step(self, sub: Subscriber, chunk: list[bytes], budget: int) -> bool:
        """Write the oldest pending snapshot's next values; True once every snapshot is done."""
        scan = sub.snapshots[0]
        order = self.topic_order if scan.topics is None else scan.topics
        retained, encode = self.retained, sub.sink.encode_snapshot
        size = 0
        for _ in range(SCAN_STEP):
            if scan.index >= scan.end:
                sub.snapshots.popleft()
                if not sub.snapshots:
                    return True
                scan = sub.snapshots[0]
                order = self.topic_order if scan.topics is None else scan.topics
                continue
            event = retained[order[scan.index]]
            scan.index += 1
            # A value newer than the subscribe point reaches the subscriber from history — unless
            # history no longer holds it, or it never went there (a primed value).
            fresh = event.seq > scan.cursor and event.seq > self.history.trimmed_seq and not event.primed
            if not fresh and scan.matcher.wants(event):
                data = encode(event)
                chunk.append(data)
                size += len(data)
                sub.sent += 1
                if size >= budget:
                    return False
        return False

    # -- reading --------------------------------------------------------------------------

    def topics_after(self, after: str, count: int) -> tuple[list[str], bool]:
        """Up to ``count`` retained topics sorted after ``after``, and whether more follow."""
        start = bisect_right(self._sorted_topics, after)
        names = self._sorted_topics[start : start + count]
        return names, start + count < len(self._sorted_topics)

    def subscriber_count(self, topic: str) -> int:
        routes = self._routes.match(topic)
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
        """History for ``/api/events``: (events oldest first, next position, gap?).

        At most ``READ_SCAN`` history events are examined and ``READ_BYTES`` of events returned;
        ``next`` is where a further request continues.
        """
        matcher = Matcher([Want(Pattern(text), 0, symbols) for text in patterns])
        history = self.history
        found: list[Event] = []
        size = 0
        if since is None:
            index = history.end()
            for _ in range(READ_SCAN):
                event = history.before(index)
                if event is None:
                    break
                index -= 1
                if matcher.accepts(event):
                    found.append(event)
                    size += len(event.json)
                    if len(found) >= limit or size >= READ_BYTES:
                        break
            found.reverse()
            return found, self.id_of(history.head_seq), False
        cursor, gap = self.resolve(since)
        position = cursor
        index = history.index_after(cursor)
        for _ in range(READ_SCAN):
            event = history.at(index)
            if event is None:
                position = history.head_seq
                break
            index += 1
            position = event.seq
            if matcher.accepts(event):
                found.append(event)
                size += len(event.json)
                if len(found) >= limit or size >= READ_BYTES:
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
