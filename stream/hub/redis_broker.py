"""The Redis broker (SPEC §10): any number of processes on any number of hosts, one hub.

The keys it keeps in Redis, and the scripts that write them, are in ``redis_scripts``.

An event's seq is its entry id ``<ms>-<n>`` as ``ms * 1_000_000 + n``: global, strictly
increasing on every node, and its ``ts`` is the ``ms`` (Redis's clock, one for all nodes).

Each node runs one reader task (XREAD BLOCK from the last entry id it read). What it reads goes
into this node's :class:`~.store.Store` and then to the hub's fan-out; replay, ``since``,
/api/events and snapshots are served from that store, which mirrors the stream (loaded with
XREVRANGE and HSCAN when the node connects): no subscriber ever causes Redis traffic. A publish
returns once its XADD succeeded and this node's reader has seen it (read-your-writes on a node).

Losing Redis (refused, or hung: see ``redis_link``): every command is bounded by
``redis_timeout``, and from the first failed health check ``problem()`` says so (``/readyz``
503) and publishes get ``BrokerUnavailable`` (503 with Retry-After) at once; subscribers stay
connected. The reader rejoins when Redis answers again and goes on from its last entry id, so
every event accepted meanwhile (by other nodes) arrives once. If the epoch key is gone when it
comes back (FLUSHALL, a new Redis), a new epoch starts: the store is emptied and every
subscriber is sent an ``epoch`` gap.

Falling behind: the stream is trimmed to about ``history_size`` entries, so a node that stops
reading for a while (a stalled process, a slow link) can find entries gone that it never read.
Entries are numbered, so the reader sees the hole at the first entry it reads after it: it
reloads its store from Redis, and every subscriber is sent a ``history`` gap after the last event
it got, then what the store still holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from typing import Any

import orjson
from redis.exceptions import RedisError, ResponseError

from ..errors import BrokerUnavailable, LeaseLost
from ..events import Event, format_id, new_epoch
from .broker import Broker, Charge, Draft, Fence
from .redis_link import RedisLink, redis_failure
from .redis_scripts import PREFIX, PUBLISH
from .store import Store

__all__ = ["RedisBroker", "seq_of"]

log = logging.getLogger("stream.broker")

EPOCH, EVENTS, RETAINED, COUNT = PREFIX + "epoch", PREFIX + "events", PREFIX + "retained", PREFIX + "count"
RATE = PREFIX + "rate:"
READ_BLOCK_MS = 1000  # one XREAD waits this long for new entries before checking the epoch
READ_COUNT = 200  # entries one XREAD returns at most: one fan-out batch, 12 MiB at most of 64 KiB events
SEEN_WAIT = 2.0  # seconds a publish waits for this node's reader to see its events
# Seconds between the reader's attempts to rejoin, the last repeated; it also tries at once
# when the health check finds Redis answering again.
BACKOFF = (0.1, 0.2, 0.5, 1.0)
POOL_SIZE = 32  # connections for publishes; more publishes at once wait (at most redis_timeout) for one
LOAD_PAGE = 200  # entries one XREVRANGE reads when loading history: each answer (12 MiB at most) comes within redis_timeout
FUTURE_SLACK_MS = 60_000  # a `since` id may be this far ahead of this node's clock (skew, lag)

def seq_of(entry_id: bytes | str) -> int:
    """A stream entry id ``<ms>-<n>`` as one strictly increasing integer."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, n = text.partition("-")
    return int(ms) * 1_000_000 + int(n)


def _number(fields: dict[bytes, bytes]) -> int | None:
    """An entry's number (None for one written before entries were numbered)."""
    value = fields.get(b"n")
    return None if value is None else int(value)


class RedisBroker(Broker):
    shared = True  # other nodes publish too: an id may be newer than what this node has read

    def __init__(
        self,
        url: str,
        store: Store,
        *,
        history_size: int,
        history_ttl: float | None,
        timeout: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.epoch = new_epoch()  # until the one in Redis is known
        # Containers on one host network may share hostname and pid: the token keeps nodes apart.
        self.node = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self._maxlen = history_size
        self._ttl_ms = 0 if history_ttl is None else int(history_ttl * 1000)
        self._clock = clock
        self._wake = asyncio.Event()  # the health check's verdict changed: the reader retries at once
        self.link = RedisLink(url, timeout, on_change=self._wake.set)
        self.redis: Any = self.link.client(POOL_SIZE)
        self.connections = POOL_SIZE + 2  # the pool, the reader and the health check: descriptors the server keeps
        self._reader_redis: Any = self.link.blocking_client(READ_BLOCK_MS / 1000)
        self._script = self.redis.register_script(PUBLISH)
        self._last_id = "0-0"
        self._last_n: int | None = None  # the number of the last entry read (None: unknown)
        self._behind = False  # entries after the last one read were trimmed before it read them
        self._unjoined: str | None = "connecting to Redis"  # why the reader is not reading (None: it is)
        self._ever_joined = False
        self._task: asyncio.Task[None] | None = None
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._waiter_count = 0
        self._resync = asyncio.Event()
        self._closing = False
        self._next_check = 0.0
        # Read by the metrics collector.
        self.reconnects = 0
        self.epoch_changes = 0
        self.last_read_seq = 0
        self.last_written_seq = 0  # newest entry this node knows was written (its own or read)

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        await self.link.start()
        if self.link.problem is None:
            try:
                await self._connect()
            except RedisError as exc:
                self._unjoin(exc)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="redis reader")

    async def close(self) -> None:
        self._closing = True  # redis-py may turn the cancellation of a read into a ConnectionError
        if self._task is not None:
            self._task.cancel()
            # A read cancelled inside redis-py may wait on its socket: closing the clients ends it.
            await asyncio.wait({self._task}, timeout=1)
        await self.link.close()
        for client in (self.redis, self._reader_redis):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.aclose(), 2)
        if self._task is not None:
            await asyncio.wait({self._task}, timeout=2)

    def problem(self) -> str | None:
        """Why publishing is refused now: Redis does not answer the health check, or this node's
        reader has not (re)joined the stream. None when both are fine."""
        return self.link.problem or self._unjoined

    # -- publishing -----------------------------------------------------------------------

    async def publish(self, drafts: list[Draft], *, fence: Fence | None = None, charge: Charge | None = None) -> list[Event]:
        if not drafts:
            return []
        ids = await self._call(drafts, prime=False, fence=fence, charge=charge)
        events = []
        for draft, entry in zip(drafts, ids, strict=True):
            events.append(self._make(entry, draft.topic, draft.data, draft.data_json))
        await self._seen(events[-1].seq)
        return events

    async def prime(self, drafts: list[Draft], *, fence: Fence | None = None) -> list[Event]:
        latest = {draft.topic: draft for draft in drafts if draft.topic not in self.store.retained}
        room = max(0, self.store.max_topics - len(self.store.retained))
        latest = dict(list(latest.items())[:room])
        if not latest:
            return []
        ids = await self._call(list(latest.values()), prime=True, fence=fence)
        written = [seq_of(entry) for entry in ids if entry]
        if written:
            await self._seen(max(written))
        return [self.store.retained[topic] for topic, entry in zip(latest, ids, strict=True) if entry and topic in self.store.retained]

    async def _call(self, drafts: list[Draft], *, prime: bool, fence: Fence | None = None, charge: Charge | None = None) -> list[bytes]:
        problem = self.problem()
        if problem is not None:
            raise BrokerUnavailable(f"broker: {problem}; retry shortly", retry_after=1)
        keys = [EVENTS, RETAINED, EPOCH, COUNT, fence.key if fence else PREFIX + "fence", RATE + (charge.bucket if charge else "")]
        args: list[Any] = [self.epoch, self._maxlen, self._ttl_ms, "1" if prime else "0", fence.token if fence else ""]
        args += [charge.rate, charge.burst, charge.count] if charge else ["", "", ""]
        args.append(self.link.deadline())
        for draft in drafts:
            args += [draft.topic, draft.data_json]
        try:
            # The whole call, a wait for a pooled connection and a reconnect included.
            async with asyncio.timeout(self.link.timeout):
                ids = await self._script(keys=keys, args=args)
        except ResponseError as exc:
            raise self._refused(str(exc), charge) from None
        except (RedisError, OSError, TimeoutError) as exc:
            # This publish fails alone; whether Redis is down is the health check's verdict.
            raise self._late(redis_failure(exc)) from None
        written = [seq_of(entry) for entry in ids if entry]
        if written:
            self.last_written_seq = max(self.last_written_seq, max(written))
        return ids

    def _late(self, why: str) -> BrokerUnavailable:
        # Redis refuses the script past its deadline, which comes before this node gave up:
        # a publish answered so was not accepted, and may be sent again.
        return BrokerUnavailable(
            f"broker: Redis did not answer within {self.link.timeout:g} s ({why}); the event was not accepted; retry shortly",
            retry_after=1,
        )

    def _refused(self, reply: str, charge: Charge | None) -> Exception:
        """The publish script's refusals as the hub's errors (anything else is a bug: re-raised)."""
        if reply.startswith("STREAMLATE"):
            return self._late("it ran the publish too late")
        if reply.startswith("STREAMRATE") and charge is not None:
            return charge.refused(float(reply.split()[1]))
        if reply.startswith("STREAMFENCED"):
            return LeaseLost("the provider's lease passed to another node; this node's poll is discarded")
        if reply.startswith("STREAMEPOCH"):
            self._resync.set()  # the reader starts the new epoch
            return BrokerUnavailable("broker: Redis lost its data and a new epoch is starting; retry", retry_after=1)
        return ResponseError(reply)

    async def _seen(self, seq: int) -> bool:
        """Wait (briefly) until this node's reader has passed ``seq``: read-your-writes. False
        if it has not by then (accepted in Redis all the same; the reader delivers it when it can)."""
        if self.last_read_seq >= seq:
            return True
        future = asyncio.get_running_loop().create_future()
        self._waiter_count += 1
        heapq.heappush(self._waiters, (seq, self._waiter_count, future))
        try:
            await asyncio.wait_for(asyncio.shield(future), SEEN_WAIT)
        except TimeoutError:
            return False
        return True

    async def settle(self) -> None:
        try:
            async with asyncio.timeout(self.link.timeout):
                newest = await self.redis.xrevrange(EVENTS, count=1)
        except (RedisError, OSError, TimeoutError) as exc:
            raise BrokerUnavailable(f"broker: could not read the end of the stream ({redis_failure(exc)}); retry shortly", retry_after=1) from None
        if newest and not await self._seen(seq_of(newest[0][0])):
            raise BrokerUnavailable("broker: this node has not read the stream up to its end yet; retry shortly", retry_after=1)

    # -- reading --------------------------------------------------------------------------

    async def _run(self) -> None:
        failures = 0
        while not self._closing:
            try:
                if self._unjoined is not None or self._resync.is_set():
                    await self._connect()
                    failures = 0
                reply = await self._reader_redis.xread({EVENTS: self._last_id}, count=READ_COUNT, block=READ_BLOCK_MS)
                if reply:
                    self._apply(reply[0][1])
                if not reply or time.monotonic() >= self._next_check:
                    await self._check()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                if self._closing:
                    return
                self._unjoin(exc)
                await self._retry_after(BACKOFF[min(failures, len(BACKOFF) - 1)])
                failures += 1
            except Exception:
                log.exception("the Redis reader failed; restarting it")
                self._unjoined = "the Redis reader failed (see the log)"
                await self._retry_after(BACKOFF[-1])

    async def _retry_after(self, delay: float) -> None:
        """Sleep ``delay`` seconds, or less if the health check finds Redis answering again."""
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), delay)

    def _unjoin(self, exc: BaseException) -> None:
        if self._unjoined is None:
            log.info("broker: the Redis reader lost the stream (%s); it rejoins when Redis answers", redis_failure(exc))
        self._unjoined = f"Redis unreachable: {redis_failure(exc)}"

    async def _check(self) -> None:
        """Once a second: is the epoch still ours (FLUSHALL), and how far is the stream ahead?"""
        self._next_check = time.monotonic() + READ_BLOCK_MS / 1000
        async with self.redis.pipeline(transaction=False) as pipe:
            epoch, newest = await pipe.get(EPOCH).xrevrange(EVENTS, count=1).execute()
        if epoch != self.epoch.encode():
            self._resync.set()
        elif newest:
            self.last_written_seq = max(self.last_written_seq, seq_of(newest[0][0]))

    def plausible(self, seq: int) -> bool:
        """Whether ``seq`` (from a client's ``since``) could be an entry another node wrote:
        not beyond this node's clock by more than FUTURE_SLACK_MS."""
        return seq // 1_000_000 <= self._clock() * 1000 + FUTURE_SLACK_MS

    def lag(self) -> float:
        return max(0, self.last_written_seq // 1_000_000 - self.last_read_seq // 1_000_000) / 1000

    async def _connect(self) -> None:
        """(Re)join the hub: adopt or create its epoch. On a new epoch (or when the stream was
        trimmed past the last entry read) the store is reloaded from Redis and every subscriber is
        told; otherwise reading goes on from the last entry read."""
        self._resync.clear()
        reconnect = self._unjoined is not None and self._ever_joined  # not a resync on a live link
        await self.redis.set(EPOCH, new_epoch(), nx=True)
        epoch = (await self.redis.get(EPOCH)).decode()
        if epoch != self.epoch:
            await self._load(epoch)  # switches epoch and store only once all of it was read
            if self._ever_joined:
                self.epoch_changes += 1
                log.warning("broker: Redis has a new epoch %s (its data was lost); subscribers get an epoch gap", epoch)
            self._announce_gap("epoch")  # subscribers that came while Redis was away included
        elif self._behind or (self._last_id != "0-0" and await self._trimmed_past_last_read()):
            log.warning("broker: the stream was trimmed past this node's last read entry %s (it fell behind); reloading", self._last_id)
            read = self.last_read_seq
            await self._load(epoch)
            self._announce_gap("history", read)
        self._behind = False
        if reconnect:
            self.reconnects += 1
            log.info("broker: connected to Redis again; reading on from entry %s", self._last_id)
        elif not self._ever_joined:
            log.info("broker: connected to Redis, epoch %s, node %s", self.epoch, self.node)
        self._ever_joined = True
        self._unjoined = None

    async def _load(self, epoch: str) -> None:
        """Fill the store from Redis: the newest ``history_size`` entries of ``epoch`` and every
        retained value. Nothing changes here until all of it has been read."""
        newest = await self._newest(self._maxlen + 1)
        trimmed = (0, 0)
        if len(newest) > self._maxlen:
            gone = seq_of(newest.pop()[0])
            trimmed = (gone, gone // 1_000_000)
        elif newest:
            info = await self.redis.xinfo_stream(EVENTS)
            if info.get("entries-added", len(newest)) > len(newest):
                first = seq_of(newest[-1][0]) - 1  # some entry before the first is gone; which, unknown
                trimmed = (first, first // 1_000_000)
        # With nothing in the stream (trimmed by age), the entry count says which number comes
        # next: entries written and trimmed before this node reads again are then a hole too.
        count = None if newest else int(await self.redis.get(COUNT) or 0)
        values = []
        cursor: int | bytes = 0
        while True:
            cursor, found = await self.redis.hscan(RETAINED, cursor, count=1000)
            values += list(found.items())
            if not cursor:
                break
        self.epoch = epoch
        history = [event for event in map(self._event, reversed(newest)) if not event.primed]
        retained = [self._retained(topic, value) for topic, value in values]
        self.store.clear()
        self.store.load(history, retained, trimmed, int(self._clock() * 1000))
        self._last_id = newest[0][0].decode() if newest else "0-0"
        self._last_n = _number(newest[0][1]) if newest else count
        self.last_read_seq = seq_of(self._last_id)
        self.last_written_seq = max(self.last_written_seq, self.last_read_seq)
        log.info("broker: loaded %d events and %d retained values from Redis", len(history), len(retained))

    async def _newest(self, count: int) -> list[tuple[bytes, dict[bytes, bytes]]]:
        """The newest ``count`` entries, newest first, read a page at a time (a 10,000-entry
        history in one answer could take longer than ``redis_timeout`` to arrive)."""
        entries: list[tuple[bytes, dict[bytes, bytes]]] = []
        top = "+"
        while len(entries) < count:
            want = min(LOAD_PAGE, count - len(entries))
            page = await self.redis.xrevrange(EVENTS, max=top, count=want)
            entries += page
            if len(page) < want:
                break
            top = f"({page[-1][0].decode()}"
        return entries

    async def _trimmed_past_last_read(self) -> bool:
        """Whether entries after the last one read are gone (Redis trimmed while we were away)."""
        after = await self.redis.xrange(EVENTS, min=f"({self._last_id}", count=1)
        if not after:
            return False
        before = await self.redis.xrevrange(EVENTS, max=self._last_id, count=1)
        if before:
            return False  # the last entry read, or one before it, is still there: nothing lost between
        info = await self.redis.xinfo_stream(EVENTS)
        return info.get("entries-added", 0) > info.get("length", 0)

    def _apply(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        events: list[Event] = []
        primed: list[Event] = []
        mine = self.epoch.encode()
        for index, (entry_id, fields) in enumerate(entries):
            if fields.get(b"e", mine) != mine:
                # Written in a new epoch (Redis lost its data): reload before delivering anything of it.
                entries = entries[:index]
                self._resync.set()
                break
            number = _number(fields)
            if number is not None and self._last_n is not None and number != self._last_n + 1:
                # Entries between the last one read and this one were trimmed unread: reload, and
                # tell every subscriber, before delivering anything after the hole.
                entries = entries[:index]
                self._behind = True
                self._resync.set()
                break
            self._last_n = number
            event = self._event((entry_id, fields))
            (primed if event.primed else events).append(event)
        if not entries:
            return
        self._last_id = entries[-1][0].decode()
        self.last_read_seq = seq_of(self._last_id)
        self.last_written_seq = max(self.last_written_seq, self.last_read_seq)
        for event in primed:
            self.store.retain(event)
        if events:
            self.store.record(events, int(self._clock() * 1000))
            self._accept(events)
        waiters = self._waiters
        while waiters and waiters[0][0] <= self.last_read_seq:
            future = heapq.heappop(waiters)[2]
            if not future.done():
                future.set_result(None)

    def _make(self, entry_id: bytes, topic: str, data: Any, data_json: bytes, primed: bool = False) -> Event:
        """The event of a stream entry: its seq from the entry id, its ts the id's milliseconds."""
        seq = seq_of(entry_id)
        event = Event(seq, format_id(self.epoch, seq), topic, seq // 1_000_000, data, data_json)
        event.primed = primed
        return event

    def _event(self, entry: tuple[bytes, dict[bytes, bytes]]) -> Event:
        entry_id, fields = entry
        return self._make(entry_id, fields[b"t"].decode(), orjson.loads(fields[b"d"]), fields[b"d"], b"p" in fields)

    def _retained(self, topic: bytes, value: bytes) -> Event:
        entry_id, flag, data_json = value.split(b" ", 2)
        return self._make(entry_id, topic.decode(), orjson.loads(data_json), data_json, flag == b"p")
