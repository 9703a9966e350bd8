"""Push providers (SPEC §7a): one long-lived connection per provider, to an upstream that
pushes (``sse``: httpx + httpx-sse; ``websocket``: the ``websockets`` client).

A ``Pusher`` holds its provider's connection while this node holds the provider's lease:

    connect (timeout) ─▶ subscribe messages (websocket) ─▶ read messages until the link drops
        each message ─▶ providers.push.read_message() (pure) ─▶ dedup ─▶ hub (fenced)

A supervisor beside the reading task closes the connection when no byte arrived for
``idle_timeout`` (a socket that answers pings and sends nothing is dead to us), or when the
lease lapses here (within ⅔ of ``lease_ttl``, before another node can take it). States:

    CONNECTING ──2xx head / handshake──▶ CONNECTED ──drop──▶ BACKOFF ──wait──▶ CONNECTING
         └──refused, error, or ended before any data (5th in a row)──▶ FAILING

Resume points (SSE ``Last-Event-ID``, a websocket ``resume`` field) advance only once the
message's items are in the hub, so a link dropped mid-way resumes before them, never after.
httpx and websockets errors become ``UpstreamError`` here and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
import re
import ssl
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import orjson
from httpx_sse import EventSource, SSEError
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from . import __version__
from .errors import BrokerUnavailable, LeaseLost, UpstreamError
from .fetch import parse_retry_after
from .hub import Hub
from .intake import Intake, iso_time
from .leases import Leases
from .limits import TokenBucket
from .provider_settings import ProviderSettings
from .providers.push import read_message

__all__ = ["PushState", "Pusher", "reconnect_delay"]

log = logging.getLogger("stream.push")

FAILING_AFTER = 5  # failed connection attempts in a row
WATCH_EVERY = 0.25  # seconds between the supervisor's looks at the lease and the idle clock
SAVE_EVERY = 1.0  # seconds: dedup memory, resume point and status are saved this often while connected (if changed)
PING_INTERVAL = PING_TIMEOUT = 20.0  # websocket protocol pings (SPEC §7a)
MAX_RETRY = 3600.0  # seconds: an SSE retry: hint is honoured up to this, like Retry-After
YIELD_EVERY = 16  # messages read in a row before the reader lets other tasks run
SEND_BUFFER_CAP = 256 * 1024  # bytes unsent to the upstream (pongs to its pings) before the link is dropped
CLOSE_TIMEOUT = 1.0  # seconds a closing handshake may take before the connection is aborted
_SECRET_NAME = re.compile(r"key|secret|token|pass|auth|sig|cred", re.IGNORECASE)


class PushState(enum.Enum):
    CONNECTING = "connecting"
    CONNECTED = "connected"
    BACKOFF = "backoff"
    FAILING = "failing"
    DISABLED = "disabled"


class HubAway(Exception):
    """Items could not go into the hub (Redis away): the link is dropped so the resume point
    stays before them; not the upstream's failure."""


def reconnect_delay(low: float, high: float, step: int, rng: random.Random) -> float:
    """Full jitter: anywhere from 0 to a ceiling that doubles per step, from ``low`` up to ``high``."""
    return rng.uniform(0, min(high, low * 2 ** min(step, 30)))


class Pusher(Intake):
    """Holds one push provider's connection; owns its resume point, counters and state."""

    def __init__(
        self,
        provider: ProviderSettings,
        client: httpx.AsyncClient,
        hub: Hub,
        *,
        base_url: str = "",
        tls: ssl.SSLContext | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        on_change: Callable[[Pusher], None] | None = None,
        on_lag: Callable[[str, float], None] | None = None,
        leases: Leases | None = None,
    ) -> None:
        super().__init__(provider, hub, clock=clock, leases=leases, on_lag=on_lag)
        self.client = client
        self.url = _resolve(provider, base_url)
        self.tls = tls  # what wss:// trusts, when not the system's certificates (this process's own)
        self.rng = rng or random.Random()
        self.on_change = on_change
        self.state = PushState.CONNECTING if provider.enabled else PushState.DISABLED
        self.primed = True  # a push upstream sends what is new: nothing to prime (SPEC §7a)
        self.attempts = 0
        self.consecutive_failures = 0
        self.reconnects = 0
        self.outcomes: dict[str, int] = {}  # how each connection ended, by kind (stream_provider_polls)
        self.messages = 0
        self.oversized = 0  # messages over max_message_bytes (each dropped its connection)
        self.items_dropped = 0  # over max_items_per_second
        self.connected_since: float | None = None
        self.last_message: float | None = None
        self.last_ok: float | None = None
        self.last_error: str | None = None
        self.next_attempt: float | None = None
        self.last_event_id: str | None = None  # sse: sent back as Last-Event-ID
        self.cursor: Any = None  # websocket: the resume field's last value
        self.retry: float | None = None  # sse: the upstream's retry: hint, seconds
        self.bucket = TokenBucket(provider.max_items_per_second, provider.max_items_per_second, time.monotonic())
        self._step = 0  # backoff steps since the last connection that stayed up for idle_timeout
        self._last_byte = time.monotonic()
        self._had_data = False  # this connection delivered a data message
        self._link: asyncio.WriteTransport | None = None  # the open websocket's, for its unsent bytes
        self._saved_at = 0.0
        self._saved_messages = 0  # messages counted at the last save
        self._secrets.extend(secret for secret in _secrets_in(provider.subscribe) if secret not in self._secrets)

    # -- the loop -------------------------------------------------------------------------

    async def run(self, sleep: Callable[[float], Any] = asyncio.sleep) -> None:
        """Connect, read, reconnect, until cancelled. Never raises."""
        name = self.provider.name
        while True:
            if not self.leases.holds(name):
                await sleep(WATCH_EVERY)
                continue
            self.fence = self.leases.fence(name)  # every write of this connection carries it
            try:
                await self._catch_up()
                delay = await self.connect_once()
                await self._persist()
            except asyncio.CancelledError:
                await self._last_save()
                raise
            except LeaseLost:
                log.info("provider %s: the lease passed to another node; its connection is closed", name)
                self.restored = None
                self.connected_since = None
                self._set(PushState.CONNECTING)  # a standby: it connects again if it gets the lease back
                delay = WATCH_EVERY
            except BrokerUnavailable as exc:
                log.warning("provider %s: %s", name, exc.message)
                delay = WATCH_EVERY
            except Exception:
                log.exception("provider %s: unexpected error in its connection", name)
                delay = self._failed(UpstreamError("internal", "unexpected error (see the log)"))
            await sleep(delay)

    async def _last_save(self) -> None:
        """Cancelled (shutdown): save what changed since the last save, briefly, while the lease
        is still this node's; the next holder starts from it."""
        if self.dirty and self.leases.holds(self.provider.name):
            with contextlib.suppress(Exception):
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    await self._persist()

    async def connect_once(self) -> float:
        """One connection, from connect to drop; returns the delay before the next attempt."""
        self.attempts += 1
        self._had_data = False
        self._set(PushState.CONNECTING)
        self._last_byte = opened = time.monotonic()
        reader = asyncio.get_running_loop().create_task(self._read_sse() if self.provider.kind == "sse" else self._read_websocket())
        try:
            await self._supervise(reader)
            reader.result()
            raise UpstreamError("closed", "the upstream ended the stream")
        except UpstreamError as exc:
            return self._dropped(exc, time.monotonic() - opened)
        except HubAway as exc:
            self.last_error = f"hub: {exc}"
            log.warning("provider %s: closed its upstream connection: %s", self.provider.name, self.last_error)
            self._ended("hub")
            return self._backoff(None)
        finally:
            self.connected_since = None
            if not reader.done():
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)

    async def _supervise(self, reader: asyncio.Task[None]) -> None:
        """Wait for ``reader`` to end; end it when the link is idle or the lease lapsed here."""
        idle = self.provider.idle_timeout
        while True:
            done, _ = await asyncio.wait({reader}, timeout=min(WATCH_EVERY, idle))
            if done:
                return
            if not self.leases.holds(self.provider.name):
                reader.cancel()
                raise LeaseLost(f"provider {self.provider.name}: the lease lapsed on this node")
            if time.monotonic() - self._last_byte > idle:
                reader.cancel()
                raise UpstreamError("idle", f"no message for {idle:g} s (idle_timeout); reconnecting")
            if self._link is not None and self._link.get_write_buffer_size() > SEND_BUFFER_CAP:
                reader.cancel()  # it pings faster than it reads our pongs: the answers would pile up here
                raise UpstreamError("flood", f"over {SEND_BUFFER_CAP} bytes of answers to the upstream unread")
            if time.monotonic() - self._saved_at >= SAVE_EVERY and (self.dirty or self.messages != self._saved_messages):
                # Dedup memory, resume point and status for the next holder and the other nodes.
                self._saved_at, self._saved_messages = time.monotonic(), self.messages
                await self._persist()

    # -- SSE ------------------------------------------------------------------------------

    async def _read_sse(self) -> None:
        provider = self.provider
        # identity: max_message_bytes is counted on the bytes as they arrive, which must be the
        # bytes httpx-sse parses (a gzipped stream would decompress past any bound).
        headers = {**dict(provider.headers), "Accept": "text/event-stream", "Cache-Control": "no-store", "Accept-Encoding": "identity"}
        if self.last_event_id:
            headers["Last-Event-ID"] = self.last_event_id
        timeout = httpx.Timeout(provider.timeout, read=None)  # a quiet stream is the supervisor's to judge
        try:
            async with contextlib.AsyncExitStack() as stack:
                async with asyncio.timeout(provider.timeout):
                    response = await stack.enter_async_context(
                        self.client.stream("GET", self._sse_url(), headers=headers, timeout=timeout)
                    )
                self._check_answer(response)
                if response.headers.get("content-encoding", "identity") != "identity":
                    raise UpstreamError("bad_body", f"a {response.headers['content-encoding']}-encoded stream, though identity was asked for")
                media = response.headers.get("content-type", "").partition(";")[0].strip()
                if media != "text/event-stream":
                    raise UpstreamError("bad_body", f"expected text/event-stream, got {media or 'no content type'!r}")
                self._opened()
                response.stream = _Watched(response.stream, self)  # raw bytes: liveness and size, before parsing
                events = EventSource(response).aiter_sse()
                count = 0
                event = await anext(events, None)
                while event is not None:
                    if event.retry is not None:
                        self.retry = min(event.retry / 1000, MAX_RETRY)
                    raw = event.data if (event.event or "message") in provider.events else None
                    await self._take(raw)
                    if event.id and event.id != self.last_event_id and _sendable(event.id):
                        self.last_event_id = event.id  # only now: its items are in the hub
                        self.dirty = True
                    count += 1
                    if count % YIELD_EVERY == 0:
                        await asyncio.sleep(0)  # a flood of tiny events does not hold the loop
                    event = await anext(events, None)
        except TimeoutError:
            raise UpstreamError("timeout", f"no answer within {provider.timeout:g} s") from None
        except SSEError as exc:
            raise UpstreamError("bad_body", str(exc)) from None
        except httpx.ConnectError as exc:
            raise UpstreamError("connect", f"cannot connect ({self._clean(str(exc)) or 'refused'})") from None
        except httpx.HTTPError as exc:
            raise UpstreamError("closed", f"{type(exc).__name__}: {self._clean(str(exc)) or 'the link dropped'}") from None

    def _sse_url(self) -> httpx.URL:
        # Merged by hand: httpx drops a URL's own query when a request is given params, even {}.
        return httpx.URL(self.url).copy_merge_params(dict(self.provider.params))

    def _check_answer(self, response: httpx.Response) -> None:
        status = response.status_code
        if status in (429, 503):
            wait = parse_retry_after(response.headers.get("retry-after"), self.clock())
            said = f", Retry-After {wait:.0f} s" if wait is not None else ""
            raise UpstreamError("rate_limited" if status == 429 else "status", f"HTTP {status}{said}", retry_after=wait)
        if not 200 <= status < 300:
            raise UpstreamError("status", f"HTTP {status} {response.reason_phrase}".strip())

    def heard(self, pending: int) -> None:
        """Raw bytes arrived (``_Watched``): the link is alive; ``pending`` bytes of a message so far."""
        self._last_byte = time.monotonic()
        if pending > self.provider.max_message_bytes:
            self.oversized += 1
            raise UpstreamError("too_large", f"a message over {self.provider.max_message_bytes} bytes (max_message_bytes)")

    # -- WebSocket ------------------------------------------------------------------------

    async def _read_websocket(self) -> None:
        provider = self.provider
        own_tls: dict[str, Any] = {"ssl": self.tls} if self.tls is not None else {}  # wss:// to this process
        try:
            async with asyncio.timeout(provider.timeout):
                socket = await _Connect(
                    self._websocket_url(),
                    additional_headers=dict(provider.headers),
                    user_agent_header=f"stream/{__version__}",
                    max_size=provider.max_message_bytes,
                    max_queue=4,
                    ping_interval=PING_INTERVAL,
                    ping_timeout=PING_TIMEOUT,
                    open_timeout=None,  # the timeout above covers connect and handshake
                    close_timeout=CLOSE_TIMEOUT,
                    logger=_websockets_log,
                    **own_tls,
                )
        except TimeoutError:
            raise UpstreamError("timeout", f"no handshake within {provider.timeout:g} s") from None
        except InvalidStatus as exc:
            code = exc.response.status_code
            wait = parse_retry_after(exc.response.headers.get("Retry-After"), self.clock()) if code in (429, 503) else None
            raise UpstreamError("rate_limited" if code == 429 else "status", f"HTTP {code} to the upgrade", retry_after=wait) from None
        except (InvalidHandshake, InvalidURI) as exc:
            raise UpstreamError("connect", f"handshake failed ({self._clean(str(exc))})") from None
        except OSError as exc:
            raise UpstreamError("connect", f"cannot connect ({exc.strerror or type(exc).__name__})") from None
        self._opened()
        self._link = socket.transport
        try:
            await self._subscribe(socket)
            count = 0
            async for raw in socket:
                self._last_byte = time.monotonic()
                await self._take(raw)
                count += 1
                if count % YIELD_EVERY == 0:
                    await asyncio.sleep(0)  # a flood of queued messages does not hold the loop
        except ConnectionClosed as exc:
            if exc.rcvd is None and exc.sent is not None and exc.sent.code == 1009:
                self.oversized += 1
                raise UpstreamError("too_large", f"a message over {provider.max_message_bytes} bytes (max_message_bytes)") from None
            raise UpstreamError("closed", f"the upstream closed the connection ({_close_reason(exc)})") from None
        finally:
            self._link = None
            await _close(socket)
        raise UpstreamError("closed", f"the upstream closed the connection ({_close_reason(None, socket)})")

    async def _subscribe(self, socket: ClientConnection) -> None:
        for message in self.provider.subscribe:
            await socket.send(message if isinstance(message, str) else orjson.dumps(message).decode())

    def _websocket_url(self) -> str:
        url = httpx.URL(self.url).copy_merge_params(dict(self.provider.params))  # the query in `url` stays
        resume = self.provider.resume
        if resume is not None and self.cursor is not None:
            url = url.copy_merge_params({resume.param: str(self.cursor)})
        return str(url)

    # -- messages -------------------------------------------------------------------------

    def _opened(self) -> None:
        """The upstream accepted the connection (its 2xx head, or the WebSocket handshake)."""
        self.connected_since = self.clock()
        self._set(PushState.CONNECTED)

    async def _take(self, raw: str | bytes | None) -> None:
        """One message (None: an event type that carries no data, still a sign of life)."""
        self.messages += 1
        self.last_message = self.clock()
        if raw is None:
            return
        try:
            message = read_message(raw, self.provider, budget=max(0, int(self.bucket.available(time.monotonic()))))
        except Exception:  # a parser bug or an input it chokes on: this message only
            log.exception("provider %s: could not read a message; skipped", self.provider.name)
            self.items_skipped += 1
            return
        self._report_skips(message.parsed)
        if message.over:
            self._dropped_items(message.over)
        if message.data:
            self._had_data = True
            self.last_ok = self.last_message
            if self.consecutive_failures:
                self.consecutive_failures = 0
                self._changed()
        items = message.parsed.items
        if items:
            self.bucket.spend(time.monotonic(), len(items))  # read_message kept to the budget (a message may pass it a little)
            await self._accept(items)
        if message.resume is not None and message.resume != self.cursor:
            self.cursor = message.resume  # only now: its items are in the hub
            self.dirty = True
        if message.error is not None:
            self._had_data = False  # an upstream error is a failed attempt, whatever came before
            raise UpstreamError("upstream_error", f"the upstream said: {self._clean(message.error)}")

    async def _accept(self, items: list[Any]) -> None:
        self._note_times(items)
        fresh, remember = self._fresh(items, in_order=True)
        if self._values:
            # A value the hub already retains is not news, even if this provider's memory lacks
            # it (a restart or takeover before the last save, a key forgotten past dedup_size).
            retained = self.hub.store.retained
            fresh = [item for item in fresh if (held := retained.get(item.topic)) is None or held.data != item.data]
        if self._values and not self.provider.backfill:
            # A topic with no retained value yet is primed without an event; later changes are
            # published (also for a key this provider's memory forgot past dedup_size).
            retained = self.hub.store.retained
            new = [item for item in fresh if item.topic not in retained]
            if new:
                if await self._prime(new) is None:
                    raise HubAway("could not prime the new keys")
                primed = {id(item) for item in new}
                fresh = [item for item in fresh if id(item) not in primed]
        if not await self._publish_items(fresh):
            raise HubAway("items could not be published; the connection resumes once the hub takes them")
        self._remember(remember, 0)

    def _dropped_items(self, count: int) -> None:
        first = self.items_dropped == 0
        self.items_dropped += count
        self.items_skipped += count
        if first or self.items_dropped % 1000 < count:
            log.warning(
                "provider %s: more than max_items_per_second (%g) items; %d dropped so far",
                self.provider.name,
                self.provider.max_items_per_second,
                self.items_dropped,
            )

    # -- outcomes -------------------------------------------------------------------------

    def _ended(self, outcome: str) -> None:
        if self.connected_since is not None:
            self.reconnects += 1  # an open connection ended (a refused attempt is no reconnect)
            self.connected_since = None
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    def _dropped(self, exc: UpstreamError, lasted: float) -> float:
        """The link ended with ``exc``: a failed attempt unless it had delivered data."""
        self._ended(exc.kind)
        if lasted >= self.provider.idle_timeout:
            self._step = 0  # it stayed up: start the backoff again from the bottom
        if self._had_data:
            self.last_error = self._clean(f"{exc.kind}: {exc.message}")
            log.info("provider %s: connection dropped (%s); reconnecting", self.provider.name, self.last_error)
            return self._backoff(exc.retry_after)
        return self._failed(exc)

    def _failed(self, exc: UpstreamError) -> float:
        self.consecutive_failures += 1
        self.last_error = self._clean(f"{exc.kind}: {exc.message}")
        delay = self._backoff(exc.retry_after)
        log.warning(
            "provider %s: %s; next attempt in %.1f s (failure %d in a row)",
            self.provider.name,
            self.last_error,
            delay,
            self.consecutive_failures,
        )
        return delay

    def _backoff(self, retry_after: float | None) -> float:
        provider = self.provider
        delay = reconnect_delay(provider.reconnect_min, provider.reconnect_max, self._step, self.rng)
        self._step += 1
        delay = max(delay, self.retry or 0.0, retry_after or 0.0)
        self.next_attempt = self.clock() + delay
        self._set(PushState.FAILING if self.consecutive_failures >= FAILING_AFTER else PushState.BACKOFF)
        return delay

    def _set(self, state: PushState) -> None:
        if state is not self.state:
            self.state = state
            self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self)

    # -- state shared with the next lease holder ------------------------------------------

    def _load_state(self, state: dict[str, Any]) -> None:
        super()._load_state(state)
        self.primed = True
        self.last_event_id, self.cursor = state.get("last_event_id"), state.get("cursor")

    def _state(self) -> dict[str, Any]:
        return {"last_event_id": self.last_event_id, "cursor": self.cursor, **super()._state()}

    def status(self) -> dict[str, Any]:
        provider = self.provider
        waiting = self.state in (PushState.BACKOFF, PushState.FAILING)
        return {
            "name": provider.name,
            "kind": provider.kind,
            "state": self.state.value,
            "last_ok": iso_time(self.last_ok),
            "last_error": self.last_error,
            "next_poll": iso_time(self.next_attempt) if waiting else None,
            "polls": self.attempts,
            "not_modified": 0,
            "items_published": self.items_published,
            "items_skipped": self.items_skipped,
            "consecutive_failures": self.consecutive_failures,
            "last_lag": self.last_lag,
            "connected_since": iso_time(self.connected_since),
            "messages": self.messages,
            "last_message": iso_time(self.last_message),
            "reconnects": self.reconnects,
            "node": self.leases.holder(provider.name),
        }


class _Watched(httpx.AsyncByteStream):
    """A response's raw byte stream, reporting each chunk to the pusher before httpx-sse
    parses it (httpx-sse drops comments, and has no size limit)."""

    def __init__(self, inner: Any, pusher: Pusher) -> None:
        self.inner = inner
        self.pusher = pusher
        self.pending = 0  # bytes since the last blank line (the end of an SSE event)
        self.tail = b""

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self.inner:
            joined = self.tail + chunk
            end = max(joined.rfind(b"\n\n"), joined.rfind(b"\r\n\r\n"), joined.rfind(b"\r\r"))
            self.pending = len(joined) - end - 2 if end >= 0 else self.pending + len(chunk)
            self.tail = chunk[-3:]
            self.pusher.heard(self.pending)
            yield chunk

    async def aclose(self) -> None:
        await self.inner.aclose()


def _resolve(provider: ProviderSettings, base_url: str) -> str:
    """A ``/demo/…`` path is this server's own demo endpoint (ws:// for a websocket)."""
    if not provider.url.startswith("/"):
        return provider.url
    url = base_url.rstrip("/") + provider.url
    return "ws" + url.removeprefix("http") if provider.kind == "websocket" else url


def _close_reason(exc: ConnectionClosed | None, socket: ClientConnection | None = None) -> str:
    frame = exc.rcvd if exc is not None else (socket.protocol.close_rcvd if socket is not None else None)
    if frame is None:
        return "no close frame" if exc is not None else "normal close"
    return f"code {frame.code}" + (f": {frame.reason[:200]}" if frame.reason else "")


def _secrets_in(messages: tuple[str | dict[str, Any], ...]) -> list[str]:
    """The values in ``subscribe`` under a name that says secret (``key``, ``secret``, ``token``,
    ``password``, ``auth``…), and whole string messages: kept out of every message we write."""
    found: list[str] = []

    def walk(value: Any, key: str) -> None:
        if isinstance(value, dict):
            for name, item in value.items():
                walk(item, name)
        elif isinstance(value, list):
            for item in value:
                walk(item, key)
        elif isinstance(value, str) and len(value) >= 6 and (key == "" or _SECRET_NAME.search(key)):
            found.append(value)

    for message in messages:
        walk(message, "")
    return found


class _Connect(connect):
    """websockets' connect, without following redirects: a redirect would carry the headers and
    the subscribe messages (keys) to another host. A 3xx is a failed attempt like any status."""

    def process_redirect(self, exc: Exception) -> Exception | str:
        return exc


# websockets logs every frame at DEBUG, the subscribe messages (keys) included: never.
_websockets_log = logging.getLogger("stream.push.websocket")
_websockets_log.setLevel(logging.WARNING)


async def _close(socket: ClientConnection) -> None:
    """Close the connection, or abort it if that takes longer than CLOSE_TIMEOUT (an upstream
    that reads nothing never lets our close frame out)."""
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await socket.close()
    except Exception:
        socket.transport.abort()
    except BaseException:  # cancelled while closing: do not leave it half open
        socket.transport.abort()
        raise


def _sendable(ident: str) -> bool:
    """Whether an SSE id can go back as a Last-Event-ID header (printable ASCII, bounded)."""
    return len(ident) <= 1024 and ident.isascii() and ident.isprintable()
