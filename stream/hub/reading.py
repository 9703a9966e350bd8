"""The hub's reading side: where a subscriber starts, its snapshot and catch-up steps, and the
pages of /api/events, all read from the broker's :class:`~.store.Store`.

Every read does bounded work: a step examines at most ``SCAN_STEP`` items and stops once it has
``budget`` bytes, so whatever a client asks for, the loop runs others between its steps.
"""

from __future__ import annotations

from ..errors import BadRequest
from ..events import Event, Since, format_id
from ..topics import Pattern
from .broker import Broker
from .routes import Matcher
from .stats import HubStats
from .subscriber import SnapshotScan, State, Subscriber, Want

__all__ = ["READ_BYTES", "READ_SCAN", "SCAN_STEP", "Reader"]

# History events one catch-up or snapshot step examines before it lets the loop run others:
# a few milliseconds of matching, whatever a client asked for.
SCAN_STEP = 2048
# One /api/events answer: at most this many history events examined and this much event JSON;
# the answer's ``next`` continues where it stopped.
READ_SCAN = 5000
READ_BYTES = 1024 * 1024


class Reader:
    def __init__(self, broker: Broker, stats: HubStats) -> None:
        self.broker = broker
        self.stats = stats

    def id_of(self, seq: int) -> str:
        return format_id(self.broker.epoch, seq)

    def resolve(self, since: Since | None) -> tuple[int, tuple[str | None, str] | None]:
        """The seq after which a subscriber starts, and the gap to announce first, if any."""
        history = self.broker.store.history
        if since is None:
            return history.head_seq, None
        if since.time_ms is not None:
            cursor = history.seq_before_time(since.time_ms)
            if history.trimmed_seq and history.trimmed_ts >= since.time_ms:
                return cursor, (None, "history")
            return cursor, None
        assert since.seq is not None
        if since.epoch != self.broker.epoch:
            return history.trimmed_seq, (None, "epoch")
        if since.seq > history.head_seq:
            if self.broker.shared and self.broker.plausible(since.seq):
                # Another node accepted it and this one has not read it yet: start after it.
                return since.seq, None
            raise BadRequest(f"since: {since.text!r} is newer than the newest event of this hub")
        if since.seq < history.trimmed_seq:
            return history.trimmed_seq, (since.text, "history")
        return since.seq, None

    def snapshot_scan(self, wants: list[Want], cursor: int) -> SnapshotScan:
        """What a snapshot will walk: the named topics when every pattern is literal, else every
        topic known now (later topics are newer than ``cursor`` and come from history)."""
        store = self.broker.store
        if all(want.pattern.literal for want in wants):
            found = [store.retained[w.pattern.text] for w in wants if w.pattern.text in store.retained]
            topics = [event.topic for event in sorted(found, key=lambda event: event.seq)]
            return SnapshotScan(wants, Matcher, cursor, topics, len(topics))
        return SnapshotScan(wants, Matcher, cursor, None, len(store.topic_order))

    def catch_up(self, sub: Subscriber, chunk: list[bytes], budget: int) -> int:
        """One step of a catching-up subscriber: snapshot values, then history after
        ``sub.cursor``, appended to ``chunk`` up to ``budget`` bytes or ``SCAN_STEP`` items
        examined; turns ``sub`` live when it reaches the newest event. Returns how many events
        (values or history) it appended."""
        if sub.snapshots:
            done, count = self._snapshot_step(sub, chunk, budget)
            if not done:
                return count
        else:
            count = 0
        history = self.broker.store.history
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
                sub.last_seq = max(sub.last_seq, sub.cursor)
                sub.set_state(State.LIVE)
                return count
            index += 1
            sub.cursor = event.seq
            if matcher.accepts(event):
                data = encode(event)
                chunk.append(data)
                size += len(data)
                count += 1
                if size >= budget:
                    break
        return count

    def _snapshot_step(self, sub: Subscriber, chunk: list[bytes], budget: int) -> tuple[bool, int]:
        """Write the oldest pending snapshot's next values: (every snapshot done?, values written)."""
        store = self.broker.store
        scan = sub.snapshots[0]
        order = store.topic_order if scan.topics is None else scan.topics
        retained, encode = store.retained, sub.sink.encode_snapshot
        size = count = 0
        for _ in range(SCAN_STEP):
            if scan.index >= scan.end:
                sub.snapshots.popleft()
                if not sub.snapshots:
                    return True, count
                scan = sub.snapshots[0]
                order = store.topic_order if scan.topics is None else scan.topics
                continue
            if scan.index >= len(order):  # the store was emptied (a new epoch) under this scan
                scan.index = scan.end
                continue
            event = retained.get(order[scan.index])
            scan.index += 1
            if event is None:
                continue
            # A value newer than the subscribe point reaches the subscriber from history — unless
            # history no longer holds it, or it never went there (a primed value).
            fresh = event.seq > scan.cursor and event.seq > store.history.trimmed_seq and not event.primed
            if not fresh and scan.matcher.wants(event):
                data = encode(event)
                chunk.append(data)
                size += len(data)
                count += 1
                if size >= budget:
                    break
        return False, count

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
        history = self.broker.store.history
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
                position = max(position, history.head_seq)
                break
            index += 1
            position = event.seq
            if matcher.accepts(event):
                found.append(event)
                size += len(event.json)
                if len(found) >= limit or size >= READ_BYTES:
                    break
        return found, self.id_of(position), gap is not None
