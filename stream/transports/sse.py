"""``/sse``: Server-Sent Events written straight to the socket.

Headers and the first ``retry:`` go through ASGI (so uvicorn frames the response as chunked and
logs it); after that the hub writes pre-framed chunks into the transport through
``extensions["stream.http"]`` (see ``http_protocol``). The ASGI task only waits for the end:
the client leaving, the subscriber overflowing (slow consumer), or shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from .. import wire
from ..auth import Principal
from ..errors import StreamError, Unauthorized, Unavailable
from ..hub import Subscriber
from ..runtime import Runtime
from .params import SubscribeRequest
from .stall import drop

__all__ = ["HEADERS", "EventStream"]

log = logging.getLogger("stream.sse")

HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-store"),
    (b"x-accel-buffering", b"no"),
]


def retry_later(retry_ms: int, message: str) -> bytes:
    """The whole body for a stream that cannot start now (over capacity): EventSource gives up
    for good on a non-200, so it gets 200, a randomised ``retry:`` hint and an immediate end."""
    return wire.sse_retry(retry_ms + random.randint(0, 4 * retry_ms)) + wire.sse_comment(message)


def _chunked(encode):
    return lambda *args: wire.sse_chunk(encode(*args))


class EventStream(Response):
    """One open ``/sse`` response: a runtime Connection and the Sink of its subscriber.

    A Response subclass only so FastAPI passes it through; it writes its own headers.
    """

    transport_name = "sse"
    media_type = "text/event-stream"
    encode = staticmethod(wire.sse_event_chunk)
    encode_snapshot = staticmethod(_chunked(wire.sse_snapshot))

    def __init__(self, runtime: Runtime, request: SubscribeRequest, principal: Principal | None, client_host: str):
        self.status_code = 200
        self.background = None
        self.raw_headers = list(HEADERS)
        self.runtime = runtime
        self.request = request
        self.principal = principal
        self.client_host = client_host
        self.sub: Subscriber | None = None
        self.protocol: Any = None
        self.ended: str | None = None  # why: "lost", "slow", "shutdown", "error", "expired"
        self.done: asyncio.Future[None] | None = None
        self.abort_timer: asyncio.TimerHandle | None = None

    # -- ASGI -----------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        server = self.runtime.settings.server
        self.protocol = scope.get("extensions", {}).get("stream.http")
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        # Exists before admit: shutdown or token expiry may end the stream from then on.
        self.done = asyncio.get_running_loop().create_future()
        try:
            self.runtime.admit(self)
        except Unavailable as exc:
            await send({"type": "http.response.body", "body": retry_later(server.sse_retry, exc.message)})
            return
        try:
            await send({"type": "http.response.body", "body": wire.sse_retry(server.sse_retry), "more_body": True})
            if self.ended is None:
                self._subscribe()
            await self.done
            self._detach()
            if self.ended != "lost":
                final = b""
                if self.ended == "shutdown":
                    final = wire.sse_retry(server.sse_retry + random.randint(0, server.sse_retry))
                # May wait for a slow client to drain; the abort timer armed by _end bounds it.
                await send({"type": "http.response.body", "body": final, "more_body": False})
        finally:
            self._detach()
            if self.abort_timer is not None:
                self.abort_timer.cancel()
            self.runtime.release(self)

    def _subscribe(self) -> None:
        protocol = self.protocol
        if protocol is None or not protocol.chunked:
            raise RuntimeError("/sse needs stream's HTTP protocol (run the app with `stream serve`)")
        self.write = protocol.transport.write
        self.runtime.limit_send_buffer(protocol.transport)
        protocol.stream_sink = self
        hub = self.runtime.hub
        self.sub = hub.new_subscriber(self, transport=self.transport_name)
        request = self.request
        try:
            hub.subscribe(
                self.sub,
                request.topics,
                since=request.since,
                snapshot=request.snapshot,
                symbols=request.symbols,
                announce=lambda position: self.write(wire.sse_chunk(wire.sse_position(position))),
            )
        except StreamError as exc:
            self.write(wire.sse_chunk(wire.sse_control("error", {"error": exc.to_dict()})))
            self._end("error", self.runtime.settings.server.close_timeout)

    def _detach(self) -> None:
        if self.sub is not None:
            self.sub.close()
        if self.protocol is not None and self.protocol.stream_sink is self:
            self.protocol.stream_sink = None

    def _end(self, reason: str, abort_after: float | None = None) -> None:
        if self.ended is not None:
            return
        self.ended = reason
        if self.sub is not None:
            if reason != "lost":
                self.sub.release()  # events of the write window go before the end
            self.sub.close()
        if abort_after is not None and self.protocol is not None:
            # The end of the stream may never drain to a stalled client: drop it after a while.
            transport = self.protocol.transport
            self.abort_timer = asyncio.get_running_loop().call_later(abort_after, drop, transport)
        if self.done is not None and not self.done.done():
            self.done.set_result(None)

    # -- Sink (called by the subscriber) ---------------------------------------------------

    write: Any = None  # the transport's write, bound in _subscribe

    @staticmethod
    def encode_gap(after: str | None, reason: str) -> bytes:
        return wire.sse_chunk(wire.sse_control("gap", {"after": after, "reason": reason}))

    def overflowed(self) -> None:
        log.info("ending slow SSE consumer %s (buffer full)", self.client_host)
        self._end("slow", self.runtime.settings.server.close_timeout)

    # -- StreamSink (called by the HTTP protocol) -------------------------------------------

    def pause(self) -> None:
        if self.sub is not None:
            self.sub.pause()

    def resume(self) -> None:
        if self.sub is not None:
            self.sub.resume()

    def lost(self) -> None:
        self._end("lost")

    # -- Connection (called by the runtime) --------------------------------------------------

    def shutdown(self) -> None:
        server = self.runtime.settings.server
        self._end("shutdown", min(server.close_timeout, server.shutdown_timeout / 2))

    def expire(self) -> None:
        if self.ended is None:
            if self.sub is not None:  # subscribed, so the direct write path is bound
                self.sub.release()
                error = Unauthorized("token: expired; reconnect with a fresh one")
                self.write(wire.sse_chunk(wire.sse_control("error", {"error": error.to_dict()})))
            self._end("expired", self.runtime.settings.server.close_timeout)

    def tick(self, now: float) -> None:
        if self.ended is None and self.sub is not None and not self.sub.paused:
            self.write(_HEARTBEAT)


_HEARTBEAT = wire.sse_chunk(wire.sse_comment("ping"))
