"""``stream.client``: an async subscriber for bots that never misses an event silently.

    async with Subscriber("http://127.0.0.1:8000", ["news.>"]) as sub:
        async for item in sub:
            if isinstance(item, Gap):
                ...  # events may be missing (history too short, or the server restarted)
            else:
                print(item.topic, item.data)

The subscriber keeps the id of the last event it saw and, whenever the connection drops,
reconnects with exponential backoff and full jitter and resubscribes with ``since=<that id>``,
so it receives exactly the events it missed that the server still holds. What it cannot get
back is reported as a ``Gap`` in the same stream, never swallowed.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson
import websockets
from websockets.asyncio.client import ClientConnection, connect

__all__ = ["Event", "Gap", "SubscribeError", "Subscriber"]

log = logging.getLogger("stream.client")

# Close codes after which retrying cannot help.
_FATAL = {1008: "policy violation", 1009: "message too big"}


@dataclass(frozen=True, slots=True)
class Event:
    id: str
    topic: str
    ts: int
    data: Any
    snapshot: bool = False


@dataclass(frozen=True, slots=True)
class Gap:
    """Events may be missing after ``after`` (None: unknown). ``reason``: history, overflow, epoch."""

    after: str | None
    reason: str


class SubscribeError(Exception):
    """The server refused the subscription (bad pattern, no right, …): retrying will not help."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def ws_url(url: str) -> str:
    """Accept http(s):// or ws(s):// base URLs, with or without the /ws path."""
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    path = parts.path if parts.path not in ("", "/") else "/ws"
    return urlunsplit((scheme, parts.netloc, path, "", ""))


class Subscriber:
    """Subscribe to ``topics`` (patterns) at ``url``; iterate to receive ``Event`` and ``Gap``.

    ``since``: start after this id (or time, ``-60s``); default: from now. ``snapshot``: begin
    with each topic's retained value (only on the first connection). ``on_state`` is called with
    ``"connected"``, ``"waiting"`` or ``"reconnecting"`` plus a detail string, for logs or UIs.
    ``wait``: a server that is not up yet (connection refused, timed out) is waited for, with
    the reconnect backoff, instead of raising ``OSError`` from ``async with``.
    """

    def __init__(
        self,
        url: str,
        topics: Sequence[str],
        *,
        since: str | None = None,
        token: str | None = None,
        symbols: Sequence[str] | None = None,
        snapshot: bool = False,
        min_delay: float = 0.25,
        max_delay: float = 30.0,
        on_state: Callable[[str, str], None] | None = None,
        wait: bool = False,
    ) -> None:
        if isinstance(topics, str):
            topics = [topics]
        self.url = ws_url(url)
        self.topics = list(topics)
        self.last_id: str | None = since
        self.token = token
        self.symbols = list(symbols) if symbols else None
        self.snapshot = snapshot
        self.min_delay = min_delay
        self.max_delay = max_delay
        self.on_state = on_state
        self.wait = wait
        self.reconnects = 0
        self._socket: ClientConnection | None = None
        self._closed = False
        self._attempts = 0
        self._ready: deque[Event | Gap] = deque()  # parsed, not yet handed out

    # -- context manager and iteration ---------------------------------------------------

    async def __aenter__(self) -> Subscriber:
        try:
            await self._connect()
        except _Retry as exc:  # over capacity right now: iterating will keep trying
            if self.on_state is not None:
                self.on_state("reconnecting", str(exc))
        except (OSError, TimeoutError) as exc:
            if not self.wait:
                raise
            if self.on_state is not None:  # not up yet: iterating will keep trying
                self.on_state("waiting", f"{self.url} is not answering yet ({getattr(exc, 'strerror', None) or type(exc).__name__})")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        self._closed = True
        if self._socket is not None:
            await self._socket.close()
            self._socket = None

    def __aiter__(self) -> Subscriber:
        return self

    async def __anext__(self) -> Event | Gap:
        # All state lives on self, so a cancelled or timed-out __anext__ loses nothing.
        while True:
            if self._ready:
                return self._ready.popleft()
            if self._closed:
                raise StopAsyncIteration
            if self._socket is None:
                await self._reconnect()
                continue
            try:
                raw = await self._socket.recv()
            except websockets.ConnectionClosed as closed:
                if self._closed:
                    raise StopAsyncIteration from None
                self._dropped(closed)
                continue
            for message in _messages(raw):
                item = self._handle(message)
                if item is not None:
                    self._ready.append(item)

    # -- protocol -------------------------------------------------------------------------

    def _handle(self, message: dict[str, Any]) -> Event | Gap | None:
        kind = message.get("type")
        if kind == "event":
            event = Event(message["id"], message["topic"], message["ts"], message.get("data"), bool(message.get("snapshot")))
            if not event.snapshot:
                self.last_id = event.id
            return event
        if kind == "gap":
            return Gap(message.get("after"), message.get("reason", "unknown"))
        if kind == "subscribed" and message.get("position"):
            # The server's resolved position: a since given as a time ("-60s") becomes an id, so
            # a reconnect before the first event does not move the start forward.
            self.last_id = message["position"]
        return None

    async def _connect(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        try:
            socket = await connect(self.url, additional_headers=headers, max_size=None, open_timeout=10)
        except websockets.InvalidStatus as exc:
            status = exc.response.status_code
            if status in (400, 401, 403, 404):
                raise SubscribeError("refused", f"the server refused the connection: HTTP {status}") from None
            raise
        try:
            welcome = orjson.loads(await asyncio.wait_for(socket.recv(), 10))
            if welcome.get("type") == "error":
                # over_capacity or a shutdown: the server closes now; try again later.
                raise _Retry(f"{welcome.get('code')}: {welcome.get('message')}")
            if welcome.get("type") != "welcome":
                raise SubscribeError("bad_welcome", f"unexpected first frame {welcome!r}")
            op: dict[str, Any] = {"op": "subscribe", "topics": self.topics, "ref": "subscriber"}
            if self.last_id is not None:
                op["since"] = self.last_id
            elif self.snapshot:
                op["snapshot"] = True
            if self.symbols:
                op["symbols"] = self.symbols
            await socket.send(orjson.dumps(op).decode())
            # Wait for the answer: an error here (bad pattern, no right) is final.
            while True:
                answer = orjson.loads(await asyncio.wait_for(socket.recv(), 10))
                if answer.get("type") == "error" and answer.get("ref") == "subscriber":
                    raise SubscribeError(answer.get("code", "error"), answer.get("message", ""))
                if answer.get("type") == "subscribed":
                    self._handle(answer)
                    break
        except BaseException:
            await socket.close()
            raise
        if self._closed:  # close() ran while we were connecting
            await socket.close()
            return
        self._socket = socket
        self._attempts = 0
        if self.on_state is not None:
            self.on_state("connected", f"after {self.last_id}" if self.last_id else "from now")

    def _dropped(self, closed: websockets.ConnectionClosed) -> None:
        self._socket = None
        code = closed.rcvd.code if closed.rcvd is not None else 1006
        if code in _FATAL:
            reason = closed.rcvd.reason or _FATAL[code]  # type: ignore[union-attr]
            raise SubscribeError("closed", f"the server closed the connection ({code} {reason})")
        self.reconnects += 1
        if self.on_state is not None:
            reason = closed.rcvd.reason if closed.rcvd is not None and closed.rcvd.reason else "connection lost"
            self.on_state("reconnecting", f"{code} {reason}")

    async def _reconnect(self) -> None:
        """Back off (exponential, full jitter), then connect and resubscribe from the last id."""
        self._attempts += 1
        ceiling = min(self.max_delay, self.min_delay * 2 ** min(self._attempts, 16))
        delay = random.uniform(self.min_delay, max(self.min_delay, ceiling))
        await asyncio.sleep(delay)
        if self._closed:
            return
        try:
            await self._connect()
        except (TimeoutError, OSError, websockets.WebSocketException, _Retry) as exc:
            log.debug("reconnect failed: %s", exc)
            if self.on_state is not None:
                self.on_state("reconnecting", f"{type(exc).__name__}: {exc}")


class _Retry(Exception):
    """The server is there but cannot take us now (over capacity, shutting down)."""


def _messages(raw: str | bytes) -> list[dict[str, Any]]:
    try:
        message = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return []
    if isinstance(message, list):
        return [m for m in message if isinstance(m, dict)]
    return [message] if isinstance(message, dict) else []
